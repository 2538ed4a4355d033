"""Per-rank memory of parameters, gradients and optimizer states for every backend, measured next to the theory.

Each backend preset (``ds_configs/<name>.json``) runs in its own fresh group of real gloo processes (world size 2;
``single`` is one process, the baseline). Every rank builds the strategy from the preset as the CLI does
(``build_strategy``), builds the model, sets it up with AdamW, and runs one full optimizer step (so optimizer
states exist) and then the forward + backward of a second step (so gradients exist as well). Inputs, outputs and
the loss are dropped; then every distinct live tensor storage is summed (``gc.get_objects()``, deduplicated by
``untyped_storage().data_ptr()``) and attributed:

- params: storages of the model's parameters (the local shard of an FSDP2 DTensor; ``ds_tensor`` under ZeRO-3);
- grads: their ``.grad`` and DeepSpeed's gradient partitions (attributes of the ZeRO optimizer named ``*grad*``);
- master: fp32 master copies the optimizer steps on that are not the model's parameters (DeepSpeed's ZeRO
  optimizers keep them even in an fp32 run);
- optim: the torch optimizer's state (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``);
- buckets: DeepSpeed's gradient reduction buckets (``ipg``/``bucket`` attributes): a fixed size from the preset's
  ``reduce_bucket_size`` (DeepSpeed's default 5e8 elements when ``"auto"``), independent of the model;
- other: everything else that appeared after the baseline (module buffers such as Swin's relative position
  indices, small DeepSpeed/FSDP bookkeeping tensors).

The same walk before the model is built is the baseline that is subtracted. Tensors that only C++ holds (DDP's
reducer buckets once the gradients are dropped, gloo's buffers) are invisible to the walk: the resident-set growth
is printed next to it as a cross-check. On CUDA the per-device split shows what offload moved to the host; on a
CPU-only machine everything is host memory, so offload rows only show which copies exist, not where they live.

    python bench/model_states.py                              # all presets, full-size model, world size 2
    python bench/model_states.py --only zero3,fsdp --json out.json
    python bench/model_states.py --only zero2,zero3 --reduce-bucket-size 5e6   # what smaller buckets save
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

MIB = 2**20
ROOT = Path(__file__).resolve().parent.parent
# DeepSpeedCPUAdam is a C++ extension JIT-compiled on first use (minutes on 2 cores): the offload presets step the
# torch optimizer on the host instead. Memory is the same (fp32 Adam moments either way).
TORCH_OPT = {"zero_force_ds_cpu_optimizer": False}
# name -> (preset file, world size, overrides)
BACKENDS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "single": ("single", 1, {}),
    "ddp": ("ddp", 2, {}),
    "fsdp": ("fsdp", 2, {}),
    "fsdp_offload": ("fsdp_offload", 2, {}),
    "zero1": ("zero1", 2, {}),
    "zero2": ("zero2", 2, {}),
    "zero2_offload": ("zero2_offload", 2, TORCH_OPT),
    "zero3": ("zero3", 2, {}),
    "zero3_offload": ("zero3_offload", 2, TORCH_OPT),
    "fairscale": ("fairscale", 2, {}),  # legacy, not in the default set
}
DEFAULT = [b for b in BACKENDS if b != "fairscale"]
CATEGORIES = ("params", "grads", "master", "optim", "buckets", "other")


# -- measuring -------------------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns memory: an FSDP2 DTensor's local shard, else the tensor itself."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def _storage(t: Any) -> tuple[int, int, str] | None:
    """(data_ptr, nbytes, device) of the storage under ``t``; None for meta/wrapper tensors without memory."""
    if not isinstance(t, torch.Tensor):
        return None
    t = _local(t)
    try:
        if t.device.type == "meta" or t.is_sparse:
            return None
        s = t.untyped_storage()
        ptr, nbytes = s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if ptr == 0 or nbytes == 0:
        return None
    return ptr, nbytes, t.device.type


def live_storages() -> dict[int, tuple[int, str]]:
    """data_ptr -> (bytes, device) of every distinct storage under a live Python tensor."""
    gc.collect()
    out: dict[int, tuple[int, str]] = {}
    for obj in gc.get_objects():
        try:
            is_tensor = isinstance(obj, torch.Tensor)
        except ReferenceError:  # a dead weakproxy
            continue
        if is_tensor:
            s = _storage(obj)
            if s is not None:
                out[s[0]] = (s[1], s[2])
    return out


def _walk(obj: Any, path: str, found: dict[int, tuple[str, torch.Tensor]], seen: set[int], depth: int = 0) -> None:
    """Attribute path of every tensor reachable from ``obj`` through attributes, lists, tuples and dicts."""
    if id(obj) in seen or depth > 5:
        return
    seen.add(id(obj))
    s = _storage(obj)
    if s is not None:
        found.setdefault(s[0], (path, obj))
        return
    if isinstance(obj, torch.nn.Module) or isinstance(obj, (str, bytes, int, float, bool)) or obj is None:
        return  # the model's tensors are attributed from its parameters and buffers
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            _walk(v, f"{path}[{k!r}]" if not isinstance(k, torch.Tensor) else f"{path}[tensor]", found, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(list(obj)):
            _walk(v, f"{path}[{i}]", found, seen, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "fairscale", "torch"):
        for k, v in list(vars(obj).items()):
            _walk(v, f"{path}.{k}", found, seen, depth + 1)


def _category_of_path(path: str) -> str:
    low = path.lower()
    if "ipg" in low or "bucket" in low:
        return "buckets"
    if "grad" in low:
        return "grads"
    if "fp32" in low or "master" in low or "single_partition" in low:
        return "master"
    if "fp16" in low or "bit16" in low or "lp_param" in low or "partitioned_param" in low:
        return "params"
    return "other"


def torch_optimizer(opt: Any) -> torch.optim.Optimizer | None:
    """The innermost torch optimizer under DeepSpeed's / fairscale's wrappers."""
    for _ in range(5):
        if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "optim"):
            return opt
        inner = getattr(opt, "optimizer", None) or getattr(opt, "optim", None)
        if inner is None or inner is opt:
            return opt if isinstance(opt, torch.optim.Optimizer) else None
        opt = inner
    return None


def attribute(strategy: Any, module: torch.nn.Module) -> dict[int, tuple[str, str]]:
    """data_ptr -> (category, label) for the storages that can be attributed; first claim wins."""
    labels: dict[int, tuple[str, str]] = {}

    def claim(t: Any, category: str, label: str) -> None:
        s = _storage(t)
        if s is not None and s[0] not in labels:
            labels[s[0]] = (category, label)

    params = list(module.parameters())
    for p in params:
        claim(getattr(p, "ds_tensor", None), "params", "ds_tensor")
        claim(p, "params", "parameter")
    for p in params:
        claim(p.grad, "grads", "param.grad")
    inner = torch_optimizer(strategy.optimizer)
    if inner is not None:
        for group in inner.param_groups:
            for p in group["params"]:
                claim(p, "master", "optimizer param (fp32 master)")
                claim(p.grad, "grads", "optimizer param .grad")
        for state in inner.state.values():
            for k, v in state.items():
                claim(v, "optim", f"optimizer state {k}")
    for b in module.buffers():
        claim(b, "other", "module buffers")
    # DeepSpeed's engine and ZeRO optimizer, fairscale's OSS/ShardedDDP: label by attribute name.
    found: dict[int, tuple[str, torch.Tensor]] = {}
    seen: set[int] = {id(module)}
    for root, prefix in ((strategy.optimizer, "optimizer"), (getattr(strategy, "engine", None), "engine")):
        if root is not None and root is not inner:
            _walk(root, prefix, found, seen)
    if getattr(strategy, "model", None) is not module and strategy.model is not None:
        _walk(strategy.model, "wrapper", found, seen)
    for ptr, (path, _t) in found.items():
        if ptr not in labels:
            labels[ptr] = (_category_of_path(path), path)
    # ``.grad`` lives in C++, out of the walk's reach: e.g. ZeRO-3's host-side gradient of its fp32 partitions
    # under optimizer offload (the torch optimizer's param_groups are emptied between DeepSpeed's steps).
    for path, t in found.values():
        claim(getattr(t, "grad", None), "grads", f"{path}.grad")
    return labels


class LargeAllocations(TorchDispatchMode):
    """New storages of at least ``threshold`` bytes created while active, with the Python site that made them.

    Catches what the after-backward walk cannot: buffers that exist only during backward or the optimizer step
    (DeepSpeed's gradient buckets). On the CPU ``torch.empty`` reserves address space that becomes resident only
    when written; on a GPU the same call allocates the whole size.
    """

    def __init__(self, threshold: int = 16 * MIB) -> None:
        super().__init__()
        self.threshold = threshold
        self.known: set[int] = set(live_storages())
        self.sites: dict[str, list[int]] = {}  # site -> sizes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        try:
            for t in tree_flatten(out)[0]:
                s = _storage(t)
                if s is None or s[1] < self.threshold or s[0] in self.known:
                    continue
                self.known.add(s[0])
                self.sites.setdefault(_site(), []).append(s[1])
        except Exception:  # noqa: BLE001 - bookkeeping must never break the step
            pass
        return out


SITE_PACKAGES = ("deepspeed", "fairscale", "monai", "ssl3d", "torch/distributed", "torch/nn/parallel")
SITE_SKIP = ("deepspeed/utils/nvtx.py", "typing_extensions", "_python_dispatch", "model_states.py", "contextlib")


def _site() -> str:
    """file:function of the innermost frame in a training library (DeepSpeed, torch.distributed, ssl3d, ...)."""
    for f in reversed(traceback.extract_stack()):
        name = f.filename.replace("\\", "/")
        if any(k in name for k in SITE_SKIP):
            continue
        for pkg in SITE_PACKAGES:
            i = name.rfind("/" + pkg + "/")
            if i >= 0:
                return f"{name[i + 1 :]}:{f.name}"
    return "torch internals"


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def measure(baseline: dict[int, tuple[int, str]], labels: dict[int, tuple[str, str]]) -> dict[str, Any]:
    """Bytes per category and device of the storages that are new since ``baseline``; the largest 'other' ones."""
    live = live_storages()
    by_cat = {c: {} for c in CATEGORIES}
    detail: dict[str, int] = {}
    for ptr, (nbytes, device) in live.items():
        if ptr in baseline and baseline[ptr][0] == nbytes:
            continue
        category, label = labels.get(ptr, ("other", "unattributed"))
        by_cat[category][device] = by_cat[category].get(device, 0) + nbytes
        key = f"{category}: {_short(label)}"
        detail[key] = detail.get(key, 0) + nbytes
    return {
        "bytes": {c: sum(d.values()) for c, d in by_cat.items()},
        "by_device": by_cat,
        "total": sum(sum(d.values()) for d in by_cat.values()),
        "detail": dict(sorted(detail.items(), key=lambda kv: -kv[1])),
        "rss": current_rss(),
    }


def _short(label: str) -> str:
    """An attribute path without list indices, so a bucket list reads as one entry."""
    import re

    return re.sub(r"\[\d+\]", "[i]", label)


# -- one rank ---------------------------------------------------------------------------------------------------
def _run_config(a: argparse.Namespace, ds_path: Path):
    from ssl3d.config import Config, ModelConfig, OptimConfig

    cfg = Config()
    cfg.model = ModelConfig(feature_size=a.feature_size)
    cfg.optim = OptimConfig(name="adamw")
    cfg.train.batch_size = a.batch
    cfg.train.grad_accum = 1
    cfg.train.grad_clip = 1.0
    cfg.train.precision = a.precision
    cfg.train.device = a.device
    cfg.ds_config = str(ds_path)
    return cfg


def _forward_backward(strategy, model, loss_fn, x: torch.Tensor, gen: torch.Generator) -> None:
    """One micro-batch as the trainer runs it (two augmented views, all three SSL losses); nothing is returned."""
    from ssl3d.ssl import make_views

    views = make_views(x, gen)
    with strategy.accumulate(True):
        with strategy.autocast():
            out = model(views.corrupted)
        losses = loss_fn(
            out.rotation.float(), views.rot_labels, out.contrastive.float(), out.reconstruction.float(), views.views
        )
        strategy.backward(losses["total"])


def worker(rank: int, name: str, a: argparse.Namespace, port: int, out: str) -> None:
    preset_name, world, overrides = BACKENDS[name]
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(max(1, a.threads // world))
    warnings.filterwarnings("ignore")  # DeepSpeed 0.19 calls c10d functions torch 2.13 deprecates, per collective
    out_dir = Path(out)
    result: dict[str, Any] = {"backend": name, "rank": rank, "world": world}
    try:
        preset = json.loads((ROOT / "ds_configs" / f"{preset_name}.json").read_text())
        preset.update(overrides)
        zero = preset.get("zero_optimization")
        if zero is not None and a.reduce_bucket_size:
            for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
                if key in zero:
                    zero[key] = int(a.reduce_bucket_size)
        result["preset"] = preset
        ds_path = out_dir / f"{name}_rank{rank}.json"
        ds_path.write_text(json.dumps(preset))

        from ssl3d.model import build_model
        from ssl3d.model.attention import apply_fused_attention
        from ssl3d.optim import build_optimizer
        from ssl3d.ssl import SSLLoss
        from ssl3d.strategies import build_strategy

        if preset.get("strategy") == "deepspeed":
            from ssl3d.strategies.deepspeed import import_deepspeed

            import_deepspeed()  # its import-time tensors belong to the baseline
        cfg = _run_config(a, ds_path)
        # The process group a real run gets: build_strategy joins it with the backend ssl3d picks for the device
        # (NCCL on CUDA: gloo has no all_gather_into_tensor / reduce_scatter for CUDA tensors, which FSDP2 and ZeRO
        # need), on this rank's GPU.
        strategy = build_strategy(cfg)
        assert strategy.world_size == world

        baseline = live_storages()
        rss0 = current_rss()
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.ssl.contrastive_dim)
        result["num_params"] = sum(p.numel() for p in model.parameters())
        result["buffer_bytes"] = sum(b.numel() * b.element_size() for b in model.buffers())
        if cfg.model.fused_attention:
            apply_fused_attention(model)
        t0 = time.perf_counter()
        wrapped, _ = strategy.setup(model, lambda params: build_optimizer(cfg.optim, params))
        module = getattr(strategy, "module", None) or model
        loss_fn = SSLLoss()
        # Inputs drawn on the device by the device's generator (a CUDA generator cannot fill a CPU tensor).
        gen = torch.Generator(device=strategy.device).manual_seed(rank + 1)
        x_shape = (a.batch, 1, *a.roi)

        times = result["seconds"] = {"setup": time.perf_counter() - t0}

        # Step 1: optimizer states come to exist (torch's Adam creates them lazily).
        t0 = time.perf_counter()
        x = torch.rand(x_shape, generator=gen, device=strategy.device)
        _forward_backward(strategy, wrapped, loss_fn, x, gen)
        del x
        strategy.step(cfg.train.grad_clip)
        times["step1"] = time.perf_counter() - t0
        result["after_step1"] = measure(baseline, attribute(strategy, module))
        # Step 2, up to its backward: parameters, gradients and optimizer states all live at once.
        t0 = time.perf_counter()
        x = torch.rand(x_shape, generator=gen, device=strategy.device)
        tracker = LargeAllocations(a.large_mib * MIB)
        with tracker:
            _forward_backward(strategy, wrapped, loss_fn, x, gen)
        del x
        result["states"] = measure(baseline, attribute(strategy, module))
        with tracker:
            strategy.step(cfg.train.grad_clip)
        times["step2"] = time.perf_counter() - t0
        result["after_step2"] = measure(baseline, attribute(strategy, module))
        result["large_allocations"] = {k: v for k, v in sorted(tracker.sites.items(), key=lambda kv: -max(kv[1]))}
        result["rss_baseline"] = rss0
        if strategy.device.type == "cuda":
            result["cuda_max_allocated"] = torch.cuda.max_memory_allocated(strategy.device)
        strategy.barrier()
    except Exception:  # noqa: BLE001 - reported in the table
        result["error"] = traceback.format_exc()
        raise
    finally:
        (out_dir / f"{name}_rank{rank}.result.json").write_text(json.dumps(result, default=str))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# -- theory and table -------------------------------------------------------------------------------------------
def theory(name: str, preset: dict[str, Any], P: int, N: int) -> tuple[float, str]:
    """Bytes per rank of fp32 params + grads + Adam states (16 B a parameter on one process) and the formula."""
    stage = (preset.get("zero_optimization") or {}).get("stage", 0)
    strategy = preset.get("strategy")
    if strategy == "fsdp" or (strategy == "deepspeed" and stage == 3):
        return 16 * P / N, "16P/N"
    if strategy == "deepspeed" and stage == 2 or strategy == "fairscale":
        return 4 * P + 12 * P / N, "4P + 4P/N + 8P/N"
    if strategy == "deepspeed" and stage == 1:
        return 8 * P + 8 * P / N, "4P + 4P + 8P/N"
    return 16 * P, "16P"


def _mib(b: float) -> str:
    return f"{b / MIB:.1f}"


def _accel(m: dict[str, Any]) -> int:
    return sum(v for devs in m["by_device"].values() for d, v in devs.items() if d != "cpu")


def table(results: list[dict[str, Any]]) -> str:
    accel = any("states" in r and _accel(r["states"]) for r in results)
    rows = [
        "| backend | rank | params | grads | fp32 master | optim | buckets | other | **total** | theory (formula) "
        "| states / theory | total between steps | RSS growth |" + (" on accelerator |" if accel else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if accel else ""),
    ]
    for r in results:
        if "error" in r or "states" not in r:
            err = (r.get("error") or "no result").strip().splitlines()[-1][:150]
            rows.append(f"| {r['backend']} | {r.get('rank', '-')} | failed: {err} |" + " |" * 10)
            continue
        m = r["states"]
        b = m["bytes"]
        P, N = r["num_params"], r["world"]
        th, formula = theory(r["backend"], r["preset"], P, N)
        states = b["params"] + b["grads"] + b["master"] + b["optim"]
        rows.append(
            f"| {r['backend']} | {r['rank']} | {_mib(b['params'])} | {_mib(b['grads'])} | {_mib(b['master'])} "
            f"| {_mib(b['optim'])} | {_mib(b['buckets'])} | {_mib(b['other'])} | **{_mib(m['total'])}** "
            f"| {_mib(th)} ({formula}) | {states / th:.2f} | {_mib(r['after_step2']['total'])} "
            f"| {_mib(m['rss'] - r['rss_baseline'])} |" + (f" {_mib(_accel(m))} |" if accel else "")
        )
    return "\n".join(rows)


def goal_lines(results: list[dict[str, Any]]) -> list[str]:
    """ZeRO-3 / FSDP2: params + grads + master + optim <= 1.1 x 16P/N, with buckets + other as the overhead."""
    lines = []
    for r in results:
        if "states" not in r or r["rank"] != 0:
            continue
        th, formula = theory(r["backend"], r["preset"], r["num_params"], r["world"])
        if formula != "16P/N":
            continue
        b = r["states"]["bytes"]
        states = b["params"] + b["grads"] + b["master"] + b["optim"]
        overhead = b["buckets"] + b["other"]
        ok = states <= 1.1 * th
        lines.append(
            f"- {r['backend']}: params+grads+master+optim {_mib(states)} MiB vs 1.1 x 16P/N = {_mib(1.1 * th)} MiB "
            f"-> {'PASS' if ok else 'FAIL'} ({states / th:.2f}x); overhead (buckets + other) {_mib(overhead)} MiB; "
            f"total {_mib(r['states']['total'])} MiB <= {_mib(1.1 * th + overhead)} MiB"
        )
    return lines


def detail_lines(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        if "states" in r and r["rank"] == 0:
            items = ", ".join(f"{k} {_mib(v)}" for k, v in r["states"]["detail"].items() if v >= MIB // 10)
            devices = sorted({d for devs in r["states"]["by_device"].values() for d in devs})
            lines.append(f"- {r['backend']} ({'+'.join(devices)}): {items or '-'}")
    return lines


def large_lines(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        if "large_allocations" in r and r["rank"] == 0:
            items = [
                f"{site} {len(sizes)} x {_mib(max(sizes))}"
                if len(set(sizes)) == 1
                else f"{site} {len(sizes)} ({_mib(min(sizes))}-{_mib(max(sizes))})"
                for site, sizes in list(r["large_allocations"].items())[:4]
            ]
            lines.append(f"- {r['backend']}: {'; '.join(items) or '-'}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma list of backends (default: {','.join(DEFAULT)}; also: fairscale)")
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument(
        "--roi",
        default="64,32,32",
        help="input size, one number or three (default: the smallest with the 2 last-stage tokens the heads read; "
        "model states do not depend on it, and the step stays a few seconds on a shared CPU)",
    )
    p.add_argument("--batch", type=int, default=1, help="volumes per rank (two views each)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads over all ranks")
    p.add_argument("--reduce-bucket-size", type=float, help="override DeepSpeed's bucket sizes (elements)")
    p.add_argument("--large-mib", type=float, default=32, help="report step-2 allocations of at least this size")
    p.add_argument("--json", help="also write the per-rank results to this file")
    a = p.parse_args()
    roi = [int(v) for v in a.roi.split(",")]
    a.roi = tuple(roi * 3 if len(roi) == 1 else roi)
    names = a.only.split(",") if a.only else DEFAULT
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        p.error(f"unknown backends {unknown}; choose from {list(BACKENDS)}")

    import torch.multiprocessing as mp

    from ssl3d.strategies.distributed import free_port

    # Large blocks straight from mmap, so freed activations leave the resident set at once (RSS cross-check).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    print(
        f"feature size {a.feature_size}, ROI {'x'.join(map(str, a.roi))}, {a.batch} volume(s) x 2 views per rank, "
        f"{a.precision}, AdamW, {a.device}, {a.threads} threads over all ranks",
        file=sys.stderr,
        flush=True,
    )
    results: list[dict[str, Any]] = []
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            world = BACKENDS[name][1]
            if a.device == "cuda" and world > gpus:  # one rank per GPU, as the launchers place them
                error = f"needs {world} GPUs (one per rank), this machine has {gpus}"
                results += [{"backend": name, "rank": rank, "error": error} for rank in range(world)]
                print(f"{name}: skipped: {error}", file=sys.stderr, flush=True)
                continue
            t0 = time.perf_counter()
            try:
                mp.spawn(worker, args=(name, a, free_port(), tmp), nprocs=world, join=True)
            except Exception as exc:  # noqa: BLE001 - the failed rank's traceback is in its result
                print(f"{name}: failed: {exc}", file=sys.stderr, flush=True)
            for rank in range(world):
                path = Path(tmp) / f"{name}_rank{rank}.result.json"
                results.append(
                    json.loads(path.read_text()) if path.exists() else {"backend": name, "rank": rank, "error": "none"}
                )
            secs = next((r.get("seconds") for r in results[-world:] if "seconds" in r), {})
            phases = ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
            print(f"{name}: {time.perf_counter() - t0:.0f} s ({phases})", file=sys.stderr, flush=True)
    P = next((r["num_params"] for r in results if "num_params" in r), 0)
    print(f"\nP = {P:,} parameters (16P = {_mib(16 * P)} MiB); MiB per rank\n")
    print(table(results))
    print("\nGoal (ZeRO-3, FSDP2): params + grads + master + optim <= 1.1 x 16P/N, overhead = buckets + other")
    print("\n".join(goal_lines(results)))
    print("\nWhat each category holds (MiB, rank 0; devices in brackets):")
    print("\n".join(detail_lines(results)))
    print(f"\nNew storages of at least {a.large_mib:g} MiB during step 2 (forward, backward, optimizer step; rank 0):")
    print("\n".join(large_lines(results)))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
