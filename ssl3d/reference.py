"""The key reference of ``docs/config.md``: the run config's and the strategy preset's pydantic models, printed.

``python -m ssl3d.reference > docs/config.md`` after changing a key; ``tests/unit/test_docs.py`` fails until then.
"""

from __future__ import annotations

from ssl3d.config import key_reference
from ssl3d.strategies.ds_config import Preset


def reference_page() -> str:
    """Both references, run config first."""
    return key_reference() + "\n\n" + key_reference(Preset, "Strategy-preset reference") + "\n"


if __name__ == "__main__":
    print(reference_page(), end="")
