"""Crash-safe file writes shared by checkpoints, exports and DeepSpeed's checkpoint conversion.

A reader (a resumed run, another rank, a user) must see an old file or a whole new one, never half of one:
write under a temporary name, flush to disk, then rename.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_torch_save", "fsync_tree"]


def fsync_tree(directory: Path) -> None:
    """Flush every file below ``directory`` and the folder itself to disk (before it is renamed into place)."""
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
