"""A run's command line resolved to a checked config: the demo presets, the reference's flags, the order in which
config, flags and overrides apply, the checks made before any process starts, and ``--fit-memory``.

Shared by ``ssl3d pretrain`` (``ssl3d.cli``) and ``ssl3d finetune`` / ``probe`` (``ssl3d.downstream.run``), below both.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ssl3d.config import Config, ConfigError, load_config

# `ssl3d pretrain` with no config: a run that finishes in minutes on a CPU, the reference size on a GPU.
DEMO_CPU = {
    "model.feature_size": 12,
    "model.depths": [1, 1, 1, 1],
    "data.roi": [64, 64, 64],
    "data.num_samples": 2,
    "data.num_workers": 2,
    "train.batch_size": 1,
    "model.fused_attention": False,  # at 4 channels per head the eager path is faster on a CPU
    "train.num_steps": 40,
    "train.eval_num": 20,
    "optim.lr": 1e-3,
    "optim.warmup_steps": 5,
    "train.logdir": "runs/demo",
}
DEMO_GPU = {
    "data.roi": [96, 96, 96],
    "train.batch_size": 2,
    "train.num_steps": 300,
    "train.eval_num": 100,
    "optim.warmup_steps": 50,
    "train.logdir": "runs/demo",
}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def reference_overrides(a: argparse.Namespace, has_config: bool) -> dict[str, Any]:
    o: dict[str, Any] = {}
    simple = {
        "batch_size": "train.batch_size",
        "sw_batch_size": "data.num_samples",
        "num_steps": "train.num_steps",
        "eval_num": "train.eval_num",
        "warmup_steps": "optim.warmup_steps",
        "feature_size": "model.feature_size",
        "in_channels": "model.in_channels",
        "num_workers": "data.num_workers",
        "lr": "optim.lr",
        "decay": "optim.weight_decay",
        "momentum": "optim.momentum",
        "dropout_path_rate": "model.drop_path_rate",
        "a_min": "data.a_min",
        "a_max": "data.a_max",
        "b_min": "data.b_min",
        "b_max": "data.b_max",
        "opt": "optim.name",
        "seed": "train.seed",
    }
    for flag, key in simple.items():
        if getattr(a, flag, None) is not None:
            o[key] = getattr(a, flag)
    if a.spatial_dims != 3:
        raise ConfigError(f"--spatial_dims: got {a.spatial_dims}, expected 3 (ssl3d pre-trains 3D volumes)")
    rois = [a.roi_x, a.roi_y, a.roi_z]
    if any(r is not None for r in rois):
        o["data.roi"] = [r if r is not None else 96 for r in rois]
    spaces = [a.space_x, a.space_y, a.space_z]
    if any(v is not None for v in spaces):
        o["data.spacing"] = [v if v is not None else d for v, d in zip(spaces, (1.5, 1.5, 2.0))]
    if a.logdir:
        o["train.logdir"] = a.logdir if ("/" in a.logdir or a.logdir.startswith(".")) else f"runs/{a.logdir}"
    if a.lrdecay:
        o["optim.schedule"] = a.lr_schedule or "warmup_cosine"
    elif not has_config:
        o["optim.schedule"] = "constant"  # the reference: without --lrdecay the learning rate never changes
    if a.use_checkpoint:
        o["model.use_checkpoint"] = True
    if a.noamp:
        o["train.precision"] = "fp32"
    if a.grad_clip:
        o["train.grad_clip"] = a.max_grad_norm or 1.0
    if a.cache_dataset:
        o["data.dataset"] = "cache"
    if a.smartcache_dataset:
        o["data.dataset"] = "smart_cache"
    return o


def is_demo(a: argparse.Namespace, reference_flags: bool = False) -> bool:
    """The demo preset is for the demo only: no config, no datalist and none of the reference's flags. Anything
    else starts from the config's defaults (the reference's), so its command lines train its model anywhere."""
    flags_given = reference_flags and bool(reference_overrides(a, has_config=True))
    return not a.config and not getattr(a, "datalist", None) and not flags_given


def build_config(a: argparse.Namespace, reference_flags: bool = False, demo: bool = True) -> Config:
    """defaults (the reference's) < demo preset (the demo only) < --config < reference flags < --datalist, --set."""
    overrides: dict[str, Any] = {}
    if demo and is_demo(a, reference_flags):
        overrides.update(DEMO_GPU if cuda_available() else DEMO_CPU)
    if reference_flags:
        overrides.update(reference_overrides(a, has_config=bool(a.config)))
    if a.datalist:
        lists = []
        for item in a.datalist:
            json_path, _, root = item.partition(":")
            lists.append({"json": json_path, "root": root or None})
        overrides["data.datalists"] = lists
    if a.ds_config:
        overrides["ds_config"] = a.ds_config
    if a.resume:
        overrides["train.resume"] = a.resume
    from ssl3d.config import parse_override

    overrides.update(dict(parse_override(o) for o in a.overrides))
    return load_config(a.config, overrides)


def check_run_inputs(cfg: Config) -> tuple[Any, Any]:
    """What the config alone cannot show, before any process group, model or loader exists: the preset against
    the run config, world size and device, the datalists' contents (their images too with
    data.on_bad_volume=fail), the weights model.init_weights names and the checkpoint that train.resume names.
    Every problem is reported at once; returns the resolved preset and this rank's device."""
    from ssl3d.checkpoint import read_weights, resolve_resume, resume_mismatch
    from ssl3d.data.datalist import load_datalists
    from ssl3d.strategies import resolve_strategy_config

    problems: list[str] = []
    resolved: tuple[Any, Any] = (None, None)
    try:
        resolved = resolve_strategy_config(cfg)
    except ConfigError as exc:
        problems += exc.problems
    if cfg.data.datalists:
        try:
            load_datalists(cfg.data, seed=cfg.train.seed, check_files=cfg.data.on_bad_volume == "fail")
        except ConfigError as exc:
            problems += exc.problems
    if cfg.model.init_weights:
        try:
            read_weights(Path(cfg.model.init_weights))  # readable and, for a checkpoint folder, verified
        except ConfigError as exc:
            problems += exc.problems
    try:
        resume = resolve_resume(cfg.train.resume, Path(cfg.train.logdir) / "checkpoints")
        if resume is not None:
            problems += resume_mismatch(resume, cfg)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return resolved


def apply_memory_fit(cfg: Config, strategy: Any, budget: int, task: Any, num_classes: int | None = None) -> None:
    """``--fit-memory``: replace the run's checkpointing policy and gradient caching by the cheapest that fits.

    ``task``: the run's ``ssl3d.tasks.Task`` (its step, with ``num_classes`` outputs where it has classes); the
    trainer reads the policy from ``strategy.ds_config``."""
    from ssl3d.memory.plan import estimator_setting, fit_memory
    from ssl3d.memory.process import return_freed_memory

    assert strategy.ds_config is not None
    step, sharding = estimator_setting(cfg, strategy.ds_config, strategy.world_size, task, num_classes)
    fit = fit_memory(budget, step, device=strategy.device.type, **sharding)
    strategy.ds_config = dataclasses.replace(strategy.ds_config, activation_checkpointing=fit.policy)
    if task.supports_grad_cache:
        cfg.ssl.grad_cache_chunk = fit.grad_cache_chunk
    # The CPU estimate is live memory; glibc's defaults keep freed blocks and would peak well above it.
    returned = strategy.device.type == "cpu" and return_freed_memory()
    if strategy.is_main:
        note = "; freed host memory goes back to the system at once (slower steps, peak RSS follows the estimate)"
        print(f"ssl3d: --fit-memory: {fit.describe(budget)}{note if returned else ''}")


def parse_bytes(text: str, flag: str = "--budget") -> int:
    """``32GiB``, ``32GB``, ``500MiB`` or a plain number of bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower().replace(" ", "")
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            t, mult = t[: -len(unit)], factor
            break
    else:
        mult = 1
    try:
        return int(float(t) * mult)
    except ValueError:
        raise ConfigError(f"{flag}: got {text!r}, expected a size such as 32GiB, 80GB or 500MiB") from None
