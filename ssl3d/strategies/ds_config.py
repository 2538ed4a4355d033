"""The strategy preset: a ds_config JSON in DeepSpeed's own vocabulary, checked for every backend.

One vocabulary covers single-process, DDP, FSDP2, DeepSpeed ZeRO and fairscale runs. DeepSpeed itself silently
ignores a misspelled section (``zero_optimisation`` quietly means stage 0) and happily accepts batch sizes that
disagree with the training loop, so everything here is checked before any process group or engine exists: the
ZeRO, offload, bf16 and fp16 sections by DeepSpeed's own pydantic models (``deepspeed_schema``), the other sections
against the keys ssl3d reads, and all of it against the run config. Every problem is collected and raised as one
``ConfigError``.

ssl3d extensions (removed before the dict reaches DeepSpeed):

- ``"strategy"``: ``single | ddp | fsdp | deepspeed | fairscale``; default ``deepspeed`` when
  ``zero_optimization`` is present, else ``ddp`` (``single`` on one process);
- ``"fsdp"``: ``{"reshard_after_forward": true, "cpu_offload": false, "shard": "block" | "stage"}``;
- ``"gather_contrastive"``: gather contrastive embeddings from all ranks so the loss sees the global batch;
- any key starting with ``_`` is a comment.

``"auto"`` values are filled from the run config: micro batch = ``train.batch_size``, accumulation =
``train.grad_accum``, clipping = ``train.grad_clip``, ``bf16``/``fp16`` from ``train.precision``. An explicit value
that contradicts the run config is an error; ``"auto"`` in a ZeRO tuning knob means DeepSpeed's default, except for
the bucket sizes, where it means the model's parameter count (DeepSpeed's default 5e8 elements would allocate
1.9 GiB per bucket for a 19 M-parameter model).
"""

from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl3d.config import Config, ConfigError, read_json

BACKENDS = ("single", "ddp", "fsdp", "deepspeed", "fairscale")
NO_FP16 = ("fairscale",)  # backends without an fp16 loss scaler in ssl3d: "auto" means fp32 there on pre-Ampere GPUs
PRECISIONS = ("fp32", "bf16", "fp16")

# Top-level sections ssl3d understands. DeepSpeed knows more; those are refused rather than silently dropped.
TOP_LEVEL_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "zero_optimization",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "activation_checkpointing",
    "torch_autocast",
    "aio",
    "data_types",
    "steps_per_print",
    "wall_clock_breakdown",
    "optimizer",
    "scheduler",
    # ssl3d extensions
    "strategy",
    "fsdp",
    "gather_contrastive",
)
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
FSDP_KEYS = ("reshard_after_forward", "cpu_offload", "shard")
TORCH_AUTOCAST_KEYS = ("enabled", "dtype", "lower_precision_safe_modules")
# DeepSpeed's spellings of bf16 (its DtypeEnum); fp16 goes through the fp16 section, which scales the loss under ZeRO.
TORCH_AUTOCAST_BF16 = ("bf16", "bfloat16", "torch.bfloat16")
AIO_KEYS = ("block_size", "queue_depth", "intra_op_parallelism", "single_submit", "overlap_events", "use_gds")


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
class FSDPOptions:
    """FSDP2 (``fully_shard``) options; ``shard``: one FSDP unit per Swin block or per stage."""

    reshard_after_forward: bool = True
    cpu_offload: bool = False
    shard: str = "block"


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


def _did_you_mean(key: str, valid: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""


def _js(value: Any) -> str:
    return json.dumps(value, default=str)


def _check_keys(section: dict[str, Any], valid: tuple[str, ...], prefix: str, problems: list[str]) -> None:
    """Unknown keys -> one problem each, with a did-you-mean; keys starting with ``_`` are comments."""
    shown = [k for k in valid if k not in REFUSED_KEYS]
    for key in section:
        if key.startswith("_") or key in valid:
            continue
        if prefix:
            problems.append(f"{prefix}.{key}: unknown key; {_did_you_mean(key, shown)}valid keys: {', '.join(shown)}")
        else:
            problems.append(
                f"{key}: unknown section (DeepSpeed would silently ignore it); {_did_you_mean(key, shown)}"
                f"valid sections: {', '.join(shown)}"
            )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _resolve_count(raw: dict[str, Any], key: str, run_value: int, run_key: str, problems: list[str]) -> int:
    """An integer that repeats a run-config value: ``auto``/absent takes it, an explicit mismatch is an error."""
    value = raw.get(key, "auto")
    if value == "auto":
        return run_value
    if not _is_int(value) or value < 1:
        problems.append(f'{key}: got {_js(value)}, expected a positive integer or "auto" (= {run_key})')
        return run_value
    if value != run_value:
        problems.append(
            f'{key}: got {value} but {run_key} is {run_value}; write "auto" or set {run_key}={value} '
            f"(--set {run_key}={value})"
        )
    return value


def _resolve_precision(
    raw: dict[str, Any], run_precision: str, auto_precision: str, problems: list[str]
) -> tuple[str, dict[str, Any]]:
    """fp32/bf16/fp16 from the ``bf16``/``fp16`` sections and ``train.precision``; returns fp16 options too."""
    asked: dict[str, Any] = {}
    fp16_opts: dict[str, Any] = {}
    for name in ("bf16", "fp16"):
        section = raw.get(name)
        if section is None:
            asked[name] = "auto"
            continue
        if not isinstance(section, dict):
            problems.append(f'{name}: got {_js(section)}, expected an object like {{"enabled": "auto"}}')
            asked[name] = "auto"
            continue
        enabled = section.get("enabled", "auto")
        if enabled not in (True, False, "auto"):
            problems.append(f'{name}.enabled: got {_js(enabled)}, expected true, false or "auto" (= train.precision)')
            enabled = "auto"
        _check_deepspeed_section(section, name, problems)
        asked[name] = enabled
        if name == "fp16":
            fp16_opts = {k: v for k, v in section.items() if k != "enabled" and not k.startswith("_")}
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


def _resolve_torch_autocast(raw: dict[str, Any], run_precision: str, problems: list[str]) -> bool:
    """Whether DeepSpeed's ``torch_autocast`` section is on: fp32 weights and masters, the engine's forward under
    ``torch.autocast(bf16)``. The alternative to the bf16 section (a bf16 model with fp32 masters), for a user who
    wants LayerNorm and softmax in fp32 as under DDP's autocast, at the cost of fp32 weights and gradients."""
    section = raw.get("torch_autocast")
    if section is None:
        return False
    if not isinstance(section, dict):
        problems.append(f'torch_autocast: got {_js(section)}, expected an object like {{"enabled": true}}')
        return False
    _check_keys(section, TORCH_AUTOCAST_KEYS, "torch_autocast", problems)
    enabled = section.get("enabled", False)
    if not isinstance(enabled, bool):
        problems.append(f"torch_autocast.enabled: got {_js(enabled)}, expected true/false")
        return False
    dtype = section.get("dtype", "bfloat16")
    if dtype not in TORCH_AUTOCAST_BF16:
        problems.append(
            f'torch_autocast.dtype: got {_js(dtype)}, expected "bfloat16"; for fp16 use the fp16 section '
            '({"fp16": {"enabled": true}}), whose loss scaler works under every ZeRO stage'
        )
    if not enabled:
        return False
    for name in ("bf16", "fp16"):
        if isinstance(raw.get(name), dict) and raw[name].get("enabled") is True:
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


def _resolve_offload(zero: dict[str, Any], key: str, problems: list[str]) -> tuple[Offload, dict[str, Any] | None]:
    section = zero.get(key)
    if section is None:
        return Offload(), None
    where = f"zero_optimization.{key}"
    if not isinstance(section, dict):
        problems.append(f'{where}: got {_js(section)}, expected an object like {{"device": "cpu"}}')
        return Offload(), None
    device = section.get("device", "none")
    if device not in ("none", "cpu", "nvme"):
        problems.append(f'{where}.device: got {_js(device)}, expected "none", "cpu" or "nvme"')
        device = "none"
    pin = section.get("pin_memory", False)
    if not isinstance(pin, bool):
        problems.append(f"{where}.pin_memory: got {_js(pin)}, expected true/false")
        pin = False
    path = section.get("nvme_path")
    if device == "nvme" and not (isinstance(path, str) and path):
        problems.append(f'{where}.nvme_path: missing; "device": "nvme" needs the folder of a fast local NVMe drive')
    _check_deepspeed_section(section, where, problems)
    return Offload(device=device, pin_memory=pin, nvme_path=path), dict(section)


def _resolve_zero(raw: dict[str, Any], problems: list[str]) -> tuple[int, Offload, Offload, dict[str, Any] | None]:
    zero = raw.get("zero_optimization")
    if zero is None:
        return 0, Offload(), Offload(), None
    if not isinstance(zero, dict):
        problems.append(f'zero_optimization: got {_js(zero)}, expected an object like {{"stage": 2}}')
        return 0, Offload(), Offload(), None
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        problems.append(f"zero_optimization.stage: got {_js(stage)}, expected 0, 1, 2 or 3")
        stage = 0
    off_opt, off_opt_raw = _resolve_offload(zero, "offload_optimizer", problems)
    off_par, off_par_raw = _resolve_offload(zero, "offload_param", problems)
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
    for key, value in zero.items():
        if key.startswith("_"):
            continue
        if value == "auto":
            if key in ZERO_AUTO_KNOBS:
                continue  # DeepSpeed's default
            problems.append(f'zero_optimization.{key}: "auto" is only allowed for {", ".join(ZERO_AUTO_KNOBS)}')
            continue
        if key in ZERO_AUTO_KNOBS and not (_is_num(value) and value >= 0):
            problems.append(f'zero_optimization.{key}: got {_js(value)}, expected a non-negative number or "auto"')
            continue
        out[key] = value
    for key, section in (("offload_optimizer", off_opt_raw), ("offload_param", off_par_raw)):
        if section is not None:
            out[key] = {k: v for k, v in section.items() if not k.startswith("_")}
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
        if key.startswith("_") or key in valid or key in reported:
            continue
        reported.add(key)
        if key in deprecated:
            problems.append(f"{where}.{key}: deprecated by DeepSpeed; use '{deprecated[key]}' instead")
        else:
            _check_keys({key: None}, valid, where, problems)
    for key in schema.boolean_keys(where):
        if key in section and key not in reported and not isinstance(section[key], bool) and section[key] != "auto":
            problems.append(f"{where}.{key}: got {_js(section[key])}, expected true/false")
            reported.add(key)
    values = {
        k: v
        for k, v in section.items()
        if not k.startswith("_") and k not in reported and v != "auto" and k not in schema.NESTED
    }
    problems += schema.value_problems(where, values)


def _check_activation_checkpointing(section: dict[str, Any]) -> list[str]:
    """The memory module's parser: it knows ssl3d's policy keys and DeepSpeed's own."""
    from ssl3d.memory.activation_checkpointing import CheckpointPolicy

    try:
        CheckpointPolicy.from_dict({k: v for k, v in section.items() if not k.startswith("_")})
    except ConfigError as exc:
        return list(exc.problems)
    return []


def _resolve_fsdp(raw: dict[str, Any], problems: list[str]) -> FSDPOptions:
    section = raw.get("fsdp")
    if section is None:
        return FSDPOptions()
    if not isinstance(section, dict):
        problems.append(f'fsdp: got {_js(section)}, expected an object like {{"shard": "block"}}')
        return FSDPOptions()
    _check_keys(section, FSDP_KEYS, "fsdp", problems)
    opts = FSDPOptions()
    reshard = section.get("reshard_after_forward", opts.reshard_after_forward)
    if not isinstance(reshard, bool):
        problems.append(f"fsdp.reshard_after_forward: got {_js(reshard)}, expected true/false")
        reshard = True
    offload = section.get("cpu_offload", opts.cpu_offload)
    if not isinstance(offload, bool):
        problems.append(f"fsdp.cpu_offload: got {_js(offload)}, expected true/false")
        offload = False
    shard = section.get("shard", opts.shard)
    if shard not in ("block", "stage"):
        problems.append(
            f'fsdp.shard: got {_js(shard)}, expected "block" (one FSDP unit per Swin block) or "stage" (per stage)'
        )
        shard = "block"
    return FSDPOptions(reshard_after_forward=reshard, cpu_offload=offload, shard=shard)


def resolve_ds_config(
    raw: dict[str, Any],
    cfg: Config,
    *,
    world_size: int = 1,
    device_type: str = "cpu",
    auto_precision: str = "fp32",
    source: str = "<dict>",
) -> DSConfig:
    """Check a ds_config dict against DeepSpeed's models, ssl3d's keys and the run config; fill every ``"auto"``.

    ``auto_precision`` is what ``train.precision: "auto"`` means on this device (bf16 on recent GPUs, fp32 on
    the CPU). Raises one ``ConfigError`` listing every problem; each section is checked by its own function.
    """
    problems: list[str] = []
    raw = copy.deepcopy(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"ds_config {source}: expected a JSON object at the top level")
    _check_top_level(raw, problems)
    strategy = _resolve_backend(raw, world_size, problems)
    micro, accum, tbs = _resolve_batch(raw, cfg, world_size, problems)
    clip = _resolve_clipping(raw, cfg, problems)
    notes: list[str] = []
    if auto_precision == "fp16" and strategy in NO_FP16:
        notes.append(
            f'precision "auto": fp32 (this GPU has no native bf16, and strategy "{strategy}" has no fp16 loss scaler '
            'in ssl3d; strategy "ddp", "fsdp" or "deepspeed" would train in fp16)'
        )
        auto_precision = "fp32"
    precision, fp16_opts = _resolve_precision(raw, cfg.train.precision, auto_precision, problems)
    torch_autocast = _resolve_torch_autocast(raw, cfg.train.precision, problems)
    if torch_autocast:
        precision = "bf16"
    _check_precision_support(raw, precision, strategy, device_type, problems)
    stage, off_opt, off_par, zero = _resolve_zero(raw, problems)
    if zero is not None and stage > 0:
        _fill_bucket_sizes(raw.get("zero_optimization") or {}, zero, cfg)
    _check_zero_backend(zero, stage, off_opt.enabled or off_par.enabled, off_opt.enabled, strategy, problems)
    if device_type == "cuda" and "nvme" in (off_opt.device, off_par.device):
        problems += _nvme_toolkit_problems()
    _check_deepspeed_extras(raw, strategy, precision, stage, problems)
    if "torch_autocast" in raw and strategy != "deepspeed":
        problems.append(
            f'torch_autocast: only DeepSpeed reads it, strategy is "{strategy}" (which autocasts from '
            "train.precision itself); remove it"
        )
    fsdp = _resolve_fsdp(raw, problems)
    if "fsdp" in raw and strategy != "fsdp":
        problems.append(f'fsdp: options for strategy "fsdp", but strategy is "{strategy}"; remove it or switch')
    ac = _resolve_activation_checkpointing(raw, problems)
    gather = raw.get("gather_contrastive", False)
    if not isinstance(gather, bool):
        problems.append(f"gather_contrastive: got {_js(gather)}, expected true/false")
        gather = False
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
        fsdp=fsdp,
        activation_checkpointing=ac,
        gather_contrastive=gather,
        torch_autocast=torch_autocast,
        notes=tuple(notes),
        fp16=fp16_opts,
        deepspeed=_deepspeed_dict(raw, micro, accum, tbs, clip, precision, fp16_opts, zero, torch_autocast),
        source=source,
    )


def _check_top_level(raw: dict[str, Any], problems: list[str]) -> None:
    _check_keys(raw, TOP_LEVEL_KEYS, "", problems)
    for key in ("optimizer", "scheduler"):
        if key in raw:
            problems.append(
                f"{key}: not allowed in a ds_config; ssl3d builds the optimizer and learning-rate schedule itself "
                f"from the run config's optim section (optim.name, optim.lr, optim.schedule, ...)"
            )


def _resolve_backend(raw: dict[str, Any], world_size: int, problems: list[str]) -> str:
    """``strategy``, or the backend the other sections imply (deepspeed with a ZeRO section, else ddp/single)."""
    implied = "deepspeed" if "zero_optimization" in raw else ("ddp" if world_size > 1 else "single")
    strategy = raw.get("strategy")
    if strategy is None:
        strategy = implied
    elif strategy not in BACKENDS:
        problems.append(
            f"strategy: got {_js(strategy)}; {_did_you_mean(str(strategy), BACKENDS)}valid: {', '.join(BACKENDS)}"
        )
        strategy = implied
    if strategy == "single" and world_size > 1:
        problems.append(
            f'strategy: "single" runs one process but WORLD_SIZE is {world_size}; use "ddp" (or fsdp/deepspeed)'
        )
    return strategy


def _resolve_batch(raw: dict[str, Any], cfg: Config, world_size: int, problems: list[str]) -> tuple[int, int, int]:
    """Micro batch, accumulation steps and global batch, each agreeing with the run config."""
    t = cfg.train
    micro = _resolve_count(raw, "train_micro_batch_size_per_gpu", t.batch_size, "train.batch_size", problems)
    accum = _resolve_count(raw, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum", problems)
    expected = micro * accum * world_size
    tbs = raw.get("train_batch_size", "auto")
    if tbs == "auto":
        tbs = expected
    elif not _is_int(tbs) or tbs < 1:
        problems.append(f'train_batch_size: got {_js(tbs)}, expected a positive integer or "auto"')
        tbs = expected
    elif tbs != expected:
        problems.append(
            f"train_batch_size: got {tbs}, expected train_micro_batch_size_per_gpu x gradient_accumulation_steps x "
            f'world size = {micro} x {accum} x {world_size} = {expected}; write "auto" or fix one of them'
        )
    return micro, accum, tbs


def _resolve_clipping(raw: dict[str, Any], cfg: Config, problems: list[str]) -> float | None:
    t = cfg.train
    clip_raw = raw.get("gradient_clipping", "auto")
    if clip_raw == "auto":
        return t.grad_clip
    if not _is_num(clip_raw) or clip_raw < 0:
        problems.append(f'gradient_clipping: got {_js(clip_raw)}, expected a norm >= 0 (0: off) or "auto"')
        return t.grad_clip
    clip = float(clip_raw) if clip_raw > 0 else None
    if clip != t.grad_clip:
        run = "null" if t.grad_clip is None else t.grad_clip
        fix = f"set train.grad_clip={clip}" if clip is not None else "set train.grad_clip=null"
        problems.append(f'gradient_clipping: got {_js(clip_raw)} but train.grad_clip is {run}; write "auto" or {fix}')
    return clip


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


def _check_deepspeed_extras(
    raw: dict[str, Any], strategy: str, precision: str, stage: int, problems: list[str]
) -> None:
    """DeepSpeed's smaller sections: flags, printing, gradient accumulation dtype, NVMe I/O."""
    for key in ("zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "wall_clock_breakdown"):
        if key in raw and not isinstance(raw[key], bool):
            problems.append(f"{key}: got {_js(raw[key])}, expected true/false")
    if "steps_per_print" in raw and not (_is_int(raw["steps_per_print"]) and raw["steps_per_print"] > 0):
        problems.append(f"steps_per_print: got {_js(raw['steps_per_print'])}, expected a positive integer")
    data_types = raw.get("data_types", {})
    if not isinstance(data_types, dict):
        problems.append(f'data_types: got {_js(data_types)}, expected an object like {{"grad_accum_dtype": "fp32"}}')
    else:
        _check_keys(data_types, ("grad_accum_dtype",), "data_types", problems)
        accum_dtype = data_types.get("grad_accum_dtype")
        if accum_dtype is not None and accum_dtype not in PRECISIONS:
            problems.append(
                f"data_types.grad_accum_dtype: got {_js(accum_dtype)}, expected one of {', '.join(PRECISIONS)}"
            )
        elif accum_dtype is not None and strategy != "deepspeed":
            problems.append(
                f'data_types.grad_accum_dtype: only DeepSpeed reads it, strategy is "{strategy}" (which accumulates '
                "gradients in fp32 anyway); remove it"
            )
        elif accum_dtype not in (None, precision) and stage == 0:
            problems.append(
                f'data_types.grad_accum_dtype: "{accum_dtype}" with {precision} parameters needs ZeRO stage 1 or more '
                "(DeepSpeed stage 0 accumulates in the parameters' dtype); set zero_optimization.stage to 1"
            )
    if "aio" in raw:
        if isinstance(raw["aio"], dict):
            _check_keys(raw["aio"], AIO_KEYS, "aio", problems)
        else:
            problems.append(f"aio: got {_js(raw['aio'])}, expected an object (DeepSpeed's NVMe I/O settings)")


def _resolve_activation_checkpointing(raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Stored without comments; ssl3d.memory parses and applies it."""
    ac = raw.get("activation_checkpointing", {})
    if not isinstance(ac, dict):
        problems.append(f"activation_checkpointing: got {_js(ac)}, expected an object")
        ac = {}
    problems += _check_activation_checkpointing(ac)
    return {k: v for k, v in ac.items() if not k.startswith("_")}


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
    ds: dict[str, Any] = {
        k: v for k, v in raw.items() if not k.startswith("_") and k not in SSL3D_KEYS and k not in ("bf16", "fp16")
    }
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = tbs
    ds["gradient_clipping"] = clip or 0.0
    ds["bf16"] = {
        **{k: v for k, v in raw.get("bf16", {}).items() if not k.startswith("_")},
        "enabled": precision == "bf16" and not torch_autocast,
    }
    ds["fp16"] = {**fp16_opts, "enabled": precision == "fp16"}
    if "torch_autocast" in raw:
        section = {k: v for k, v in raw["torch_autocast"].items() if not k.startswith("_")}
        ds["torch_autocast"] = {**section, "enabled": torch_autocast, "dtype": "bfloat16"}
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
