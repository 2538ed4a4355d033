"""One typed config tree for a run (pre-training, fine-tuning or probing).

Loaded from JSON plus dotted command-line overrides (``--set train.lr=1e-4``), validated before anything
heavy starts. The tree is a set of pydantic models: each key's type, default, limits and documentation are its
field (``docs/config.md`` is generated from them). pydantic checks types strictly (JSON's ``true`` is no
integer); ``problem_lines`` turns its errors into ssl3d's one line per problem, naming the dotted key, the value
and what would work; ``validate`` adds the rules that span keys or touch files. Every problem is reported at once.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import shutil
import signal
import types
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A user mistake in a config, ds_config or flag; ``problems`` holds one line per mistake."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


# A whole number; 2.0 (what JSON tools and ``--set x=2e3`` write) counts as one, 2.5 does not.
Int = Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)]
Triple = Annotated[tuple[Int, ...], annotated_types.Len(3, 3)]
Spacing = Annotated[tuple[float, ...], annotated_types.Len(3, 3)]


def key(default: Any, doc: str, expect: str | None = None, **limits: Any) -> Any:
    """A config key: default, documentation and limits (``ge``, ``gt``, ``le``, ``lt``); ``expect`` says what
    would work when a limit is broken (derived from the limits when not given)."""
    extra = {"expect": expect} if expect else None
    if isinstance(default, list | BaseModel):  # a fresh one for every config
        return Field(default_factory=lambda: copy.deepcopy(default), description=doc, json_schema_extra=extra, **limits)
    return Field(default, description=doc, json_schema_extra=extra, **limits)


class Section(BaseModel):
    """A part of the config tree: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


with warnings.catch_warnings():  # the key is called "json" in MONAI's vocabulary; BaseModel.json is deprecated anyway
    warnings.filterwarnings("ignore", message='Field name "json"')

    class DatalistConfig(Section):
        """One MONAI-style dataset JSON and the folder its relative ``image`` paths are resolved against."""

        json: str = key("", "path of a dataset JSON file (the reference's lists work unchanged)")
        root: str | None = key(None, "folder the list's relative paths start from; default: the JSON's folder")


class ModelConfig(Section):
    """The Swin UNETR encoder (MONAI's ``SwinTransformer``) and the pretext heads."""

    feature_size: Int = key(48, "channels of the first stage; a positive multiple of 12")
    depths: tuple[Int, ...] = key((2, 2, 2, 2), "Swin blocks per stage (4 stages)")
    num_heads: tuple[Int, ...] = key((3, 6, 12, 24), "attention heads per stage, each a divisor of its width")
    window_size: Int = key(7, "attention window in tokens", "a positive integer (reference: 7)", ge=1)
    patch_size: Int = key(2, "patch embedding stride; 2 (the decoders upsample by 32)")
    in_channels: Int = key(1, "input channels", "at least 1 (CT: 1)", ge=1)
    drop_path_rate: float = key(0.0, "stochastic depth rate", ge=0, lt=1)
    decoder: Literal["vae", "deconv", "large_kernel_deconv"] = key("vae", "the reconstruction head's decoder")
    legacy_patch_merging: bool = key(
        False, "MONAI < 1.5 patch-merging order, which the released model_swinvit.pt was trained with"
    )
    use_checkpoint: bool = key(
        False,
        "the reference's --use_checkpoint: checkpoint every Swin block and decoder stage (policy `full`) unless the "
        "ds_config's activation_checkpointing section says otherwise",
    )
    fused_attention: bool = key(True, "window attention through scaled_dot_product_attention in training too")
    compile: bool = key(False, "regional torch.compile of the Swin blocks (after checkpointing, before wrapping)")
    init_weights: str | None = key(None, "initialise from a model_swinvit.pt file or a reference / ssl3d checkpoint")


class DataConfig(Section):
    """Datalists, preprocessing (the reference's chain) and the dataset kind."""

    datalists: list[DatalistConfig] = key([], "dataset JSON files; empty: the built-in demo data")
    roi: Triple = key((96, 96, 96), "crop size in voxels: multiples of 32, roi[1] == roi[2]")
    num_samples: Int = key(2, "random crops per volume (the reference's sw_batch_size)", ge=1)
    a_min: float = key(-1000.0, "intensity (HU) mapped to b_min")
    a_max: float = key(1000.0, "intensity (HU) mapped to b_max; above a_min")
    b_min: float = key(0.0, "output intensity of a_min")
    b_max: float = key(1.0, "output intensity of a_max")
    spacing: Spacing | None = key(None, "resample to this spacing (mm); null keeps the voxels")
    dataset: Literal["plain", "cache", "smart_cache", "persistent", "prepcache"] = key("plain", "dataset kind")
    cache_rate: float = key(0.5, "share of volumes the cache and smart_cache kinds hold", gt=0, le=1)
    cache_dir: str | None = key(None, "on-disk caches (persistent, prepcache), shareable; default <logdir>/cache")
    prepcache_storage: Literal["float16", "uint8"] = key("float16", "how the prepcache kind stores volumes")
    num_workers: Int = key(4, "loader worker processes", ge=0)
    on_bad_volume: Literal["skip", "fail"] = key("skip", "missing/corrupt/2D/constant/tiny volumes: skip or stop")
    min_size: Int = key(16, "a volume with a shorter axis is bad (larger ones below the ROI are padded)", ge=1)
    demo_dir: str | None = key(None, "where the demo volumes are written; default <logdir>/../demo_data")
    demo_volumes: Int = key(6, "demo volumes written", "at least 2 (one for validation)", ge=2)


class SSLConfig(Section):
    """The three pretext tasks and their losses."""

    rotation_weight: float = key(1.0, "weight of the rotation loss", ge=0)
    contrastive_weight: float = key(1.0, "weight of the contrastive loss", ge=0)
    reconstruction_weight: float = key(1.0, "weight of the masked-volume reconstruction loss", ge=0)
    temperature: float = key(0.5, "contrastive temperature", "a positive number (reference: 0.5)", gt=0)
    max_drop: float = key(0.3, "share of voxels masked, drawn in [0, max_drop]", "a fraction in [0, 1]", ge=0, le=1)
    min_block: float = key(0.05, "masked cuboid side, fraction of each axis (smallest)")
    max_block: float = key(0.25, "masked cuboid side, fraction of each axis (largest)")
    contrastive_dim: Int = key(512, "contrastive embedding size", "at least 1 (reference: 512)", ge=1)
    grad_cache_chunk: Int = key(
        0,
        "views per forward/backward chunk with contrastive gradient caching: the activation memory of one chunk, "
        "the gradients of the whole batch; 0: all views in one pass (reference)",
        "0 (off) or the views per chunk (>= 1)",
        ge=0,
    )
    negative_queue: Int = key(
        0,
        "MoCo-style queue: this many embeddings of earlier views (detached) as extra negatives, "
        "negative_queue x contrastive_dim fp32 per rank; 0: off (the reference's loss)",
        "0 (off) or the queued negatives (>= 1)",
        ge=0,
    )


class OptimConfig(Section):
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "adam", "sgd"] = key("adamw", "optimizer")
    lr: float = key(4e-4, "peak learning rate", "a positive learning rate", gt=0)
    weight_decay: float = key(0.1, "weight decay", ge=0)
    momentum: float = key(0.9, "SGD momentum", "a value in [0, 1) (reference: 0.9)", ge=0, lt=1)
    schedule: Literal["warmup_cosine", "poly", "constant"] = key("warmup_cosine", "learning-rate schedule")
    warmup_steps: Int = key(500, "linear warm-up steps (warmup_cosine)", ge=0)
    poly_power: float = key(0.9, "exponent of the poly schedule", "a positive exponent (reference: 0.9)", gt=0)


class TrainConfig(Section):
    """The loop: steps, precision, device, logging, checkpoints, preemption."""

    batch_size: Int = key(2, "volumes per micro-batch per process", ge=1)
    grad_accum: Int = key(1, "micro-batches per optimizer step", ge=1)
    num_steps: Int = key(100_000, "optimizer steps", ge=1)
    eval_num: Int = key(100, "validate (and checkpoint) every eval_num steps", ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = key("auto", "auto: bf16 on recent GPUs, fp32 on the CPU")
    grad_clip: float | None = key(None, "gradient norm clipping", "a positive norm or null", gt=0)
    seed: Int = key(0, "random seed")
    device: Literal["auto", "cpu", "cuda"] = key("auto", "auto: CUDA when there is a GPU")
    logdir: str = key("runs/ssl3d", "run folder: TensorBoard logs, checkpoints, images")
    log_every: Int = key(1, "log training scalars every log_every steps", ge=1)
    resume: str | None = key(None, 'a checkpoint file/folder, or "auto": the newest in logdir')
    progress: bool = key(True, "progress bar")
    max_val_batches: Int | None = key(
        None, "validation batches; null: the whole list", "at least 1 or null (all)", ge=1
    )
    keep_checkpoints: Int = key(2, "newest step folders kept (best/ is kept besides)", ge=1)
    max_bad_steps: Int = key(5, "stop after this many non-finite steps in a row (each one is skipped)", ge=1)
    checkpoint_every_minutes: float | None = key(
        None, "also checkpoint when this many minutes passed", "a positive number or null", gt=0
    )
    preempt_signals: list[str] = key(
        ["SIGTERM", "SIGUSR1"], "signals that make every rank finish its step, checkpoint and exit with code 4"
    )
    collective_timeout_minutes: float = key(
        30.0,
        "how long a collective waits for a lagging rank (NCCL's 10-minute default is less than a cache build)",
        "a positive number of minutes (default 30)",
        gt=0,
    )
    cudnn_benchmark: bool = key(True, "cuDNN picks the fastest convolution for the fixed crop size once (GPU)")
    allow_tf32: bool = key(True, "TF32 matmuls and convolutions on Ampere and newer (GPU)")


class FinetuneConfig(Section):
    """Supervised segmentation with MONAI's SwinUNETR (``ssl3d finetune``) or a frozen-encoder probe (``ssl3d probe``).

    The datalists' entries need a ``"label"``; ``data.roi`` and ``data.num_samples`` are the training crops (drawn by
    ``RandCropByPosNegLabeld``), validation runs ``sliding_window_inference`` over whole volumes.
    """

    task: Literal["finetune", "probe"] = key("finetune", "train the whole SwinUNETR, or a probe on a frozen encoder")
    init: str | None = key(
        None, 'model_swinvit.pt, a run, step or reference checkpoint; null or "none": random initialisation'
    )
    num_classes: Int = key(0, "output channels incl. background; 0: the size of the datalist's labels map")
    labelled: float = key(0, "N >= 1: the first N training cases (seeded order); 0 < f < 1: that share; 0: all")
    dice_weight: float = key(1.0, "weight of the Dice loss")
    ce_weight: float = key(1.0, "weight of the cross-entropy loss")
    pos_fraction: float = key(0.5, "share of crops centred on a labelled voxel", "a fraction in [0, 1]", ge=0, le=1)
    sw_batch_size: Int = key(2, "windows per forward in sliding-window validation", ge=1)
    sw_overlap: float = key(0.25, "overlap of the sliding windows", "a fraction in [0, 1)", ge=0, lt=1)


class Config(Section):
    """A run: every key optional, the defaults are the reference's."""

    model: ModelConfig = key(ModelConfig(), "the encoder")
    data: DataConfig = key(DataConfig(), "data")
    ssl: SSLConfig = key(SSLConfig(), "pretext tasks")
    optim: OptimConfig = key(OptimConfig(), "optimizer")
    train: TrainConfig = key(TrainConfig(), "the loop")
    finetune: FinetuneConfig = key(FinetuneConfig(), "fine-tuning and probing")
    ds_config: str | None = key(None, "strategy preset in DeepSpeed's JSON vocabulary; null: one process")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


# ---------------------------------------------------------------------------------------------------------
# pydantic's errors as ssl3d's lines


def type_name(tp: Any) -> str:
    """What a value of type ``tp`` looks like in JSON, for "expected ..." messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_name(a) for a in args)
    if origin in (tuple, list):
        element = (
            typing.get_args(args[0])[0] if args and typing.get_origin(args[0]) is Annotated else args[:1] and args[0]
        )
        plural = {int: "integers", float: "numbers", str: "strings"}.get(element, "items")
        return f"a list of {'objects' if 'object' in type_name(args[0]) else plural}" if args else "a list"
    if (isinstance(tp, type) and issubclass(tp, BaseModel)) or origin is dict:
        return "an object"
    if tp is Any:
        return "any value"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "null"}.get(
        tp, str(tp)
    )


def _limits_text(metadata: Sequence[Any]) -> str:
    get = lambda m, k: m.get(k) if isinstance(m, dict) else getattr(m, k, None)  # noqa: E731
    b = {k: get(m, k) for m in metadata for k in ("ge", "gt", "le", "lt") if get(m, k) is not None}
    if (lo := b.get("ge", b.get("gt"))) is not None and (hi := b.get("le", b.get("lt"))) is not None:
        return f"a value in {'[' if 'ge' in b else '('}{lo}, {hi}{']' if 'le' in b else ')'}"
    if "gt" in b:
        return "a positive number" if b["gt"] == 0 else f"a value above {b['gt']}"
    return "0 or more" if b.get("ge") == 0 else f"at least {b.get('ge')}"


def _walk(root: type[BaseModel], loc: Sequence[str | int]) -> tuple[Any, Any, tuple[str | int, ...]]:
    """(the field info, the type, the key path) at pydantic's ``loc`` below ``root``; unions with null are looked
    through, and the member names pydantic adds below other unions are dropped from the path."""
    tp: Any = root
    info, path, parts = None, [], list(loc)
    while parts:
        part = parts.pop(0)
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (types.UnionType, typing.Union):
            if len(members) > 1:
                tp = Any  # ``part`` names the member pydantic tried: not a key
                continue
            tp = members[0]
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        path.append(part)
        if isinstance(part, int) or not (isinstance(tp, type) and issubclass(tp, BaseModel)):
            tp = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        else:
            info = tp.model_fields.get(part)
            tp = info.annotation if info else Any
    return info, tp, tuple(path)


def dotted(loc: Sequence[str | int], prefix: str = "") -> str:
    """``("data", "datalists", 0, "json")`` -> ``data.datalists[0].json``."""
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def did_you_mean(word: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""


def _position(tree: Any, loc: Sequence[str | int]) -> tuple[int, ...]:
    """Where ``loc`` sits in the input, so problems are listed in the order the file has them."""
    out = []
    for part in loc:
        keys = list(tree) if isinstance(tree, dict) else list(range(len(tree))) if isinstance(tree, list) else []
        out.append(keys.index(part) if part in keys else len(keys))
        tree = tree[part] if part in keys else None
    return tuple(out)


LIMITS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def problem_lines(exc: ValidationError, root: type[BaseModel], tree: Any, prefix: str = "") -> list[str]:
    """One line per key with a problem in the input ``tree``: the dotted key, the value and what would work."""
    by_key: dict[tuple[str | int, ...], list[dict[str, Any]]] = {}
    for err in exc.errors():
        by_key.setdefault(_walk(root, err["loc"])[2], []).append(err)
    lines = []
    for loc in sorted(by_key, key=lambda k: _position(tree, k)):
        errs = by_key[loc]
        err = next((e for e in errs if e["type"] in LIMITS), errs[0])  # a union's member that got the type right
        kind, where, got = err["type"], dotted(loc, prefix), json.dumps(err.get("input"), default=str)
        info, tp, _ = _walk(root, loc)
        if kind == "extra_forbidden":
            model = _section_model(_walk(root, loc[:-1])[1]) if loc[:-1] else root
            names = list(model.model_fields) if model else []
            lines.append(f"{where}: unknown key; {did_you_mean(str(loc[-1]), names)}valid keys: {', '.join(names)}")
        elif kind in ("too_short", "too_long"):
            if not any(len(k) > len(loc) and k[: len(loc)] == loc for k in by_key):  # else a bad element says it
                n = err["ctx"]["min_length" if kind == "too_short" else "max_length"]
                lines.append(f"{where}: got {got}, expected a list of {n} numbers")
        elif kind in LIMITS and info is not None:
            expect = (info.json_schema_extra or {}).get("expect") or _limits_text(info.metadata or [err["ctx"]])
            lines.append(f"{where}: got {got}, expected {expect}")
        else:
            literals = [a for a in (tp, *typing.get_args(tp)) if typing.get_origin(a) is Literal]
            hint = did_you_mean(str(err.get("input")), [str(o) for lit in literals for o in typing.get_args(lit)])
            lines.append(f"{where}: got {got}, expected {type_name(tp)}" + (f" ({hint.strip()})" if hint else ""))
    return lines


def _without(tree: dict[str, Any], loc: Sequence[str | int]) -> None:
    """Drop the key an error points at (the innermost named key), so the rest can still be checked."""
    last = max((i for i, p in enumerate(loc) if isinstance(p, str)), default=-1)
    node: Any = tree
    for part in loc[:last]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return
    if last >= 0 and isinstance(node, dict):
        node.pop(loc[last], None)


def checked(root: type[BaseModel], tree: dict[str, Any], prefix: str = "") -> tuple[Any, list[str]]:
    """``root`` built from the JSON-like ``tree`` (strict types), and one line per problem; keys with a problem
    fall back to their defaults so the checks across keys still run on everything else."""
    tree = json.loads(json.dumps(tree, default=str))
    problems: list[str] = []
    for _ in range(4):
        try:
            return root.model_validate_json(json.dumps(tree), strict=True), problems
        except ValidationError as exc:
            problems += problem_lines(exc, root, tree, prefix)
            for err in exc.errors():
                _without(tree, _walk(root, err["loc"])[2])
    return root(), problems  # pragma: no cover - each round removes what failed


def config_from_dict(tree: dict[str, Any]) -> Config:
    """A Config from a saved ``to_dict()`` (a checkpoint's record); keys unknown to this version are dropped."""
    return checked(Config, tree)[0]


def _section_model(tp: Any) -> type[BaseModel] | None:
    args = [a for a in (tp, *typing.get_args(tp)) if isinstance(a, type) and issubclass(a, BaseModel)]
    return args[0] if args else None


def key_reference(root: type[BaseModel] | None = None, title: str = "Run-config reference") -> str:
    """Every key of ``root`` (default: the run config) with its type, default and documentation, as Markdown: one
    table per section. ``docs/config.md`` is this page; a test keeps it in sync."""
    root = root or Config
    out = [f"# {title}", "", f"Generated from `{root.__module__}.{root.__name__}` (`python -m ssl3d.reference`).", ""]
    sections: list[tuple[str, type[BaseModel]]] = [("", root)]
    for prefix, model in sections:
        rows = []
        for name, f in model.model_fields.items():
            if inner := _section_model(f.annotation):
                sections.append((f"{prefix}{name}{'[i]' if typing.get_origin(f.annotation) is list else ''}.", inner))
            if inner and not prefix and root is Config:
                continue
            default = f.get_default(call_default_factory=True)
            default = default.model_dump() if isinstance(default, BaseModel) else default
            kind = type_name(f.annotation).replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {kind} | `{json.dumps(default)}` | {f.description} |")
        heading = (model.__doc__ or "").splitlines()[0].replace("``", "`") if model.__doc__ else ""
        out += [f"## `{prefix.rstrip('.') or 'top level'}`{': ' + heading if heading and prefix else ''}", ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |", *rows, ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# Loading: defaults < JSON file < overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, value); the value is JSON when it parses, else a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value, for example --set train.num_steps=100")
    name, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.strip(), value


def _apply_override(tree: dict[str, Any], name: str, value: Any) -> None:
    node = tree
    parts = name.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{name}: cannot set a key below a non-object value")
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
    for name, value in (overrides or {}).items():
        _apply_override(tree, name, value)
    cfg, problems = checked(Config, tree)
    problems += validate(cfg, check_files=check_files)
    if problems:
        raise ConfigError(problems)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Rules that span keys or touch files


def roi_problems(roi: Sequence[int], name: str) -> list[str]:
    """The crop-size rules, one line per broken rule (the run config and the memory tools share them)."""
    p = []
    for i, r in enumerate(roi):
        if r <= 0 or r % 32:
            p.append(
                f"{name}[{i}]: got {r}, expected a positive multiple of 32 "
                "(patch 2 and four 2x mergings), e.g. 64, 96, 128"
            )
    if all(r > 0 and r % 32 == 0 for r in roi) and math.prod(roi) < 2 * 32**3:
        p.append(
            f"{name}: got {list(roi)}, expected at least 2 tokens at the last stage (ROI/32 per axis), "
            "since the contrastive head reads token 1; e.g. [32, 64, 64]"
        )
    if roi[1] != roi[2]:
        p.append(
            f"{name}: got {list(roi)}, expected roi[1] == roi[2] "
            "(the rotation task turns crops by 90 degrees in that plane, which must keep their shape)"
        )
    return p


def compile_problem(device: str) -> str | None:
    """Why ``model.compile`` cannot run on ``device`` ("auto" counts as the CPU) here, or None: inductor writes C++
    for the CPU; on CUDA, Triton builds its launchers with a C compiler."""
    if device != "cuda":
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
    """The rules no single key's type and limits express; returns one line per problem."""
    p: list[str] = []
    m, d, s, t = cfg.model, cfg.data, cfg.ssl, cfg.train
    if len(m.depths) != 4:
        p.append(f"model.depths: got {list(m.depths)}, expected 4 stages (the Swin UNETR encoder has 4)")
    if len(m.num_heads) != len(m.depths):
        p.append(f"model.num_heads: got {len(m.num_heads)} entries, expected one per stage ({len(m.depths)})")
    if m.feature_size <= 0 or m.feature_size % 12:
        p.append(f"model.feature_size: got {m.feature_size}, expected a positive multiple of 12 (e.g. 12, 24, 48)")
    for i, h in enumerate(m.num_heads):
        if h <= 0 or (m.feature_size * 2**i) % h:
            p.append(f"model.num_heads[{i}]: got {h}, expected a divisor of the stage width {m.feature_size * 2**i}")
    if m.patch_size != 2:
        p.append(f"model.patch_size: got {m.patch_size}, expected 2 (the decoders upsample by 32 = 2 x 2^4)")
    if m.compile and (problem := compile_problem(t.device)):
        p.append(problem)
    if m.init_weights and check_files and not Path(m.init_weights).exists():
        p.append(f"model.init_weights: {m.init_weights} not found; expected a weight file or a checkpoint folder")
    p += roi_problems(d.roi, "data.roi")
    if d.a_max <= d.a_min:
        p.append(f"data.a_max: got {d.a_max}, expected a value above data.a_min ({d.a_min})")
    if d.spacing is not None and any(v <= 0 for v in d.spacing):
        p.append(f"data.spacing: got {list(d.spacing)}, expected three positive spacings in mm")
    for i, dl in enumerate(d.datalists):
        if not dl.json:
            p.append(f"data.datalists[{i}].json: missing; expected the path of a dataset JSON file")
        elif check_files and not Path(dl.json).is_file():
            p.append(f"data.datalists[{i}].json: file {dl.json} not found")
        if dl.root and check_files and not Path(dl.root).is_dir():
            p.append(f"data.datalists[{i}].root: folder {dl.root} not found")
    if not 0.0 < s.min_block <= s.max_block <= 1.0:
        p.append(f"ssl.min_block/max_block: got {s.min_block}/{s.max_block}, expected 0 < min_block <= max_block <= 1")
    if check_files and Path(t.logdir).exists() and not Path(t.logdir).is_dir():
        p.append(f"train.logdir: {t.logdir} is a file, not a folder; expected a (new or existing) folder")
    for i, name in enumerate(t.preempt_signals):
        if name in ("SIGKILL", "SIGSTOP") or not isinstance(getattr(signal, str(name), None), signal.Signals):
            p.append(
                f"train.preempt_signals[{i}]: got {json.dumps(name)}, expected a signal name that can be caught, "
                'e.g. "SIGTERM", "SIGUSR1", "SIGUSR2"'
            )
    if t.resume and t.resume != "auto" and check_files and not Path(t.resume).exists():
        p.append(f'train.resume: {t.resume} not found; expected a checkpoint file or folder, or "auto"')
    if cfg.ds_config and check_files and not Path(cfg.ds_config).is_file():
        p.append(f"ds_config: file {cfg.ds_config} not found")
    return p + _validate_finetune(cfg.finetune, check_files)


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
    return p
