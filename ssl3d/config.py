"""One typed config tree for a run (pre-training, fine-tuning or probing).

Loaded from JSON plus dotted command-line overrides (``--set train.lr=1e-4``), validated before anything
heavy starts. Every problem is collected and reported at once, one line each, naming the dotted key, the
value and what would work.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import signal
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A user mistake in a config, ds_config or flag; ``problems`` holds one line per mistake."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class DatalistConfig:
    """One MONAI-style dataset JSON and the folder its relative ``image`` paths are resolved against."""

    json: str = ""
    root: str | None = None  # default: the folder holding the JSON file


@dataclass
class ModelConfig:
    feature_size: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 2
    in_channels: int = 1
    drop_path_rate: float = 0.0
    decoder: Literal["vae", "deconv", "large_kernel_deconv"] = "vae"
    # Reproduce MONAI < 1.5 patch-merging order, which the released model_swinvit.pt was trained with.
    legacy_patch_merging: bool = False
    # The reference's --use_checkpoint: checkpoint every Swin block and decoder stage (ssl3d's "full" policy) unless
    # the ds_config's activation_checkpointing section says otherwise.
    use_checkpoint: bool = False
    # Window attention through scaled_dot_product_attention in training too (MONAI uses it only without grad).
    fused_attention: bool = True
    # Regional torch.compile of the Swin blocks (ssl3d.model.compile): after checkpointing, before wrapping.
    compile: bool = False
    # Initialise from a model_swinvit.pt file or a reference / ssl3d checkpoint.
    init_weights: str | None = None


@dataclass
class DataConfig:
    datalists: list[DatalistConfig] = field(default_factory=list)  # empty: the built-in demo data
    roi: tuple[int, int, int] = (96, 96, 96)
    num_samples: int = 2  # random crops per volume (the reference's sw_batch_size)
    a_min: float = -1000.0
    a_max: float = 1000.0
    b_min: float = 0.0
    b_max: float = 1.0
    spacing: tuple[float, float, float] | None = None  # resample to this spacing (mm); None keeps voxels
    dataset: Literal["plain", "cache", "smart_cache", "persistent", "prepcache"] = "plain"
    cache_rate: float = 0.5
    cache_dir: str | None = (
        None  # on-disk caches (persistent, prepcache), shareable between runs; default <logdir>/cache
    )
    prepcache_storage: Literal["float16", "uint8"] = "float16"  # how the "prepcache" kind stores volumes
    num_workers: int = 4
    on_bad_volume: Literal["skip", "fail"] = "skip"  # missing/corrupt/2D/constant/tiny volumes
    min_size: int = 16  # voxels; a volume with a shorter axis is bad (larger ones below the ROI are padded)
    demo_dir: str | None = None  # where demo volumes are written; default <logdir>/../demo_data
    demo_volumes: int = 6


@dataclass
class SSLConfig:
    rotation_weight: float = 1.0
    contrastive_weight: float = 1.0
    reconstruction_weight: float = 1.0
    temperature: float = 0.5
    max_drop: float = 0.3  # fraction of voxels covered by cuboids, drawn uniformly in [0, max_drop]
    min_block: float = 0.05  # cuboid side, fraction of each axis
    max_block: float = 0.25
    contrastive_dim: int = 512
    # Views per forward/backward chunk with contrastive gradient caching (Gao et al., 2021): peak activation
    # memory is that of one chunk, the gradients those of the whole batch. 0: all views in one pass (reference).
    grad_cache_chunk: int = 0
    # MoCo-style queue of negatives: this many embeddings of earlier views (detached) as extra negatives in the
    # contrastive loss; holds negative_queue x contrastive_dim fp32 per rank. 0: off (the reference's loss).
    negative_queue: int = 0


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 4e-4
    weight_decay: float = 0.1
    momentum: float = 0.9
    schedule: Literal["warmup_cosine", "poly", "constant"] = "warmup_cosine"
    warmup_steps: int = 500
    poly_power: float = 0.9


@dataclass
class TrainConfig:
    batch_size: int = 2  # volumes per micro-batch per process
    grad_accum: int = 1
    num_steps: int = 100_000  # optimizer steps
    eval_num: int = 100  # validate every eval_num steps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_clip: float | None = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    logdir: str = "runs/ssl3d"
    log_every: int = 1
    resume: str | None = None  # a checkpoint file/folder, or "auto": the newest in logdir
    progress: bool = True
    max_val_batches: int | None = None  # None: the whole validation list
    keep_checkpoints: int = 2  # newest step folders kept (best/ is kept besides)
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row (each one is skipped)
    # Also write a checkpoint when this many minutes passed since the last one (besides every eval_num steps).
    checkpoint_every_minutes: float | None = None
    # Signals that make every rank finish its step, write a checkpoint and exit with code 4 (SLURM, Kubernetes and
    # spot instances send SIGTERM before killing; SLURM's --signal sends what it is told, e.g. USR1).
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # How long a collective waits for a lagging rank (torch's NCCL default is 10 minutes: less than a rank may spend
    # building its data cache before the first collective).
    collective_timeout_minutes: float = 30.0
    # GPU speed switches (no effect on the CPU): cuDNN picks the fastest convolution for the fixed crop size once;
    # TF32 matmuls and convolutions on Ampere and newer (fp32 runs and autocast's fp32 ops).
    cudnn_benchmark: bool = True
    allow_tf32: bool = True


@dataclass
class FinetuneConfig:
    """Supervised segmentation with MONAI's SwinUNETR (``ssl3d finetune``) or a frozen-encoder probe (``ssl3d probe``).

    The datalists' entries need a ``"label"``; ``data.roi`` and ``data.num_samples`` are the training crops (drawn by
    ``RandCropByPosNegLabeld``), validation runs ``sliding_window_inference`` over whole volumes.
    """

    task: Literal["finetune", "probe"] = "finetune"
    # model_swinvit.pt (its model_swinvit.json is read beside it), a run folder, a step folder, a reference
    # checkpoint; null or "none": random initialisation.
    init: str | None = None
    num_classes: int = 0  # output channels incl. background; 0: the size of the datalist's "labels" map
    labelled: float = 0  # N >= 1: the first N training cases in a seeded order; 0 < f < 1: that fraction; 0: all
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    pos_fraction: float = 0.5  # share of crops centred on a labelled voxel (RandCropByPosNegLabeld pos/(pos+neg))
    sw_batch_size: int = 2  # windows per forward in sliding_window_inference
    sw_overlap: float = 0.25


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ds_config: str | None = None  # strategy preset in DeepSpeed's JSON vocabulary; None: one process

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Loading: JSON -> dataclasses, with every type problem collected.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = f"{key}: got {json.dumps(value, default=str)}, expected {_type_name(tp)}"
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            sub: list[str] = []
            out = _convert(value, arg, key, sub)
            if not sub:
                return out
        problems.append(bad)
        return None
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {json.dumps(close[0])}?)" if close else ""
            problems.append(f"{bad}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            problems.append(bad)
            return None
        if len(args) != 2 or args[1] is not Ellipsis:
            if len(value) != len(args):
                problems.append(f"{key}: got {json.dumps(value)}, expected a list of {len(args)} numbers")
                return None
            return tuple(_convert(v, a, f"{key}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
        return tuple(_convert(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value))
    if origin is list:
        if not isinstance(value, list):
            problems.append(bad)
            return []
        return [_convert(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(bad)
            return tp()
        return _build(tp, value, key, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(bad)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append(bad)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(bad)
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(bad)
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"{dotted}: unknown key; {hint}valid keys: {', '.join(names)}")
            continue
        found: list[str] = []
        converted = _convert(value, hints[key], dotted, found)
        problems += found
        if found and not dataclasses.is_dataclass(hints[key]):
            continue  # keep the default, so the value checks still run on everything else
        kwargs[key] = converted
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not None or _optional(hints[k])})
    except TypeError as exc:  # pragma: no cover - defensive; types were checked above
        problems.append(f"{prefix or 'config'}: {exc}")
        return cls()


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (types.UnionType, typing.Union) and type(None) in typing.get_args(tp)


def config_from_dict(tree: dict[str, Any]) -> Config:
    """A Config from a saved ``to_dict()`` (a checkpoint's record); keys unknown to this version are dropped."""
    return _build(Config, tree, "", [])


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, value); the value is JSON when it parses, else a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value, for example --set train.num_steps=100")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _apply_override(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: cannot set a key below a non-object value")
    node[parts[-1]] = value


def read_json(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Read a JSON object, turning a missing file or a syntax error into a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file {p}: not found")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} file {p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {p}: expected a JSON object at the top level")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    check_files: bool = True,
) -> Config:
    """Build the config: defaults < JSON file < overrides; raise ConfigError with every problem found."""
    tree: dict[str, Any] = read_json(path) if path else {}
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    for key, value in (overrides or {}).items():
        _apply_override(tree, key, value)
    problems: list[str] = []
    cfg = _build(Config, tree, "", problems)
    problems += validate(cfg, check_files=check_files)
    if problems:
        raise ConfigError(problems)
    return cfg


def roi_problems(roi: Sequence[int], key: str) -> list[str]:
    """The crop-size rules, one line per broken rule (the run config and the memory tools share them)."""
    p = []
    for i, r in enumerate(roi):
        if r <= 0 or r % 32:
            p.append(
                f"{key}[{i}]: got {r}, expected a positive multiple of 32 "
                "(patch 2 and four 2x mergings), e.g. 64, 96, 128"
            )
    if all(r > 0 and r % 32 == 0 for r in roi) and math.prod(roi) < 2 * 32**3:
        p.append(
            f"{key}: got {list(roi)}, expected at least 2 tokens at the last stage (ROI/32 per axis), "
            "since the contrastive head reads token 1; e.g. [32, 64, 64]"
        )
    if roi[1] != roi[2]:
        p.append(
            f"{key}: got {list(roi)}, expected roi[1] == roi[2] "
            "(the rotation task turns crops by 90 degrees in that plane, which must keep their shape)"
        )
    return p


def compile_problem(device: str) -> str | None:
    """Why ``model.compile`` cannot run on ``device`` ("auto" counts as the CPU) here, or None: inductor writes C++
    for the CPU; on CUDA, Triton builds its launchers with a C compiler."""
    import shutil

    if device in ("cpu", "auto"):
        if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            return (
                "model.compile: true needs a C++ compiler for torch.compile on the CPU (no c++, g++ or clang++ "
                "found); install one (Debian: apt install g++) or set model.compile=false"
            )
    elif not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        return (
            "model.compile: true needs a C compiler for Triton's kernels on the GPU (no cc, gcc or clang found); "
            "install one or set model.compile=false"
        )
    return None


def validate(cfg: Config, check_files: bool = True) -> list[str]:
    """Value checks that types alone cannot express; returns one line per problem."""
    p: list[str] = []
    m, d, s, o, t = cfg.model, cfg.data, cfg.ssl, cfg.optim, cfg.train
    n_stages = len(m.depths)
    if n_stages != 4:
        p.append(f"model.depths: got {list(m.depths)}, expected 4 stages (the Swin UNETR encoder has 4)")
    if len(m.num_heads) != n_stages:
        p.append(f"model.num_heads: got {len(m.num_heads)} entries, expected one per stage ({n_stages})")
    if m.feature_size <= 0 or m.feature_size % 12:
        p.append(f"model.feature_size: got {m.feature_size}, expected a positive multiple of 12 (e.g. 12, 24, 48)")
    for i, h in enumerate(m.num_heads):
        if h <= 0 or (m.feature_size * 2**i) % h:
            p.append(f"model.num_heads[{i}]: got {h}, expected a divisor of the stage width {m.feature_size * 2**i}")
    if m.patch_size != 2:
        p.append(f"model.patch_size: got {m.patch_size}, expected 2 (the decoders upsample by 32 = 2 x 2^4)")
    if m.window_size < 1:
        p.append(f"model.window_size: got {m.window_size}, expected a positive integer (reference: 7)")
    if m.in_channels < 1:
        p.append(f"model.in_channels: got {m.in_channels}, expected at least 1 (CT: 1)")
    if not 0.0 <= m.drop_path_rate < 1.0:
        p.append(f"model.drop_path_rate: got {m.drop_path_rate}, expected a value in [0, 1)")
    if m.compile and (problem := compile_problem(t.device)):
        p.append(problem)
    if m.init_weights and check_files and not Path(m.init_weights).exists():
        p.append(f"model.init_weights: {m.init_weights} not found; expected a weight file or a checkpoint folder")
    p += roi_problems(d.roi, "data.roi")
    if d.num_samples < 1:
        p.append(f"data.num_samples: got {d.num_samples}, expected at least 1")
    if d.a_max <= d.a_min:
        p.append(f"data.a_max: got {d.a_max}, expected a value above data.a_min ({d.a_min})")
    if d.spacing is not None and any(v <= 0 for v in d.spacing):
        p.append(f"data.spacing: got {list(d.spacing)}, expected three positive spacings in mm")
    if not 0.0 < d.cache_rate <= 1.0:
        p.append(f"data.cache_rate: got {d.cache_rate}, expected a value in (0, 1]")
    if d.min_size < 1:
        p.append(f"data.min_size: got {d.min_size}, expected at least 1 voxel")
    if d.num_workers < 0:
        p.append(f"data.num_workers: got {d.num_workers}, expected 0 or more")
    if d.demo_volumes < 2:
        p.append(f"data.demo_volumes: got {d.demo_volumes}, expected at least 2 (one for validation)")
    for i, dl in enumerate(d.datalists):
        if not dl.json:
            p.append(f"data.datalists[{i}].json: missing; expected the path of a dataset JSON file")
        elif check_files and not Path(dl.json).is_file():
            p.append(f"data.datalists[{i}].json: file {dl.json} not found")
        if dl.root and check_files and not Path(dl.root).is_dir():
            p.append(f"data.datalists[{i}].root: folder {dl.root} not found")
    for name in ("rotation_weight", "contrastive_weight", "reconstruction_weight"):
        if getattr(s, name) < 0:
            p.append(f"ssl.{name}: got {getattr(s, name)}, expected 0 or more")
    if s.temperature <= 0:
        p.append(f"ssl.temperature: got {s.temperature}, expected a positive number (reference: 0.5)")
    if s.grad_cache_chunk < 0:
        p.append(f"ssl.grad_cache_chunk: got {s.grad_cache_chunk}, expected 0 (off) or the views per chunk (>= 1)")
    if s.negative_queue < 0:
        p.append(f"ssl.negative_queue: got {s.negative_queue}, expected 0 (off) or the queued negatives (>= 1)")
    if s.contrastive_dim < 1:
        p.append(f"ssl.contrastive_dim: got {s.contrastive_dim}, expected at least 1 (reference: 512)")
    if not 0.0 <= s.max_drop <= 1.0:
        p.append(f"ssl.max_drop: got {s.max_drop}, expected a fraction in [0, 1]")
    if not 0.0 < s.min_block <= s.max_block <= 1.0:
        p.append(f"ssl.min_block/max_block: got {s.min_block}/{s.max_block}, expected 0 < min_block <= max_block <= 1")
    if o.lr <= 0:
        p.append(f"optim.lr: got {o.lr}, expected a positive learning rate")
    if o.weight_decay < 0:
        p.append(f"optim.weight_decay: got {o.weight_decay}, expected 0 or more")
    if not 0.0 <= o.momentum < 1.0:
        p.append(f"optim.momentum: got {o.momentum}, expected a value in [0, 1) (reference: 0.9)")
    if o.poly_power <= 0:
        p.append(f"optim.poly_power: got {o.poly_power}, expected a positive exponent (reference: 0.9)")
    if o.warmup_steps < 0:
        p.append(f"optim.warmup_steps: got {o.warmup_steps}, expected 0 or more")
    if t.batch_size < 1:
        p.append(f"train.batch_size: got {t.batch_size}, expected at least 1")
    if t.grad_accum < 1:
        p.append(f"train.grad_accum: got {t.grad_accum}, expected at least 1")
    if t.num_steps < 1:
        p.append(f"train.num_steps: got {t.num_steps}, expected at least 1")
    if t.eval_num < 1:
        p.append(f"train.eval_num: got {t.eval_num}, expected at least 1")
    if t.keep_checkpoints < 1:
        p.append(f"train.keep_checkpoints: got {t.keep_checkpoints}, expected at least 1")
    if not t.collective_timeout_minutes > 0:
        p.append(
            f"train.collective_timeout_minutes: got {t.collective_timeout_minutes}, expected a positive number of "
            "minutes (default 30)"
        )
    if t.max_bad_steps < 1:
        p.append(f"train.max_bad_steps: got {t.max_bad_steps}, expected at least 1")
    if t.log_every < 1:
        p.append(f"train.log_every: got {t.log_every}, expected at least 1")
    if t.max_val_batches is not None and t.max_val_batches < 1:
        p.append(f"train.max_val_batches: got {t.max_val_batches}, expected at least 1 or null (all)")
    if check_files and Path(t.logdir).exists() and not Path(t.logdir).is_dir():
        p.append(f"train.logdir: {t.logdir} is a file, not a folder; expected a (new or existing) folder")
    if t.checkpoint_every_minutes is not None and t.checkpoint_every_minutes <= 0:
        p.append(
            f"train.checkpoint_every_minutes: got {t.checkpoint_every_minutes}, expected a positive number or null"
        )
    for i, name in enumerate(t.preempt_signals):
        if name in ("SIGKILL", "SIGSTOP") or not isinstance(getattr(signal, str(name), None), signal.Signals):
            p.append(
                f"train.preempt_signals[{i}]: got {json.dumps(name)}, expected a signal name that can be caught, "
                'e.g. "SIGTERM", "SIGUSR1", "SIGUSR2"'
            )
    if t.grad_clip is not None and t.grad_clip <= 0:
        p.append(f"train.grad_clip: got {t.grad_clip}, expected a positive norm or null")
    if t.resume and t.resume != "auto" and check_files and not Path(t.resume).exists():
        p.append(f'train.resume: {t.resume} not found; expected a checkpoint file or folder, or "auto"')
    if cfg.ds_config and check_files and not Path(cfg.ds_config).is_file():
        p.append(f"ds_config: file {cfg.ds_config} not found")
    p += _validate_finetune(cfg.finetune, check_files)
    return p


def _validate_finetune(f: FinetuneConfig, check_files: bool) -> list[str]:
    p: list[str] = []
    if f.init and f.init != "none" and check_files and not Path(f.init).exists():
        p.append(f'finetune.init: {f.init} not found; expected model_swinvit.pt, a run or checkpoint folder, or "none"')
    if f.num_classes < 0 or f.num_classes == 1:
        p.append(
            f"finetune.num_classes: got {f.num_classes}, expected 0 (from the datalist) or at least 2 (with background)"
        )
    if f.labelled < 0 or (f.labelled >= 1 and not float(f.labelled).is_integer()):
        p.append(
            f"finetune.labelled: got {f.labelled}, expected a whole number of cases, a fraction in (0, 1), or 0 (all)"
        )
    if f.dice_weight < 0 or f.ce_weight < 0 or f.dice_weight + f.ce_weight == 0:
        p.append(
            f"finetune.dice_weight/ce_weight: got {f.dice_weight}/{f.ce_weight}, expected non-negative, not both 0"
        )
    if not 0.0 <= f.pos_fraction <= 1.0:
        p.append(f"finetune.pos_fraction: got {f.pos_fraction}, expected a fraction in [0, 1]")
    if f.sw_batch_size < 1:
        p.append(f"finetune.sw_batch_size: got {f.sw_batch_size}, expected at least 1")
    if not 0.0 <= f.sw_overlap < 1.0:
        p.append(f"finetune.sw_overlap: got {f.sw_overlap}, expected a fraction in [0, 1)")
    return p
