"""``ssl3d finetune`` and ``ssl3d probe``: one run, or a comparison over inits x labelled counts x seeds.

Everything a run can be refused for is checked before a process group, model or loader exists: the export (its
metadata, names, shapes and fingerprints against the model config), the labelled datalists (labels present, on
the image's grid, values within the classes) and the strategy preset.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ssl3d.config import Config, DatalistConfig, read_json

# CPU demo: the pre-training demo's tiny model, on the demo's labels, in a few minutes.
DEMO_CPU = {
    "model.feature_size": 12,
    "model.depths": [1, 1, 1, 1],
    "model.fused_attention": False,
    "data.roi": [64, 64, 64],
    "data.num_samples": 2,
    "data.num_workers": 1,
    "train.batch_size": 1,
    "train.num_steps": 60,
    "train.eval_num": 20,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 5,
}
DEMO_GPU = {"data.roi": [96, 96, 96], "train.batch_size": 2, "train.num_steps": 400, "train.eval_num": 100}


def add_downstream_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--init",
        action="append",
        default=[],
        metavar="WEIGHTS",
        help='model_swinvit.pt, a run or checkpoint folder, a reference checkpoint, or "none" (repeatable: compare)',
    )
    p.add_argument(
        "--labelled",
        action="append",
        default=[],
        type=float,
        metavar="N",
        help="use the first N training cases (seeded order), or a fraction (0-1); repeatable: compare",
    )
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: one run per seed (compare)")


def _flatten(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for k, v in tree.items():
        dotted = f"{prefix}{k}"
        keys.add(dotted)
        if isinstance(v, dict):
            keys |= _flatten(v, dotted + ".")
    return keys


def prepare_run(cfg: Config, explicit: set[str]) -> tuple[Config, Any, Any, list[str]]:
    """Resolve the init (metadata -> model/preprocessing), the demo data and the labelled lists. No side effects
    beyond writing the demo volumes. Returns (config, init source or None, labelled data, notes)."""
    from ssl3d.data.demo import write_demo_dataset
    from ssl3d.downstream.datalist import load_labelled
    from ssl3d.downstream.model import read_init, reconcile_model_config
    from ssl3d.metadata import PREPROCESSING_KEYS

    cfg = copy.deepcopy(cfg)
    notes: list[str] = []
    source = None
    init = cfg.finetune.init
    if init and init != "none":
        source = read_init(init)
        cfg.model, notes = reconcile_model_config(cfg.model, source, explicit)
        pre = (source.metadata or {}).get("preprocessing", {})
        for key in PREPROCESSING_KEYS:
            if key not in pre:
                continue
            want = tuple(pre[key]) if isinstance(pre[key], list) else pre[key]
            have = getattr(cfg.data, key)
            if have == want:
                continue
            if f"data.{key}" in explicit:
                warnings.warn(
                    f"data.{key} is {have} but {source.path.name} was pre-trained with {want} "
                    f"({Path(source.path).with_suffix('.json').name}); the encoder will see other intensities/voxels"
                )
            else:
                setattr(cfg.data, key, want)
                notes.append(f"data.{key} = {want} from the export's preprocessing")
    if not cfg.data.datalists:
        demo_dir = Path(cfg.data.demo_dir or Path(cfg.train.logdir).parent / "demo_data")
        # Seed 0 whatever train.seed: the data are the same for every seed of a comparison (and pre-training's demo).
        path = write_demo_dataset(demo_dir, n_volumes=cfg.data.demo_volumes, seed=0)
        cfg.data.datalists = [DatalistConfig(json=str(path))]
    data = load_labelled(cfg)
    return cfg, source, data, notes


def _run_one(cfg: Config, explicit: set[str], fit_memory: str | None) -> dict[str, Any]:
    from ssl3d.run_config import apply_memory_fit, check_run_inputs, parse_bytes
    from ssl3d.strategies import strategy_from_ds_config
    from ssl3d.tasks import SegmentationTask
    from ssl3d.trainer import Trainer

    budget = parse_bytes(fit_memory, "--fit-memory") if fit_memory else None
    cfg, source, data, notes = prepare_run(cfg, explicit)
    ds, device = check_run_inputs(cfg)
    strategy = strategy_from_ds_config(ds, device, cfg.train)
    if strategy.is_main:
        for note in notes:
            print(f"ssl3d: {note}")
        what = f"{source.path} ({len(source.encoder)} encoder tensors)" if source else "random initialisation"
        print(
            f"ssl3d: {cfg.finetune.task}: {len(data.training)} of {data.available} labelled training volumes, "
            f"{len(data.validation)} for validation, {data.num_classes} classes; encoder from {what}"
        )
    task = SegmentationTask(cfg.finetune.task, data, source)
    if budget is not None:
        # The same planner as pre-training, on this run's SwinUNETR / probe step (the trainer reads the policy).
        apply_memory_fit(cfg, strategy, budget, task, data.num_classes)
    trainer = Trainer(cfg, strategy, task)
    summary = trainer.fit()
    # A comparison trains several networks in this process: the finished one's engine and its device memory go.
    del trainer, strategy
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summary


def run_downstream(a: argparse.Namespace, task: str) -> int:
    from ssl3d.run_config import build_config, is_demo

    # As for pre-training: the CPU/GPU demo preset only for the demo (no config, no datalist).
    defaults = dict(DEMO_GPU if _cuda() else DEMO_CPU) if is_demo(a) else {}
    user_overrides = list(a.overrides)
    explicit = (_flatten(read_json(a.config)) if a.config else set()) | _override_keys(user_overrides)
    if "train.logdir" not in explicit:
        defaults["train.logdir"] = f"runs/{task}"
    a.overrides = [f"{k}={json.dumps(v)}" for k, v in defaults.items()] + [f'finetune.task="{task}"'] + user_overrides
    inits = a.init or [None]
    labelled = a.labelled or [None]
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [None]
    if len(inits) == 1 and inits[0] is not None:
        a.overrides.append(f"finetune.init={json.dumps(inits[0])}")
    if len(labelled) == 1 and labelled[0] is not None:
        a.overrides.append(f"finetune.labelled={labelled[0]}")
    if len(seeds) == 1 and seeds[0] is not None:
        a.overrides.append(f"train.seed={seeds[0]}")
    base = build_config(a, demo=False)
    combos = list(itertools.product(inits, labelled, seeds))
    try:
        if len(combos) == 1:
            summary = _run_one(base, explicit, a.fit_memory)
            _print_summary(summary, base)
            return 0
        return _compare(base, explicit, combos, a.fit_memory)
    finally:
        # Every run of this process shares one process group; NCCL warns at exit when it was never destroyed.
        from ssl3d.strategies.distributed import is_distributed

        if is_distributed():
            torch.distributed.destroy_process_group()


def _compare(base: Config, explicit: set[str], combos: list[tuple], fit_memory: str | None) -> int:
    """Every (init, labelled, seed) in its own sub-folder, then one table. The architecture comes from the first
    real export for every run, so random initialisation is compared on the same network."""
    from ssl3d.downstream.compare import write_comparison
    from ssl3d.downstream.model import read_init, reconcile_model_config

    root = Path(base.train.logdir)
    # Sub-runs sit two levels down; their demo data stay where a single run (and pre-training's demo) puts them.
    base.data.demo_dir = base.data.demo_dir or str(root.parent / "demo_data")
    first = next((i for i, _, _ in combos if i and i != "none"), None)
    if first:
        base.model, _ = reconcile_model_config(base.model, read_init(first), explicit)
        explicit = explicit | {f"model.{k}" for k in ("feature_size", "depths", "num_heads", "window_size")}
    rows = []
    is_main = True
    for init, labelled, seed in combos:
        cfg = copy.deepcopy(base)
        cfg.finetune.init = init if init not in (None, "none") else None
        if labelled is not None:
            cfg.finetune.labelled = labelled
        if seed is not None:
            cfg.train.seed = seed
        name = _init_name(init)
        cfg.train.logdir = str(root / name / f"labelled_{_count(cfg.finetune.labelled)}_seed{cfg.train.seed}")
        summary = _run_one(cfg, explicit, fit_memory)
        is_main = bool(summary)
        if summary:
            rows.append(
                {
                    "init": name,
                    "labelled": summary["labelled"],
                    "seed": cfg.train.seed,
                    "final_dice": summary["validation"]["mean_dice"],
                    "best_dice": summary["best_mean_dice"],
                    "per_class": {k: v for k, v in summary["validation"].items() if k != "mean_dice"},
                    "steps": summary["steps"],
                    "logdir": cfg.train.logdir,
                }
            )
            print(
                f"ssl3d: {name} labelled {summary['labelled']} seed {cfg.train.seed}: final mean Dice "
                f"{rows[-1]['final_dice']:.3f}"
            )
    if is_main:
        paths = write_comparison(root, base.finetune.task, rows)
        print(paths["md"].read_text(), end="")
        print(f"ssl3d: comparison written to {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


def _init_name(init: str | None) -> str:
    if init in (None, "none"):
        return "none"
    p = Path(init)
    return p.parent.name if p.name == "model_swinvit.pt" else p.name


def _count(labelled: float) -> str:
    return "all" if labelled == 0 else (str(int(labelled)) if labelled >= 1 else f"{labelled:g}")


def _override_keys(overrides: list[str]) -> set[str]:
    from ssl3d.config import parse_override

    return {parse_override(o)[0] for o in overrides}


def _cuda() -> bool:
    from ssl3d.run_config import cuda_available

    return cuda_available()


def _print_summary(summary: dict[str, Any], cfg: Config) -> None:
    if not summary:
        return
    val = summary["validation"]
    per = ", ".join(f"{k} {v:.3f}" for k, v in val.items() if k != "mean_dice")
    print(
        f"ssl3d: done: {summary['steps']} steps, loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; "
        f"validation mean Dice {val['mean_dice']:.3f} ({per}); best {summary['best_mean_dice']:.3f} at step "
        f"{summary['best_step']}; logs, checkpoints, model_best.pt in {cfg.train.logdir}"
    )
