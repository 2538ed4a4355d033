"""Measured peak memory of a few real training steps on the device at hand, next to the estimate.

CUDA: ``max_memory_allocated`` / ``max_memory_reserved`` over the steps, a memory snapshot for PyTorch's viewer
(https://pytorch.org/memory_viz) and, from one extra step under the storage tracker, peaks per top-level module
and the breakdown by category.

CPU: the same storage tracker on real tensors (live tensor bytes: what the estimator predicts for ``device="cpu"``)
and the process's peak resident set size over a baseline taken before the model exists. For RSS to mean
anything the process should be fresh and glibc should hand large blocks back to the kernel at once:
``profile_in_subprocess`` runs the profile in a new interpreter with ``MALLOC_MMAP_THRESHOLD_=65536``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl3d.config import ConfigError, ModelConfig, OptimConfig
from ssl3d.memory.activation_checkpointing import CheckpointPolicy, apply_activation_checkpointing
from ssl3d.memory.estimate import (
    CATEGORIES,
    GIB,
    StorageTracker,
    estimate_memory,
    make_step_inputs,
    step_settings,
    training_step,
)
from ssl3d.memory.process import MALLOC_ENV
from ssl3d.optim import build_optimizer
from ssl3d.rss import current_rss_bytes, peak_rss_bytes
from ssl3d.step import DTYPES, StepSettings

__all__ = ["profile_in_subprocess", "profile_memory", "start_memory_history"]

SNAPSHOT_ENTRIES = 200_000  # allocation events a CUDA memory snapshot keeps

# MONAI keeps each stage in a one-element ModuleList (never called itself): hook the stage, ``layers<i>.0``.
TOP_LEVEL = ("swinViT.patch_embed", "swinViT.layers1.0", "swinViT.layers2.0", "swinViT.layers3.0", "swinViT.layers4.0")
# SwinUNETR (fine-tuning): its full-resolution convolutional blocks and output; the probe: its heads.
HEADS = ("rotation_head", "contrastive_head", "conv", "encoder1", "decoder1", "out", "heads")


def _module_peaks(model: nn.Module, tracker: StorageTracker) -> tuple[dict[str, dict[str, int]], list[Any]]:
    """Forward hooks on the top-level parts recording the tracker's max live bytes during each part's forward."""
    stats: dict[str, dict[str, int]] = {}
    handles = []
    modules = dict(model.named_modules())
    state: dict[str, Any] = {}

    def pre(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            state[name] = (sum(tracker.current[:-1]), len(tracker.events))

        return hook

    def post(name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            start, first = state.pop(name, (0, len(tracker.events)))
            window = [sum(e[1:-1]) for e in tracker.events[first:]] or [start]
            s = stats.setdefault(name, {"forward_peak": 0, "forward_delta_peak": 0, "kept_after_forward": 0})
            s["forward_peak"] = max(s["forward_peak"], max(window))
            s["forward_delta_peak"] = max(s["forward_delta_peak"], max(window) - start)
            s["kept_after_forward"] = max(s["kept_after_forward"], sum(tracker.current[:-1]) - start)

        return hook

    for name in TOP_LEVEL + HEADS:
        if name in modules:
            handles.append(modules[name].register_forward_pre_hook(pre(name)))
            handles.append(modules[name].register_forward_hook(post(name)))
    return stats, handles


def _cuda_module_peaks(model: nn.Module, dev: torch.device) -> tuple[dict[str, dict[str, int]], list[Any]]:
    """Per top-level part: peak allocated during its forward (resets the device's peak counter around each)."""
    stats: dict[str, dict[str, int]] = {}
    handles = []
    modules = dict(model.named_modules())
    start: dict[str, int] = {}

    def pre(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            torch.cuda.synchronize(dev)
            start[name] = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)

        return hook

    def post(name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            torch.cuda.synchronize(dev)
            peak, now, s0 = torch.cuda.max_memory_allocated(dev), torch.cuda.memory_allocated(dev), start.pop(name, 0)
            stats[name] = {"forward_peak": peak, "forward_delta_peak": peak - s0, "kept_after_forward": now - s0}

        return hook

    for name in TOP_LEVEL + HEADS:
        if name in modules:
            handles.append(modules[name].register_forward_pre_hook(pre(name)))
            handles.append(modules[name].register_forward_hook(post(name)))
    return stats, handles


def start_memory_history() -> None:
    """Record CUDA allocations for a snapshot with Python stacks only: the default (``stacks="all"``) also records
    and symbolises C++ frames, which makes ``_dump_snapshot`` slow (GPU_AUDIT S12)."""
    torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES, stacks="python")


def profile_memory(
    model: ModelConfig | StepSettings,
    *step: Any,
    steps: int = 3,
    device: str = "auto",
    snapshot_path: str | Path | None = None,
    module_peaks: bool = True,
    threads: int | None = None,
    with_estimate: bool = True,
    seed: int = 0,
    breakdown: bool = True,
    **step_kw: Any,
) -> dict[str, Any]:
    """Run ``steps`` real training steps and report measured peaks (bytes) next to ``estimate_memory``'s figure.

    The step is ``model`` as ``StepSettings``, or ``step_settings``' arguments (model, roi, batch size, ...).
    The first step also creates the optimizer states; all steps count towards the peaks, as in training.
    ``breakdown`` (CPU): one extra step under the storage tracker for the breakdown by category and per-module peaks.
    """
    from ssl3d.model.attention import apply_fused_attention

    step_cfg = step_settings(model, *step, **step_kw)
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ConfigError(f'device: got "{device}", but this machine has no CUDA device; profile with --device cpu')
    rss_baseline = current_rss_bytes()
    torch.manual_seed(seed)
    task = step_cfg.task
    net = task.build_model(step_cfg.model, step_cfg.contrastive_dim, step_cfg.num_classes).to(dev)
    if step_cfg.fused_attention:
        apply_fused_attention(net)
    apply_activation_checkpointing(net, step_cfg.policy)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = build_optimizer(OptimConfig(), params)
    inputs = make_step_inputs(step_cfg, dev)
    task.randomise_inputs(inputs, step_cfg, torch.Generator(device="cpu").manual_seed(seed))
    dtype = DTYPES[step_cfg.precision]
    measured: dict[str, Any] = {}
    times: list[float] = []

    objective = task.objective(step_cfg)  # one for every step: what it keeps (a queue) lives on, as in training

    def step(phase=lambda name: None) -> None:
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        training_step(net, optimizer, inputs, step_cfg, autocast_dtype=dtype, phase=phase, objective=objective)
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)

    # 1. Plain steps: the figures that count (no hooks, no dispatch mode that could change kernels).
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        if snapshot_path:
            start_memory_history()
    for _ in range(max(1, steps)):
        step()
    if cuda:
        measured["cuda_max_allocated"] = torch.cuda.max_memory_allocated(dev)
        measured["cuda_max_reserved"] = torch.cuda.max_memory_reserved(dev)
        if snapshot_path:
            Path(snapshot_path).parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(snapshot_path))
            torch.cuda.memory._record_memory_history(enabled=None)
            measured["snapshot"] = str(snapshot_path)
    else:
        measured["rss_baseline"] = rss_baseline
        measured["rss_peak"] = peak_rss_bytes()
        measured["rss_peak_over_baseline"] = measured["rss_peak"] - rss_baseline
    # 2. One more step, watched: per-module forward peaks and (CPU) the breakdown by category.
    stats: dict[str, dict[str, int]] = {}
    if cuda and module_peaks:
        stats, handles = _cuda_module_peaks(net, dev)
        step()
        for h in handles:
            h.remove()
    elif not cuda and (breakdown or module_peaks):
        tracker = StorageTracker()
        tracker.register_step_state(net, optimizer, inputs)
        for t in getattr(objective, "state_tensors", list)():
            tracker.register(t, "buffers")
        stats, handles = _module_peaks(net, tracker) if module_peaks else ({}, [])
        with tracker:
            tracker.mark()
            step(tracker.set_phase)
            tracker.mark()
        times.pop()  # slowed down by the tracker
        tracker.remove_hooks()
        for h in handles:
            h.remove()
        totals = [sum(e[1:-1]) for e in tracker.events]
        i = max(range(len(totals)), key=totals.__getitem__)
        measured["tracked_peak"] = totals[i]
        measured["tracked_breakdown"] = dict(zip(CATEGORIES, tracker.events[i][1:]))
        measured["tracked_peak_phase"] = ("setup", "forward", "backward", "optimizer")[tracker.events[i][0]]
    result: dict[str, Any] = {
        "device": str(dev) if not cuda else torch.cuda.get_device_name(dev),
        "config": {
            "model": step_cfg.model.model_dump(),
            "roi": list(step_cfg.roi),
            "batch_size": step_cfg.batch_size,
            "num_samples": step_cfg.num_samples,
            "precision": step_cfg.precision,
            "policy": step_cfg.policy.label,
            "fused_attention": step_cfg.fused_attention,
            "two_passes": step_cfg.two_passes,
            "grad_cache_chunk": step_cfg.grad_cache_chunk,
            "negative_queue": step_cfg.negative_queue,
            "task": task.name,
            "task_label": task.describe(step_cfg.num_classes),
            "num_classes": step_cfg.num_classes if task.needs_classes else None,
            "steps": steps,
        },
        "measured": measured,
        "module_peaks": stats,
        "step_time_s": times,
    }
    if with_estimate:
        est = estimate_memory(step_cfg, device="cuda" if cuda else "cpu")
        result["estimate"] = est.to_dict()
        # CUDA: tensor bytes against max_memory_allocated; CPU: everything against the RSS growth.
        if cuda:
            result["estimate_vs_measured"] = est.breakdown["allocated_peak"] / max(measured["cuda_max_allocated"], 1)
            result["reserved_estimate_vs_measured"] = est.breakdown["reserved"] / max(measured["cuda_max_reserved"], 1)
        else:
            result["estimate_vs_measured"] = est.breakdown["total"] / max(measured["rss_peak_over_baseline"], 1)
            result["process_estimate_vs_measured"] = est.breakdown["process_peak"] / max(measured["rss_peak"], 1)
    return result


def format_profile(result: dict[str, Any]) -> str:
    """Measured next to estimated, in GiB."""
    m = result["measured"]
    lines = [f"device {result['device']}  config {json.dumps(result['config'])}"]
    for key in ("cuda_max_allocated", "cuda_max_reserved", "tracked_peak", "rss_peak_over_baseline"):
        if key in m:
            lines.append(f"measured {key:<24} {m[key] / GIB:8.3f} GiB")
    if "estimate" in result:
        b = result["estimate"]["bytes"]
        lines.append(f"estimated allocated peak          {b['allocated_peak'] / GIB:8.3f} GiB")
        lines.append(f"estimated total                   {b['total'] / GIB:8.3f} GiB")
        lines.append(f"estimate / measured                {result['estimate_vs_measured']:8.3f}")
        if "process_peak" in b and "rss_peak" in m:
            lines.append(f"measured whole-process peak (RSS) {m['rss_peak'] / GIB:8.3f} GiB")
            lines.append(f"estimated whole-process peak      {b['process_peak'] / GIB:8.3f} GiB")
            lines.append(f"whole-process estimate / measured  {result['process_estimate_vs_measured']:8.3f}")
    for name, s in result.get("module_peaks", {}).items():
        lines.append(
            f"  {name:<22} forward peak {s['forward_peak'] / GIB:7.3f} GiB, "
            f"kept {s['kept_after_forward'] / GIB:7.3f} GiB"
        )
    times = result.get("step_time_s") or []
    if times:
        lines.append(f"step time {min(times):.2f}-{max(times):.2f} s over {len(times)} steps")
    return "\n".join(lines)


def profile_in_subprocess(timeout: float | None = None, **kwargs: Any) -> dict[str, Any]:
    """``profile_memory(**kwargs)`` in a fresh interpreter, so peak RSS is this configuration's own.

    ``model`` may be a ModelConfig; ``policy`` a CheckpointPolicy, a dict or a name.
    """
    args = dict(kwargs)
    if isinstance(args.get("model"), ModelConfig):
        args["model"] = args["model"].model_dump()
    if isinstance(args.get("policy"), CheckpointPolicy):
        args["policy"] = args["policy"].to_dict()
    # The task object travels as it is (the child imports its class when unpickling it).
    args["task"] = base64.b64encode(pickle.dumps(args["task"])).decode() if "task" in args else None
    env = {**os.environ, **MALLOC_ENV}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "ssl3d.memory.profile", "--json-args", json.dumps(args, default=str)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"profile subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="internal: profile_memory in this process, JSON result on stdout")
    p.add_argument("--json-args", required=True)
    a = p.parse_args(argv)
    kwargs = json.loads(a.json_args)
    model = kwargs.pop("model", {})
    model = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()})
    if kwargs.get("task"):
        kwargs["task"] = pickle.loads(base64.b64decode(kwargs["task"]))
    with contextlib.redirect_stdout(sys.stderr):
        result = profile_memory(model, **kwargs)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    _main()
