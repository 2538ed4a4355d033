"""Command line: ``ssl3d pretrain | export | data | memory``.

User mistakes (bad config, missing file) print one line per problem and exit with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssl3d.config import Config, ConfigError
from ssl3d.errors import BadVolumeError, Preempted, TrainingStopped
from ssl3d.run_config import (
    apply_memory_fit,
    build_config,
    check_run_inputs,
    parse_bytes,
)

# Exit codes (docs/troubleshooting.md): 0 done; 2 bad input, nothing started; 3 stopped (non-finite steps,
# out of memory, a checkpoint that could not be written): fix the cause, then --resume auto; 4 preempted by a
# signal after writing a checkpoint: run the same command with --resume auto; 130 interrupted (Ctrl-C).
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_PREEMPTED = 4


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="run config JSON (see docs/pretraining.md); default: the reference's settings, or the built-in demo run "
        "when no datalist and no reference flags are given either",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.num_steps=100 (repeatable)",
    )
    p.add_argument(
        "--ds_config",
        "--ds-config",
        "--deepspeed_config",
        dest="ds_config",
        help="strategy preset in DeepSpeed's JSON vocabulary (ds_configs/*.json)",
    )
    p.add_argument(
        "--datalist",
        action="append",
        default=[],
        metavar="JSON[:ROOT]",
        help="a MONAI-style dataset JSON, optionally with its data root (repeatable)",
    )
    p.add_argument("--resume", help='checkpoint folder, run folder, or "auto" (newest in the log folder)')
    p.add_argument(
        "--fit-memory",
        "--fit_memory",
        dest="fit_memory",
        metavar="SIZE",
        help="device memory per rank, e.g. 32GiB: apply the cheapest activation checkpointing (and gradient caching) "
        "that the estimator says fits",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="resolve and check the run config, print it as JSON and exit without training",
    )


def add_reference_flags(p: argparse.ArgumentParser) -> None:
    """The reference's main.py flags, mapped onto the config so its command lines keep working."""
    g = p.add_argument_group("reference flags")
    g.add_argument("--logdir", help="log folder; like the reference, a bare name goes under runs/")
    for flag, typ in [
        ("--batch_size", int),
        ("--sw_batch_size", int),
        ("--num_steps", int),
        ("--eval_num", int),
        ("--warmup_steps", int),
        ("--feature_size", int),
        ("--in_channels", int),
        ("--roi_x", int),
        ("--roi_y", int),
        ("--roi_z", int),
        ("--num_workers", int),
        ("--lr", float),
        ("--decay", float),
        ("--momentum", float),
        ("--dropout_path_rate", float),
        ("--max_grad_norm", float),
        ("--a_min", float),
        ("--a_max", float),
        ("--b_min", float),
        ("--b_max", float),
        ("--space_x", float),
        ("--space_y", float),
        ("--space_z", float),
        ("--seed", int),
    ]:
        g.add_argument(flag, type=typ)
    g.add_argument("--opt", choices=["adamw", "adam", "sgd"])
    g.add_argument("--lr_schedule", choices=["warmup_cosine", "poly"])
    for flag in [
        "--lrdecay",
        "--use_checkpoint",
        "--noamp",
        "--grad_clip",
        "--cache_dataset",
        "--smartcache_dataset",
        "--distributed",
    ]:
        g.add_argument(flag, action="store_true")
    g.add_argument("--spatial_dims", type=int, default=3)
    g.add_argument("--dist-url", "--dist_url", dest="dist_url", help=argparse.SUPPRESS)
    g.add_argument("--world_size", type=int, help=argparse.SUPPRESS)
    g.add_argument("--rank", type=int, help=argparse.SUPPRESS)


def run_pretrain(a: argparse.Namespace, reference_flags: bool = False) -> int:
    cfg = build_config(a, reference_flags)
    budget = parse_bytes(a.fit_memory, "--fit-memory") if a.fit_memory else None
    ds, device = check_run_inputs(cfg)
    if getattr(a, "dry_run", False):
        import json

        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from ssl3d.strategies import strategy_from_ds_config
    from ssl3d.tasks import PretrainTask
    from ssl3d.trainer import Trainer

    strategy = strategy_from_ds_config(ds, device, cfg.train)
    task = PretrainTask()
    try:
        if budget is not None:
            apply_memory_fit(cfg, strategy, budget, task)
        trainer = Trainer(cfg, strategy, task)
        summary = trainer.fit()
        if strategy.is_main and summary:
            first, last = summary["first"], summary["last"]
            print(
                f"ssl3d: done: {summary['steps']} steps, loss {first['total']:.4f} -> {last['total']:.4f}; "
                f"logs and checkpoints in {cfg.train.logdir}; encoder for fine-tuning: {summary['export']}"
            )
            if summary["bad_volumes"]:
                print(f"ssl3d: {len(summary['bad_volumes'])} unusable volumes were skipped and replaced:")
                for line, n in sorted(summary["bad_volumes"].items()):
                    print(f"  {line} (replaced {n}x)")
    finally:
        strategy.teardown()
    return 0


def run_export(a: argparse.Namespace) -> int:
    from ssl3d.checkpoint import export_swinvit, read_weights, resolve_resume

    src = resolve_resume(a.checkpoint, Path(a.checkpoint), checksums=True)  # the newest that verifies
    state = read_weights(src, allow_pickle=a.allow_pickle, verify=False)  # just verified
    cfg, steps = _checkpoint_config(src)
    out = export_swinvit(state, Path(a.output), cfg, steps)
    meta = f" and {out.with_suffix('.json').name}" if cfg is not None else ""
    print(f"ssl3d: wrote {out}{meta} ({sum(1 for k in state if k.startswith('swinViT.'))} encoder tensors)")
    return 0


def _checkpoint_config(src: Path) -> tuple[Config | None, int | None]:
    """The run config and step an ssl3d checkpoint folder recorded (None for plain weight files)."""
    import json

    from ssl3d.config import config_from_dict

    if not (Path(src) / "extra_rank0.pt").is_file():
        return None, None
    from ssl3d.strategies.base import read_extra

    extra = read_extra(Path(src), 0)
    return config_from_dict(json.loads(extra.get("config", "{}"))), int(extra.get("step", 0))


def run_data_check(a: argparse.Namespace) -> int:
    """Load every entry of a datalist through the training chain; one line per unusable volume."""
    from ssl3d.config import DataConfig, DatalistConfig
    from ssl3d.data.datalist import load_datalists
    from ssl3d.data.faults import check_datalist_entries
    from ssl3d.data.transforms import build_guarded_load

    lists = [DatalistConfig(json=j, root=r or None) for j, _, r in (d.partition(":") for d in a.datalist)]
    data = DataConfig(datalists=lists, roi=(32, 32, 32), min_size=a.min_size)
    training, validation = load_datalists(data, check_files=False)
    entries = training + validation
    bad = check_datalist_entries(entries, build_guarded_load(data))
    for line in bad:
        print(f"bad: {line}")
    print(f"ssl3d: {len(entries)} volumes checked, {len(bad)} unusable")
    return 1 if bad else 0


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``ssl3d data prepare SRC DST``."""
    from ssl3d.data.prepare import DEFAULT_MIN_SLICES, DEFAULT_SPACING_TOLERANCE

    p.add_argument("src", help="folder tree of DICOM series, NIfTI, NRRD and MetaImage (.mha/.mhd) files")
    p.add_argument("dst", help="output folder: images/, dataset.json, prepare_report.json")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of patient folders held out (0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (0)")
    p.add_argument("--workers", type=int, default=None, help="conversion processes (default: CPUs, up to 8)")
    p.add_argument("--min-slices", type=int, default=DEFAULT_MIN_SLICES, help="skip shorter DICOM series")
    p.add_argument(
        "--spacing-tolerance",
        type=float,
        default=DEFAULT_SPACING_TOLERANCE,
        help="allowed deviation of a slice gap from the median, as a fraction (0.05)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_prepare(a: argparse.Namespace) -> int:
    """``ssl3d data prepare``: convert, print a summary, and the first few skip reasons."""
    import re
    from collections import defaultdict

    from ssl3d.data.prepare import prepare_dataset

    report = prepare_dataset(
        a.src,
        a.dst,
        val_fraction=a.val_fraction,
        seed=a.seed,
        workers=a.workers,
        min_slices=a.min_slices,
        spacing_tolerance=a.spacing_tolerance,
        progress=not a.no_progress,
    )
    print(f"ssl3d: {report.summary()}")
    reasons: dict[str, int] = defaultdict(int)
    for s in report.skipped:
        reasons[re.sub(r"\d+(\.\d+)?", "N", s["reason"])] += 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  skipped {n:6d} x {reason}")
    return 0


def run_data(a: argparse.Namespace) -> int:
    if a.data_cmd == "samples":
        from ssl3d.data.samples import LABELLED_DATALIST_NAME, fetch_samples

        path = fetch_samples(Path(a.dir))
        print(f"ssl3d: smoke-test CT samples and their datalist: {path}")
        print(f"ssl3d: labelled (finetune/probe --datalist): {path.with_name(LABELLED_DATALIST_NAME)}")
    elif a.data_cmd == "prepare":
        return run_prepare(a)
    elif a.data_cmd == "cache":
        from ssl3d.data.prepcache import build_prepcache

        cfg = build_config(a)
        info = build_prepcache(
            cfg, a.rank, a.world_size, workers=a.workers, storage=cfg.data.prepcache_storage, progress=True
        )
        print("ssl3d: " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    elif a.data_cmd == "check":
        return run_data_check(a)
    elif a.data_cmd == "demo":
        from ssl3d.data.demo import write_demo_dataset

        path = write_demo_dataset(Path(a.dir), n_volumes=a.volumes)
        print(f"ssl3d: synthetic demo volumes and their datalist: {path}")
    return 0


def memory_task(a: argparse.Namespace, cfg: Config) -> tuple[Any, int]:
    """What ``ssl3d memory`` estimates: ``--task``, else the config's ``finetune.task`` when its file or ``--set``
    has a ``finetune`` section (a fine-tuning config), else pre-training; and the classes for a downstream task:
    ``--num-classes``, ``finetune.num_classes``, or the datalists' ``labels`` map."""
    from ssl3d.config import parse_override, read_json
    from ssl3d.tasks import PRETRAIN, get_task

    name = getattr(a, "task", None)
    if name is None:
        doc = read_json(a.config) if a.config else {}
        given = "finetune" in doc or any(parse_override(o)[0].startswith("finetune.") for o in a.overrides)
        name = cfg.finetune.task if given else PRETRAIN.name
    task = get_task(name)
    if not task.needs_classes:
        return task, 0
    n = getattr(a, "num_classes", None) or cfg.finetune.num_classes
    if not n and cfg.data.datalists:
        from ssl3d.downstream.datalist import load_labelled

        n = load_labelled(cfg, check_files=False).num_classes
    if not n:
        raise ConfigError(
            f"--num-classes: needed for --task {task.name} (finetune.num_classes is 0 and no datalist has a labels "
            "map); give the classes including background, e.g. --num-classes 14"
        )
    if n < 2:
        raise ConfigError(f"--num-classes: got {n}, expected at least 2 (background included)")
    return task, int(n)


def memory_setting(a: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The run config and preset of ``ssl3d memory`` as the estimator's arguments (step settings, sharding)."""
    from ssl3d.strategies.ds_config import load_ds_config

    cfg = build_config(a, demo=False)  # without a config: the reference-size run, not the CPU demo
    task, num_classes = memory_task(a, cfg)
    ds = load_ds_config(
        cfg.ds_config,
        cfg,
        world_size=a.world_size,
        device_type=a.device,
        auto_precision="bf16" if a.device == "cuda" else "fp32",
    )
    from ssl3d.memory.plan import estimator_setting

    return estimator_setting(cfg, ds, a.world_size, task, num_classes)


def run_memory(a: argparse.Namespace) -> int:
    import json

    from ssl3d.memory.estimate import estimate_memory, format_estimate

    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    step, sharding = memory_setting(a)
    if a.memory_cmd == "estimate":
        est = estimate_memory(step, **sharding, device=a.device)
        print(est.to_json() if a.json else format_estimate(est))
    elif a.memory_cmd == "profile":
        from ssl3d.memory.profile import format_profile, profile_memory

        result = profile_memory(step, steps=a.steps, snapshot_path=a.snapshot, device=a.device)
        print(json.dumps(result, indent=2, default=str) if a.json else format_profile(result))
    else:
        from ssl3d.memory.plan import format_plan, plan_memory

        plan = plan_memory(parse_bytes(a.budget), step, device=a.device, plot_path=a.plot)
        print(json.dumps(plan, indent=2, default=str) if a.json else format_plan(plan))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl3d", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="self-supervised pre-training (the demo data when no datalist is given)")
    add_run_flags(p)
    add_dry_run(p)
    for name, text in [
        ("finetune", "supervised segmentation with MONAI's SwinUNETR, initialised from a pre-trained encoder or not"),
        ("probe", "frozen encoder + a small multi-scale head: the cheap test of a representation"),
    ]:
        f = sub.add_parser(name, help=text)
        add_run_flags(f)
        from ssl3d.downstream.run import add_downstream_flags

        add_downstream_flags(f)
    e = sub.add_parser("export", help="write the encoder as model_swinvit.pt for MONAI's SwinUNETR.load_from")
    e.add_argument("checkpoint", help="a checkpoint folder or run folder (newest checkpoint), or a weight file")
    e.add_argument("output", help="output path, e.g. model_swinvit.pt")
    e.add_argument("--allow-pickle", action="store_true", help="allow full unpickling (only for trusted files)")
    mem = sub.add_parser("memory", help="estimate, profile and plan peak memory per rank")
    msub = mem.add_subparsers(dest="memory_cmd", required=True)
    for name, text in [
        ("estimate", "predict the peak memory of one training step per rank, without the target device"),
        ("profile", "run a few real steps on this device and report measured peaks next to the estimate"),
        ("plan", "largest ROI / batch per backend and world size, cheapest checkpointing policy, for a budget"),
    ]:
        m = msub.add_parser(name, help=text)
        add_run_flags(m)
        m.add_argument("--world-size", type=int, default=1, help="ranks the preset runs on")
        if name == "profile":  # runs real steps: on the device at hand unless told
            m.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run the steps")
        else:
            m.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="target device kind")
        m.add_argument("--json", action="store_true", help="print JSON instead of a table")
        m.add_argument(
            "--task",
            choices=["pretrain", "finetune", "probe"],
            help="the step to estimate (default: the config's finetune.task for a config with a finetune section, "
            "else pretrain)",
        )
        m.add_argument(
            "--num-classes",
            "--num_classes",
            dest="num_classes",
            type=int,
            help="finetune/probe: output classes including background (default: finetune.num_classes or the "
            "datalist's labels map)",
        )
        if name == "profile":
            m.add_argument("--steps", type=int, default=3)
            m.add_argument("--snapshot", help="CUDA: write a memory snapshot for PyTorch's memory viewer here")
        if name == "plan":
            m.add_argument("--budget", required=True, help="device memory per rank, e.g. 32GiB")
            m.add_argument("--plot", help="write a PNG of estimated peak memory against ROI per policy")
    d = sub.add_parser("data", help="data helpers")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("samples", help="fetch real public CT smoke-test samples from PyPI sdists, as NIfTI")
    s.add_argument("dir")
    add_prepare_arguments(
        dsub.add_parser("prepare", help="convert DICOM series / NIfTI / NRRD / MetaImage to NIfTI plus a datalist")
    )
    c = dsub.add_parser("cache", help="fill the preprocessing cache (data.dataset=prepcache) ahead of training")
    add_run_flags(c)
    c.add_argument("--rank", type=int, default=0, help="build every world-size-th volume from this one")
    c.add_argument("--world-size", type=int, default=1)
    c.add_argument("--workers", type=int, default=2)
    k = dsub.add_parser("check", help="load every volume of datalists and report each unusable one (exit 1)")
    k.add_argument("datalist", nargs="+", help="dataset JSON, optionally JSON:ROOT")
    k.add_argument("--min-size", type=int, default=16, help="an axis shorter than this many voxels is unusable")
    m = dsub.add_parser("demo", help="write the built-in synthetic CT volumes and their datalist")
    m.add_argument("dir")
    m.add_argument("--volumes", type=int, default=6)
    return parser


def guarded(fn, *args: Any) -> int:
    """Run a command; user mistakes become one line per problem and exit code 2."""
    try:
        return fn(*args)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"ssl3d: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"ssl3d: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except BadVolumeError as exc:
        # Raised in a loader worker, the message carries the worker's traceback: keep its last line.
        line = str(exc).strip().splitlines()[-1]
        print(f"ssl3d: error: unusable volume {line.split('BadVolumeError: ', 1)[-1]}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingStopped as exc:
        print(f"ssl3d: stopped: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except Preempted as exc:
        print(f"ssl3d: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("ssl3d: interrupted; resume with --resume auto", file=sys.stderr)
        return 130


def run_finetune(a: argparse.Namespace) -> int:
    from ssl3d.downstream.run import run_downstream

    return run_downstream(a, "finetune")


def run_probe(a: argparse.Namespace) -> int:
    from ssl3d.downstream.run import run_downstream

    return run_downstream(a, "probe")


TRAINING_COMMANDS = ("pretrain", "finetune", "probe")


def announce_allocator(a: argparse.Namespace) -> None:
    """A training run started as a program: tcmalloc when installed (``ssl3d.allocator``; this may re-execute the
    process), and the run's first line says which allocator it has. Not for ``main([...])`` called in-process."""
    if getattr(a, "command", "pretrain") not in TRAINING_COMMANDS or getattr(a, "dry_run", False):
        return
    import os

    from ssl3d.allocator import ensure_tcmalloc

    line = ensure_tcmalloc(fit_memory=bool(getattr(a, "fit_memory", None)))
    if os.environ.get("RANK", "0") == "0":
        print(f"ssl3d: {line}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    a = make_parser().parse_args(argv)
    if argv is None:
        announce_allocator(a)
    handlers = {
        "pretrain": run_pretrain,
        "finetune": run_finetune,
        "probe": run_probe,
        "export": run_export,
        "data": run_data,
        "memory": run_memory,
    }
    return guarded(handlers[a.command], a)


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    """``launch/pretrain.py``: ``ssl3d pretrain`` plus the reference's flags (for deepspeed/torchrun/python)."""
    parser = argparse.ArgumentParser(prog="launch/pretrain.py", description="ssl3d pre-training entry point")
    add_run_flags(parser)
    add_dry_run(parser)
    add_reference_flags(parser)
    a = parser.parse_args(argv)
    if argv is None:
        announce_allocator(a)
    return guarded(run_pretrain, a, True)


if __name__ == "__main__":
    sys.exit(main())
