"""DeepSpeed's own pydantic models of the preset's ZeRO, offload, bf16 and fp16 sections.

The keys a section accepts and the checks of its values come from the installed DeepSpeed (its models forbid
unknown keys and know each field's type and bounds), so the preset check follows DeepSpeed's releases instead of a
hand-kept list. ``ssl3d.strategies.ds_config`` keeps the messages: one line per problem, naming the dotted key,
with a close match for a misspelled key. DeepSpeed is imported only when a preset has one of these sections.
"""

from __future__ import annotations

import functools
import importlib
import json
import typing
from typing import Any

__all__ = ["SECTIONS", "accepted_keys", "boolean_keys", "deprecated_keys", "value_problems"]

# Dotted section -> (module, class) of the DeepSpeed model that parses it.
SECTIONS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "zero_optimization.offload_param": ("deepspeed.runtime.zero.offload_config", "DeepSpeedZeroOffloadParamConfig"),
    "zero_optimization.offload_optimizer": (
        "deepspeed.runtime.zero.offload_config",
        "DeepSpeedZeroOffloadOptimizerConfig",
    ),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
}
NESTED = ("offload_param", "offload_optimizer")  # sub-sections of zero_optimization, checked as their own sections


@functools.cache
def _model(section: str) -> Any:
    module, name = SECTIONS[section]
    return getattr(importlib.import_module(module), name)


def _fields(section: str) -> list[tuple[str, Any]]:
    """(the key as a JSON preset writes it, the pydantic field): DeepSpeed's alias where it has one."""
    return [(f.alias or name, f) for name, f in _model(section).model_fields.items()]


def _deprecation(field: Any) -> dict[str, Any] | None:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) and extra.get("deprecated") else None


@functools.cache
def accepted_keys(section: str) -> tuple[str, ...]:
    """The section's keys in DeepSpeed's documented spelling, deprecated ones left out."""
    return tuple(key for key, f in _fields(section) if not _deprecation(f))


@functools.cache
def deprecated_keys(section: str) -> dict[str, str]:
    """Deprecated key -> what DeepSpeed says replaces it."""
    return {key: str(d.get("new_param", "")) for key, f in _fields(section) if (d := _deprecation(f))}


@functools.cache
def boolean_keys(section: str) -> tuple[str, ...]:
    """Keys typed ``bool`` (checked strictly by ssl3d: pydantic would read ``"yes"`` or ``1`` as true)."""
    return tuple(key for key, f in _fields(section) if _is_bool(f.annotation) and not _deprecation(f))


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or set(typing.get_args(annotation)) == {bool, type(None)}


def value_problems(section: str, values: dict[str, Any]) -> list[str]:
    """DeepSpeed's own checks of ``values`` (known keys, ``"auto"`` and comments already removed), one line each."""
    import pydantic

    try:
        _model(section).model_validate(values)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join([section, *(str(p) for p in err["loc"])])
            got = f"got {json.dumps(err['input'], default=str)}; " if err["loc"] else ""
            problems.append(f"{where}: {got}DeepSpeed says: {err['msg'][:1].lower()}{err['msg'][1:]}")
        return problems
    return []
