"""The strategy preset: a ds_config JSON in DeepSpeed's own vocabulary, checked for every backend.

One vocabulary covers single-process, DDP, FSDP2, DeepSpeed ZeRO and fairscale runs. DeepSpeed itself silently
ignores a misspelled section (``zero_optimisation`` quietly means stage 0) and happily accepts batch sizes that
disagree with the training loop, so everything here is checked before any process group or engine exists: the
top level and ssl3d's own sections by the ``Preset`` model below, the ZeRO, offload, bf16 and fp16 sections by
DeepSpeed's own pydantic models (``deepspeed_schema``), and all of it against the run config. Every problem is
collected and raised as one ``ConfigError``; keys starting with ``_`` are comments.

``"auto"`` values are filled by one fill-and-match step (``fill_match``): micro batch = ``train.batch_size``,
accumulation = ``train.grad_accum``, clipping = ``train.grad_clip``, ``bf16``/``fp16`` from ``train.precision``; an
explicit value that contradicts the run config is an error. ``"auto"`` in a ZeRO tuning knob means DeepSpeed's
default, except for the bucket sizes, where it means the model's parameter count (DeepSpeed's default 5e8 elements
would allocate 1.9 GiB per bucket for a 19 M-parameter model).
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from ssl3d.config import Config, ConfigError, Int, Section, checked, did_you_mean, read_json
from ssl3d.config import key as doc_key

Backend = Literal["single", "ddp", "fsdp", "deepspeed", "fairscale"]
BACKENDS: tuple[str, ...] = typing.get_args(Backend)
NO_FP16 = ("fairscale",)  # backends without an fp16 loss scaler in ssl3d: "auto" means fp32 there on pre-Ampere GPUs
PRECISIONS = ("fp32", "bf16", "fp16")
SSL3D_KEYS = ("strategy", "fsdp", "gather_contrastive")
REFUSED_KEYS = ("optimizer", "scheduler")  # ssl3d builds both from the run config
ZERO_AUTO_KNOBS = (
    "reduce_bucket_size",
    "allgather_bucket_size",
    "sub_group_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_model_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
)
# DeepSpeed's spellings of bf16 (its DtypeEnum); fp16 goes through the fp16 section, which scales the loss under ZeRO.
TORCH_AUTOCAST_BF16 = ("bf16", "bfloat16", "torch.bfloat16")
Auto = Literal["auto"]
Positive = Annotated[Int, Field(ge=1)]
Flag = bool | None


class FSDPOptions(Section):
    """FSDP2 (``fully_shard``) options: the preset's ``fsdp`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reshard_after_forward: bool = doc_key(True, "free the gathered parameters after each unit's forward (like ZeRO-3)")
    cpu_offload: bool = doc_key(False, "keep parameters, gradients and optimizer states on the CPU")
    shard: Literal["block", "stage"] = doc_key("block", "one FSDP unit per Swin block, or per stage")


class TorchAutocast(Section):
    """DeepSpeed's ``torch_autocast`` section: fp32 weights, the engine's forward under ``torch.autocast`` (bf16)."""

    enabled: bool = doc_key(False, "autocast the engine's forward")
    dtype: str = doc_key("bfloat16", '"bfloat16"; for fp16 use the fp16 section, whose loss scaler works under ZeRO')
    lower_precision_safe_modules: list[str] | None = doc_key(None, "DeepSpeed's list of module types run in bf16")


class DataTypes(Section):
    """DeepSpeed's ``data_types`` section."""

    grad_accum_dtype: Literal["fp32", "bf16", "fp16"] | None = doc_key(None, "dtype DeepSpeed accumulates gradients in")


class AsyncIO(Section):
    """DeepSpeed's NVMe I/O settings (``aio``)."""

    block_size: Int | None = doc_key(None, "bytes per I/O request")
    queue_depth: Int | None = doc_key(None, "requests in flight")
    intra_op_parallelism: Int | None = doc_key(None, "threads per request")
    single_submit: Flag = doc_key(None, "submit requests one by one")
    overlap_events: Flag = doc_key(None, "overlap submission and completion")
    use_gds: Flag = doc_key(None, "GPUDirect Storage")


class Preset(Section):
    """A preset's top level as ssl3d reads it: DeepSpeed's vocabulary plus ``strategy``, ``fsdp`` and
    ``gather_contrastive``. The inside of ``zero_optimization``, ``bf16`` and ``fp16`` is DeepSpeed's to check."""

    strategy: Backend | None = doc_key(None, "backend; default deepspeed with a zero_optimization section, else ddp")
    train_batch_size: Positive | Auto = doc_key("auto", "global batch", 'a positive integer or "auto"')
    train_micro_batch_size_per_gpu: Positive | Auto = doc_key(
        "auto", "= train.batch_size", 'a positive integer or "auto"'
    )
    gradient_accumulation_steps: Positive | Auto = doc_key("auto", "= train.grad_accum", 'a positive integer or "auto"')
    gradient_clipping: Annotated[float, Field(ge=0)] | Auto = doc_key(
        "auto", "= train.grad_clip (0: off)", 'a norm >= 0 (0: off) or "auto"'
    )
    bf16: dict[str, Any] | None = doc_key(None, "DeepSpeed's bf16 section; enabled: true, false or auto")
    fp16: dict[str, Any] | None = doc_key(None, "DeepSpeed's fp16 section (loss scaling); enabled: true, false or auto")
    zero_optimization: dict[str, Any] | None = doc_key(None, "DeepSpeed's ZeRO section")
    zero_allow_untested_optimizer: Flag = doc_key(None, "DeepSpeed flag")
    zero_force_ds_cpu_optimizer: Flag = doc_key(None, "DeepSpeed flag")
    activation_checkpointing: dict[str, Any] = doc_key({}, "ssl3d's checkpointing policy (ssl3d.memory), any backend")
    torch_autocast: TorchAutocast | None = doc_key(None, "DeepSpeed's torch_autocast section")
    aio: AsyncIO | None = doc_key(None, "DeepSpeed's NVMe I/O settings")
    data_types: DataTypes = doc_key(DataTypes(), "DeepSpeed's data_types section")
    steps_per_print: Positive | None = doc_key(None, "DeepSpeed's own printing (ssl3d logs itself)")
    wall_clock_breakdown: Flag = doc_key(None, "DeepSpeed's timers")
    optimizer: Any = doc_key(None, "refused: ssl3d builds the optimizer from the run config's optim section")
    scheduler: Any = doc_key(None, "refused: ssl3d builds the schedule from the run config's optim section")
    fsdp: FSDPOptions | None = doc_key(None, 'options of strategy "fsdp"')
    gather_contrastive: bool = doc_key(
        False, "gather contrastive embeddings from all ranks: the loss sees the global batch"
    )


@dataclass(frozen=True)
class Offload:
    """Where DeepSpeed keeps optimizer states or parameters between uses."""

    device: str = "none"  # none | cpu | nvme
    pin_memory: bool = False
    nvme_path: str | None = None

    @property
    def enabled(self) -> bool:
        return self.device in ("cpu", "nvme")


@dataclass(frozen=True)
class DSConfig:
    """A resolved, validated ds_config: every ``"auto"`` filled, every cross-check passed."""

    strategy: str
    world_size: int
    micro_batch_size: int
    grad_accum: int
    train_batch_size: int
    gradient_clipping: float | None  # None: no clipping
    precision: str  # fp32 | bf16 | fp16
    zero_stage: int = 0
    offload_optimizer: Offload = field(default_factory=Offload)
    offload_param: Offload = field(default_factory=Offload)
    fsdp: FSDPOptions = field(default_factory=FSDPOptions)
    activation_checkpointing: dict[str, Any] = field(default_factory=dict)
    gather_contrastive: bool = False
    # DeepSpeed's ``torch_autocast`` section: fp32 weights, the engine autocasts its forward (bf16 only)
    torch_autocast: bool = False
    notes: tuple[str, ...] = ()  # what "auto" chose and why, for one line each at start-up
    fp16: dict[str, Any] = field(default_factory=dict)  # loss-scaling options (DeepSpeed vocabulary)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # what deepspeed.initialize(config=...) gets
    source: str = "<dict>"


def _js(value: Any) -> str:
    return json.dumps(value, default=str)


def _without_comments(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _without_comments(v) for k, v in tree.items() if not str(k).startswith("_")}
    return [_without_comments(v) for v in tree] if isinstance(tree, list) else tree


def fill_match(value: Any, run_value: Any, name: str, run_key: str, problems: list[str]) -> Any:
    """The fill-and-match step for a preset value that repeats a run-config value: ``"auto"`` takes the run
    config's, an explicit value must agree with it (one line naming both and the fix otherwise)."""
    if value == "auto":
        return run_value
    if value != run_value:
        v = _js(value)
        problems.append(
            f'{name}: got {v} but {run_key} is {_js(run_value)}; write "auto" or set {run_key}={v} '
            f"(--set {run_key}={v})"
        )
    return value


def resolve_ds_config(
    raw: dict[str, Any],
    cfg: Config,
    *,
    world_size: int = 1,
    device_type: str = "cpu",
    auto_precision: str = "fp32",
    source: str = "<dict>",
) -> DSConfig:
    """Check a ds_config dict against ``Preset``, DeepSpeed's models and the run config; fill every ``"auto"``.

    ``auto_precision`` is what ``train.precision: "auto"`` means on this device (bf16 on recent GPUs, fp32 on
    the CPU). Raises one ``ConfigError`` listing every problem; each section is checked by its own function.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"ds_config {source}: expected a JSON object at the top level")
    raw = _without_comments(raw)
    preset, problems = checked(Preset, raw)
    problems = [_top_level_wording(line) for line in problems]
    for name in REFUSED_KEYS:
        if name in raw:
            problems.append(
                f"{name}: not allowed in a ds_config; ssl3d builds the optimizer and learning-rate schedule itself "
                f"from the run config's optim section (optim.name, optim.lr, optim.schedule, ...)"
            )
    strategy = _resolve_backend(preset, "zero_optimization" in raw, world_size, problems)
    t = cfg.train
    micro = fill_match(
        preset.train_micro_batch_size_per_gpu,
        t.batch_size,
        "train_micro_batch_size_per_gpu",
        "train.batch_size",
        problems,
    )
    accum = fill_match(
        preset.gradient_accumulation_steps, t.grad_accum, "gradient_accumulation_steps", "train.grad_accum", problems
    )
    tbs = preset.train_batch_size
    if tbs not in ("auto", micro * accum * world_size):
        problems.append(
            f"train_batch_size: got {tbs}, expected train_micro_batch_size_per_gpu x gradient_accumulation_steps x "
            f'world size = {micro} x {accum} x {world_size} = {micro * accum * world_size}; write "auto" or fix one '
            "of them"
        )
    tbs = micro * accum * world_size
    clip = preset.gradient_clipping
    clip = fill_match(
        clip if clip == "auto" else (float(clip) or None), t.grad_clip, "gradient_clipping", "train.grad_clip", problems
    )
    notes: list[str] = []
    if auto_precision == "fp16" and strategy in NO_FP16:
        notes.append(
            f'precision "auto": fp32 (this GPU has no native bf16, and strategy "{strategy}" has no fp16 loss scaler '
            'in ssl3d; strategy "ddp", "fsdp" or "deepspeed" would train in fp16)'
        )
        auto_precision = "fp32"
    precision, fp16_opts = _resolve_precision(preset, t.precision, auto_precision, problems)
    torch_autocast = _resolve_torch_autocast(preset, t.precision, strategy, problems)
    if torch_autocast:
        precision = "bf16"
    _check_precision_support(raw, precision, strategy, device_type, problems)
    stage, off_opt, off_par, zero = _resolve_zero(preset.zero_optimization, problems)
    if zero is not None and stage > 0:
        _fill_bucket_sizes(preset.zero_optimization or {}, zero, cfg)
    _check_zero_backend(zero, stage, off_opt.enabled or off_par.enabled, off_opt.enabled, strategy, problems)
    if cfg.model.compile:
        from ssl3d.model.compile import compile_refusal

        if refusal := compile_refusal(strategy, stage):
            problems.append(refusal)
    if device_type == "cuda" and "nvme" in (off_opt.device, off_par.device):
        problems += _nvme_toolkit_problems()
    _check_grad_accum_dtype(preset.data_types.grad_accum_dtype, strategy, precision, stage, problems)
    if preset.fsdp is not None and strategy != "fsdp":
        problems.append(f'fsdp: options for strategy "fsdp", but strategy is "{strategy}"; remove it or switch')
    problems += _check_activation_checkpointing(preset.activation_checkpointing)
    if problems:
        raise ConfigError([f"ds_config {source}: {p}" for p in problems])
    return DSConfig(
        strategy=strategy,
        world_size=world_size,
        micro_batch_size=micro,
        grad_accum=accum,
        train_batch_size=tbs,
        gradient_clipping=clip,
        precision=precision,
        zero_stage=stage,
        offload_optimizer=off_opt,
        offload_param=off_par,
        fsdp=preset.fsdp or FSDPOptions(),
        activation_checkpointing=preset.activation_checkpointing,
        gather_contrastive=preset.gather_contrastive,
        torch_autocast=torch_autocast,
        notes=tuple(notes),
        fp16=fp16_opts,
        deepspeed=_deepspeed_dict(raw, micro, accum, tbs, clip, precision, fp16_opts, zero, torch_autocast),
        source=source,
    )


def _top_level_wording(line: str) -> str:
    """An unknown top-level key is a section DeepSpeed would ignore; the refused sections are not offered."""
    name, sep, rest = line.partition(": unknown key; ")
    if not sep or "." in name or "[" in name:
        return line
    valid = [k for k in Preset.model_fields if k not in REFUSED_KEYS]
    return (
        f"{name}: unknown section (DeepSpeed would silently ignore it); {did_you_mean(name, valid)}"
        f"valid sections: {', '.join(valid)}"
    )


def _resolve_backend(preset: Preset, has_zero: bool, world_size: int, problems: list[str]) -> str:
    """``strategy``, or the backend the other sections imply (deepspeed with a ZeRO section, else ddp/single)."""
    strategy = preset.strategy or ("deepspeed" if has_zero else ("ddp" if world_size > 1 else "single"))
    if strategy == "single" and world_size > 1:
        problems.append(
            f'strategy: "single" runs one process but WORLD_SIZE is {world_size}; use "ddp" (or fsdp/deepspeed)'
        )
    return strategy


def _resolve_precision(
    preset: Preset, run_precision: str, auto_precision: str, problems: list[str]
) -> tuple[str, dict[str, Any]]:
    """fp32/bf16/fp16 from the ``bf16``/``fp16`` sections and ``train.precision``; returns fp16 options too."""
    asked: dict[str, Any] = {}
    for name in ("bf16", "fp16"):
        section = getattr(preset, name) or {}
        asked[name] = section.get("enabled", "auto")
        if asked[name] not in (True, False, "auto"):
            problems.append(
                f'{name}.enabled: got {_js(asked[name])}, expected true, false or "auto" (= train.precision)'
            )
            asked[name] = "auto"
        if section:
            _check_deepspeed_section(section, name, problems)
    fp16_opts = {k: v for k, v in (preset.fp16 or {}).items() if k != "enabled"}
    if asked["bf16"] is True and asked["fp16"] is True:
        problems.append("bf16.enabled and fp16.enabled: both true; enable at most one (bf16 needs no loss scaling)")
        return "bf16", fp16_opts
    explicit = "bf16" if asked["bf16"] is True else "fp16" if asked["fp16"] is True else None
    run_set = run_precision if run_precision != "auto" else None
    if explicit and run_set and explicit != run_set:
        problems.append(
            f'{explicit}.enabled: got true but train.precision is "{run_set}"; write "auto" or set '
            f"train.precision={explicit}"
        )
    for name in ("bf16", "fp16"):
        if asked[name] is False and run_set == name:
            problems.append(
                f'{name}.enabled: got false but train.precision is "{name}"; write "auto" or change train.precision'
            )
    return explicit or run_set or auto_precision, fp16_opts


def _resolve_torch_autocast(preset: Preset, run_precision: str, strategy: str, problems: list[str]) -> bool:
    """Whether DeepSpeed's ``torch_autocast`` section is on: fp32 weights and masters, the engine's forward under
    ``torch.autocast(bf16)``. The alternative to the bf16 section (a bf16 model with fp32 masters), for a user who
    wants LayerNorm and softmax in fp32 as under DDP's autocast, at the cost of fp32 weights and gradients."""
    section = preset.torch_autocast
    if section is None:
        return False
    if strategy != "deepspeed":
        problems.append(
            f'torch_autocast: only DeepSpeed reads it, strategy is "{strategy}" (which autocasts from '
            "train.precision itself); remove it"
        )
    if section.dtype not in TORCH_AUTOCAST_BF16:
        problems.append(
            f'torch_autocast.dtype: got {_js(section.dtype)}, expected "bfloat16"; for fp16 use the fp16 section '
            '({"fp16": {"enabled": true}}), whose loss scaler works under every ZeRO stage'
        )
    if not section.enabled:
        return False
    for name in ("bf16", "fp16"):
        if (getattr(preset, name) or {}).get("enabled") is True:
            problems.append(
                f"torch_autocast.enabled and {name}.enabled: both true; torch_autocast keeps fp32 weights and "
                f"autocasts, {name} makes the whole model {name}: enable one"
            )
    if run_precision not in ("auto", "bf16"):
        problems.append(
            f'torch_autocast.enabled: autocasts to bf16 but train.precision is "{run_precision}"; set '
            "train.precision=bf16 (or auto), or remove the section"
        )
    return True


def _resolve_offload(zero: dict[str, Any], name: str, problems: list[str]) -> Offload:
    """An offload sub-section, checked by DeepSpeed's model; NVMe needs a folder."""
    section = zero.get(name)
    where = f"zero_optimization.{name}"
    if section is None:
        return Offload()
    if not isinstance(section, dict):
        problems.append(f'{where}: got {_js(section)}, expected an object like {{"device": "cpu"}}')
        return Offload()
    _check_deepspeed_section(section, where, problems)
    device = section.get("device", "none")
    if device == "nvme" and not (isinstance(section.get("nvme_path"), str) and section["nvme_path"]):
        problems.append(f'{where}.nvme_path: missing; "device": "nvme" needs the folder of a fast local NVMe drive')
    return Offload(
        device if device in ("cpu", "nvme") else "none", section.get("pin_memory") is True, section.get("nvme_path")
    )


def _resolve_zero(zero: dict[str, Any] | None, problems: list[str]) -> tuple[int, Offload, Offload, dict | None]:
    """The ZeRO stage, both offloads, and the section for DeepSpeed ("auto" knobs left to DeepSpeed's defaults)."""
    if zero is None:
        return 0, Offload(), Offload(), None
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        problems.append(f"zero_optimization.stage: got {_js(stage)}, expected 0, 1, 2 or 3")
        stage = 0
    off_opt = _resolve_offload(zero, "offload_optimizer", problems)
    off_par = _resolve_offload(zero, "offload_param", problems)
    if off_par.enabled and stage != 3:
        problems.append(
            f'zero_optimization.offload_param: device "{off_par.device}" needs stage 3 (got stage {stage}); '
            "set stage 3 or offload only the optimizer (offload_optimizer)"
        )
    if off_opt.enabled and stage == 0:
        problems.append(
            f'zero_optimization.offload_optimizer: device "{off_opt.device}" needs stage 1, 2 or 3 (got stage 0)'
        )
    out = {}
    for name, value in zero.items():
        number = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
        if value == "auto" and name not in ZERO_AUTO_KNOBS:
            problems.append(f'zero_optimization.{name}: "auto" is only allowed for {", ".join(ZERO_AUTO_KNOBS)}')
        elif name in ZERO_AUTO_KNOBS and value != "auto" and not number:
            problems.append(f'zero_optimization.{name}: got {_js(value)}, expected a non-negative number or "auto"')
        elif value != "auto":
            out[name] = value  # "auto" knobs: DeepSpeed's default (bucket sizes: filled below)
    _check_deepspeed_section(zero, "zero_optimization", problems)
    return stage, off_opt, off_par, out


def _check_deepspeed_section(section: dict[str, Any], where: str, problems: list[str]) -> None:
    """Keys and values against DeepSpeed's own model of the section (``ssl3d.strategies.deepspeed_schema``), after
    ssl3d's checks: a key that already has a problem is not reported twice; ``"auto"`` is ssl3d's to fill."""
    from ssl3d.strategies import deepspeed_schema as schema

    valid = schema.accepted_keys(where)
    deprecated = schema.deprecated_keys(where)
    reported = {key for key in section if any(p.startswith(f"{where}.{key}:") for p in problems)}
    for key in section:
        if key in valid or key in reported:
            continue
        reported.add(key)
        if key in deprecated:
            problems.append(f"{where}.{key}: deprecated by DeepSpeed; use '{deprecated[key]}' instead")
        else:
            problems.append(f"{where}.{key}: unknown key; {did_you_mean(key, valid)}valid keys: {', '.join(valid)}")
    for key in schema.boolean_keys(where):
        if key in section and key not in reported and not isinstance(section[key], bool) and section[key] != "auto":
            problems.append(f"{where}.{key}: got {_js(section[key])}, expected true/false")
            reported.add(key)
    values = {k: v for k, v in section.items() if k not in reported and v != "auto" and k not in schema.NESTED}
    problems += schema.value_problems(where, values)


def _check_activation_checkpointing(section: dict[str, Any]) -> list[str]:
    """The memory module's parser: it knows ssl3d's policy keys and DeepSpeed's own."""
    from ssl3d.memory.activation_checkpointing import CheckpointPolicy

    try:
        CheckpointPolicy.from_dict(section)
    except ConfigError as exc:
        return list(exc.problems)
    return []


def _check_precision_support(
    raw: dict[str, Any], precision: str, strategy: str, device_type: str, problems: list[str]
) -> None:
    """What each backend and device can do with the chosen precision."""
    if precision == "fp16" and device_type != "cuda":
        problems.append(
            f"fp16.enabled: fp16 needs a CUDA GPU (loss scaling), this run is on the {device_type}; "
            'use bf16 ("bf16": {"enabled": true}) or fp32'
        )
    if precision == "fp16" and strategy in NO_FP16:
        problems.append(
            f'fp16.enabled: strategy "{strategy}" has no tested fp16 loss scaler in ssl3d; use bf16, '
            'or strategy "ddp", "fsdp" or "deepspeed" for fp16'
        )
    if isinstance(raw.get("bf16"), dict) and raw["bf16"].get("check_grad_overflow") is False:
        problems.append(
            "bf16.check_grad_overflow: got false; ssl3d skips a step whose gradient norm is not finite on every "
            "backend, and with false DeepSpeed's bf16 ZeRO optimizers would apply it; remove the key"
        )


def _check_zero_backend(
    zero: dict[str, Any] | None, stage: int, offload: bool, offload_optimizer: bool, strategy: str, problems: list[str]
) -> None:
    """A ZeRO section only means something to DeepSpeed: say what the chosen backend does instead."""
    if zero is None or strategy == "deepspeed":
        return
    alternative = {
        "fsdp": 'FSDP2 already shards like ZeRO-3; for offload use "fsdp": {"cpu_offload": true}',
        "fairscale": "fairscale's OSS + ShardedDataParallel already shards like ZeRO-2",
    }.get(strategy, 'use "strategy": "deepspeed", or "fsdp" to shard without DeepSpeed')
    if offload:
        where = "zero_optimization.offload_" + ("optimizer" if offload_optimizer else "param")
        problems.append(
            f'{where}: only DeepSpeed offloads this way, strategy is "{strategy}"; use "strategy": "deepspeed" '
            'with this section, or "strategy": "fsdp" with "fsdp": {"cpu_offload": true}'
        )
    elif stage > 0:
        problems.append(f'zero_optimization: only DeepSpeed reads it, strategy is "{strategy}"; {alternative}')


DEFAULT_CUDA_HOME = Path("/usr/local/cuda")  # where torch's extension builder looks last


def cuda_toolkit_home() -> str | None:
    """Where a CUDA toolkit (nvcc and headers) lives, found as torch's extension builder finds it; None if nowhere."""
    import os
    import shutil

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    return str(DEFAULT_CUDA_HOME) if (DEFAULT_CUDA_HOME / "bin" / "nvcc").is_file() else None


def _nvme_toolkit_problems() -> list[str]:
    """NVMe offload on a GPU JIT-builds DeepSpeed's async_io op as a CUDA extension (``-lcudart``, CUDA headers):
    unlike CPU Adam it needs a full CUDA toolkit on every node, which a pip-installed torch does not bring."""
    if cuda_toolkit_home() is not None:
        return []
    import torch

    return [
        'zero_optimization.offload_param/offload_optimizer: "nvme" on a GPU JIT-builds DeepSpeed\'s async_io op, '
        f"which needs a CUDA toolkit (nvcc and headers of CUDA {torch.version.cuda or 'matching torch'}) and libaio; "
        'none found (CUDA_HOME unset, no nvcc on PATH): install one and set CUDA_HOME, or offload to "cpu"'
    ]


def _check_grad_accum_dtype(dtype: str | None, strategy: str, precision: str, stage: int, problems: list[str]) -> None:
    if dtype is not None and strategy != "deepspeed":
        problems.append(
            f'data_types.grad_accum_dtype: only DeepSpeed reads it, strategy is "{strategy}" (which accumulates '
            "gradients in fp32 anyway); remove it"
        )
    elif dtype not in (None, precision) and stage == 0:
        problems.append(
            f'data_types.grad_accum_dtype: "{dtype}" with {precision} parameters needs ZeRO stage 1 or more '
            "(DeepSpeed stage 0 accumulates in the parameters' dtype); set zero_optimization.stage to 1"
        )


def _deepspeed_dict(
    raw: dict[str, Any],
    micro: int,
    accum: int,
    tbs: int,
    clip: float | None,
    precision: str,
    fp16_opts: dict[str, Any],
    zero: dict[str, Any] | None,
    torch_autocast: bool = False,
) -> dict[str, Any]:
    """What ``deepspeed.initialize(config=...)`` gets: every "auto" filled, ssl3d's own keys and comments removed."""
    ds: dict[str, Any] = {k: v for k, v in raw.items() if k not in SSL3D_KEYS and k not in ("bf16", "fp16")}
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = tbs
    ds["gradient_clipping"] = clip or 0.0
    ds["bf16"] = {
        **raw.get("bf16", {}),
        "enabled": precision == "bf16" and not torch_autocast,
    }
    ds["fp16"] = {**fp16_opts, "enabled": precision == "fp16"}
    if "torch_autocast" in raw:
        ds["torch_autocast"] = {**raw["torch_autocast"], "enabled": torch_autocast, "dtype": "bfloat16"}
    if zero is not None:
        ds["zero_optimization"] = zero
    # Not for DeepSpeed: its engine never applies this section to a model that does not call
    # deepspeed.checkpointing itself; ssl3d.memory applies it to the Swin blocks for every backend.
    ds.pop("activation_checkpointing", None)
    ds.setdefault("steps_per_print", 10**9)  # ssl3d logs itself; DeepSpeed's default prints every 10 steps
    return ds


BUCKET_KNOBS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")
DEEPSPEED_DEFAULT_BUCKET = 500_000_000


def _fill_bucket_sizes(raw_zero: dict[str, Any], zero: dict[str, Any], cfg: Config) -> None:
    """``"auto"`` bucket sizes = the model's parameter count (capped at DeepSpeed's default of 5e8 elements).

    DeepSpeed allocates its buckets at their configured size: the default 5e8 elements is a 1.9 GiB fp32 buffer
    per bucket, 100x the 19 M-parameter model. One bucket the size of the model holds every gradient, so the
    communication pattern stays that of the default."""
    auto = [k for k in BUCKET_KNOBS if raw_zero.get(k) == "auto"]
    if not auto:
        return
    from ssl3d.model.meta import count_parameters

    size = auto_bucket_size(count_parameters(cfg.model, cfg.ssl.contrastive_dim))
    for key in auto:
        zero[key] = size


def auto_bucket_size(parameters: int) -> int:
    """What ``"auto"`` bucket sizes resolve to for a model of ``parameters`` elements: that many, rounded up to a
    multiple of 4096 (DeepSpeed asserts ``allgather_bucket_size`` alignment), at most DeepSpeed's default."""
    return min(DEEPSPEED_DEFAULT_BUCKET, -(-parameters // 4096) * 4096)


def load_ds_config(
    path: str | Path | None,
    cfg: Config,
    *,
    world_size: int = 1,
    device_type: str = "cpu",
    auto_precision: str = "fp32",
) -> DSConfig:
    """Read and resolve a ds_config file; ``None`` means one process (or DDP when WORLD_SIZE > 1)."""
    raw = read_json(path, what="ds_config") if path else {}
    return resolve_ds_config(
        raw,
        cfg,
        world_size=world_size,
        device_type=device_type,
        auto_precision=auto_precision,
        source=str(path) if path else "<none>",
    )
