"""Step time and peak memory of one pre-training step, ssl3d against a reference-equivalent step, side by side.

The reference-equivalent mode reproduces what the published script does per step: anomaly detection on,
per-sample/per-cuboid Python augmentation loops with NumPy random numbers, two forward passes (one per view).
Each mode runs in its own fresh process so peak memory (max RSS on CPU, max allocated on CUDA) is its own; the
minor page faults it prints show how often the allocator asked the kernel for fresh pages (run the command under
``LD_PRELOAD=...`` or ``MALLOC_*`` variables to compare allocators: both modes inherit them).

    python bench/step.py --feature-size 48 --roi 64 --batch 1 --crops 2 --steps 3 --threads 2
    python bench/step.py --modes ssl3d --policy '{"policy": "selective", "stages": [0, 1], "part": "both"}'
    python bench/step.py --modes ssl3d --roi 96 --device cuda --precision bf16
    python bench/step.py --roi 96 --batch 2 --device cuda --flops
    python bench/step.py --modes ssl3d --profile 25 --policy none    # where one step's time and bytes go
    python bench/step.py --modes reference,reference-no-anomaly,ssl3d,ssl3d-compile --rounds 2   # alternating

Modes: ``reference`` (as published), ``reference-no-anomaly`` (the same step without anomaly detection), ``ssl3d``
and ``ssl3d-compile`` (``model.compile``: every Swin block and decoder stage compiled with inductor; its first step
holds the compile, which inductor's on-disk cache shortens in a later process with the same shapes). ``--rounds R``
runs the list R times, alternating, and prints every ratio per round, so load that changes during the run shows as
a spread between rounds instead of a bias against one mode.

By default (``--precision auto --cudnn-benchmark auto``) each mode runs at its own training settings: the
reference on a GPU as its script trains (fp16 autocast with a GradScaler, ``torch.backends.cudnn.benchmark =
True``), ssl3d at its own defaults (``train.precision`` "auto": bf16 from compute capability 8, fp16 below;
``train.cudnn_benchmark`` and ``train.allow_tf32`` where the run config has them); both in fp32 on the CPU, where
the reference cannot run at all. fp16 always comes with a GradScaler.

``--flops`` adds the step's FLOPs (torch's FLOP counter on the untimed warm-up step: what runs, recomputation
included) and the FLOP utilisation: achieved FLOP/s over the dense matmul rate measured in the same process (in the
step's compute dtype on a GPU, fp32 on the CPU; bf16 too where the device multiplies it natively). With both modes,
the MFU on model FLOPs (the reference's count, in which nothing is recomputed) is printed for both side by side.
``--profile N`` runs one more step under ``torch.profiler`` and prints the N operators with the most self time,
split into forward, backward and optimizer, with the bytes each allocated; every mode also reports the minor page
faults per timed step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def reference_patch_drop(x, x_rep, rng, max_drop=0.3, max_block=0.25, tolr=0.05):
    """The reference's per-sample cuboid loop (host RNG, one slice assignment per cuboid)."""
    import torch

    c, h, w, z = x.shape
    n_drop = rng.uniform(0, max_drop) * h * w * z
    mx = (int(h * max_block), int(w * max_block), int(z * max_block))
    tl = (int(tolr * h), int(tolr * w), int(tolr * z))
    total = 0
    while total < n_drop:
        r, cc, s = rng.integers(0, h - tl[0]), rng.integers(0, w - tl[1]), rng.integers(0, z - tl[2])
        he = min(rng.integers(tl[0], mx[0]) + r, h)
        we = min(rng.integers(tl[1], mx[1]) + cc, w)
        ze = min(rng.integers(tl[2], mx[2]) + s, z)
        if x_rep is None:
            noise = torch.empty((c, he - r, we - cc, ze - s), dtype=x.dtype, device=x.device).normal_()
            x[:, r:he, cc:we, s:ze] = (noise - noise.min()) / (noise.max() - noise.min())
        else:
            x[:, r:he, cc:we, s:ze] = x_rep[:, r:he, cc:we, s:ze]
        total += (he - r) * (we - cc) * (ze - s)
    return x


def reference_views(x, rng):
    import torch

    def rot(xs):
        out = xs.detach().clone()
        labels = torch.zeros(xs.shape[0], dtype=torch.long, device=xs.device)
        for i in range(xs.shape[0]):
            k = int(rng.integers(0, 4))
            out[i] = xs[i].rot90(k, (2, 3))
            labels[i] = k
        return out, labels

    def aug(xs):
        out = xs.detach().clone()
        for i in range(xs.shape[0]):
            out[i] = reference_patch_drop(out[i], None, rng)
            j = int(rng.integers(0, xs.shape[0]))
            if j != i:
                out[i] = reference_patch_drop(out[i], out[j], rng)
        return out

    x1, r1 = rot(x)
    x2, r2 = rot(x)
    return x1, x2, aug(x1), aug(x2), torch.cat([r1, r2])


def dense_gemm_rate(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """The best dense matmul FLOP/s this process reaches on ``device`` in ``dtype``: MFU's denominator, measured
    rather than looked up, so it is this card at its clocks (or this CPU with its threads and current load)."""
    import torch

    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, spent, reps = 0.0, 0.0, 10 if cuda else 2
    torch.matmul(a, b)  # kernel selection and warm-up
    while spent < seconds:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, 2 * n**3 * reps / dt)
    return best


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively (CUDA from compute capability 8; a CPU with AVX512-BF16 or AMX),
    so a bf16 GEMM rate is worth measuring beside fp32's."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def count_cpu_sdpa() -> None:
    """Give torch's FLOP counter a formula for the CPU's fused attention kernel.

    The counter knows the CUDA kernels (flash, mem-efficient, cuDNN) only; on a CPU the fused window attention's
    forward would count as zero FLOPs and the MFU of a fused step would read low."""
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_registry:
        return

    @register_flop_formula(op)
    def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


PHASES = ("forward", "backward", "optimizer")


def _phase(event: Any) -> str | None:
    """The step phase (a ``record_function`` marker ``## name ##`` among the event's ancestors) of an event."""
    while event is not None:
        if event.name.startswith("## ") and event.name.endswith(" ##"):
            return event.name[3:-3]
        event = event.cpu_parent
    return None


def profile_table(prof: torch.profiler.profile, top: int, device_type: str = "cpu") -> dict:
    """Self CPU time and bytes allocated per operator and phase of one profiled step.

    Self time is torch's (an operator's time less its children's). Bytes are the allocations (not the net change)
    made while the operator, and none of its children, ran: the profiler's memory records on ``device_type``,
    attributed by time."""
    import bisect

    import torch

    results = prof.profiler.kineto_results
    t0 = results.trace_start_ns()  # FunctionEvent times are microseconds from the trace's start
    device = torch.device(device_type).type
    mem = sorted(
        ((e.start_ns() - t0) / 1000, e.nbytes())
        for e in results.events()
        if e.name() == "[memory]" and e.nbytes() > 0 and str(e.device_type()).split(".")[-1].lower() == device
    )
    times = [t for t, _ in mem]
    prefix = [0]
    for _, nbytes in mem:
        prefix.append(prefix[-1] + nbytes)

    def allocated(e) -> tuple[int, int]:
        lo = bisect.bisect_left(times, e.time_range.start)
        hi = bisect.bisect_right(times, e.time_range.end)
        return prefix[hi] - prefix[lo], hi - lo

    rows: dict[tuple[str, str], list[float]] = {}
    totals = {p: [0.0, 0, 0] for p in PHASES}
    for e in prof.events():
        phase = _phase(e)
        if phase not in totals or e.name.startswith("## "):
            continue
        nbytes, count = allocated(e)
        for child in e.cpu_children:
            b, c = allocated(child)
            nbytes, count = nbytes - b, count - c
        row = rows.setdefault((e.name, phase), [0.0, 0, 0, 0])
        row[0] += e.self_cpu_time_total / 1e6
        row[1] += nbytes
        row[2] += count
        row[3] += 1
        totals[phase][0] += e.self_cpu_time_total / 1e6
        totals[phase][1] += nbytes
        totals[phase][2] += count
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "phases": {p: {"self_s": t, "allocated_bytes": b, "allocations": c} for p, (t, b, c) in totals.items()},
        "allocated_bytes": prefix[-1],
        "allocations": len(mem),
        "top": [
            {"op": name, "phase": phase, "self_s": t, "allocated_bytes": b, "allocations": c, "calls": n}
            for (name, phase), (t, b, c, n) in ranked
        ],
    }


def print_profile(label: str, table: dict) -> None:
    """The profile as a Markdown table (what BENCHMARKS.md quotes)."""
    total = sum(p["self_s"] for p in table["phases"].values())
    phases = ", ".join(
        f"{k} {v['self_s']:.2f} s / {v['allocated_bytes'] / 2**30:.2f} GiB" for k, v in table["phases"].items()
    )
    print(
        f"\n{label}: profiled step {total:.2f} s self time ({phases}); "
        f"{table['allocated_bytes'] / 2**30:.2f} GiB in {table['allocations']} allocations"
    )
    print("| operator | phase | self time (s) | share | allocated (GiB) | calls |")
    print("|---|---|---|---|---|---|")
    for r in table["top"]:
        print(
            f"| {r['op']} | {r['phase']} | {r['self_s']:.3f} | {r['self_s'] / total:.1%} | "
            f"{r['allocated_bytes'] / 2**30:.2f} | {r['calls']} |"
        )


def training_settings(a: argparse.Namespace, device: torch.device) -> tuple[str, bool, bool | None]:
    """Precision, cudnn.benchmark and TF32 (None: torch's default) of this mode's step: what was asked, and for
    "auto" what the mode's own training does, so a comparison is against the reference as it really trained."""
    from ssl3d.config import TrainConfig
    from ssl3d.step import DTYPES
    from ssl3d.strategies.base import resolve_precision

    cuda = device.type == "cuda"
    if a.mode == "reference":
        # main.py: AMP (fp16 autocast + GradScaler) unless --noamp, and torch.backends.cudnn.benchmark = True.
        precision = a.precision if a.precision != "auto" else ("fp16" if cuda else "fp32")
        return precision, a.cudnn_benchmark == "on" or (a.cudnn_benchmark == "auto" and cuda), None
    names = {v: k for k, v in DTYPES.items()}
    precision = a.precision if a.precision != "auto" else names[resolve_precision("auto", device)]
    train = TrainConfig()  # ssl3d's switches, on by default; a config without them leaves torch's defaults
    own = cuda and bool(getattr(train, "cudnn_benchmark", False))
    benchmark = {"on": True, "off": False}.get(a.cudnn_benchmark, own)
    tf32 = getattr(train, "allow_tf32", None) if cuda else None
    return precision, benchmark, tf32


def run_one(a: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from ssl3d.config import ModelConfig
    from ssl3d.model import build_model
    from ssl3d.ssl import MaskingParams, SSLLoss, make_views

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.device(a.device)
    reference = a.mode.startswith("reference")
    precision, cudnn_benchmark, tf32 = training_settings(a, device)
    # With cudnn.benchmark the convolutions' algorithms are timed on the first step (the untimed warm-up step).
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    depths = tuple(a.depths)
    mcfg = ModelConfig(feature_size=a.feature_size, depths=depths, use_checkpoint=reference and a.use_checkpoint)
    model = build_model(mcfg)
    if not reference:
        from ssl3d.memory import apply_activation_checkpointing
        from ssl3d.model.attention import apply_fused_attention

        if not a.eager_attention:
            apply_fused_attention(model)
        policy = json.loads(a.policy) if a.policy.lstrip().startswith("{") else a.policy
        apply_activation_checkpointing(model, policy)
        if a.mode == "ssl3d-compile":
            from ssl3d.model.compile import compile_regions

            compile_regions(model)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    loss_fn = SSLLoss()
    n = a.batch * a.crops
    x = torch.rand(n, 1, *a.roi, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    rng = np.random.default_rng(0)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # fp16 needs loss scaling: the reference's AMP is autocast plus a GradScaler (ssl3d's single backend too).
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.autograd.set_detect_anomaly(a.mode == "reference")

    def step() -> None:
        from torch.profiler import record_function

        with record_function("## forward ##"):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                if reference:
                    x1, x2, a1, a2, labels = reference_views(x, rng)
                    o1, o2 = model(a1), model(a2)
                    rot = torch.cat([o1.rotation, o2.rotation])
                    emb = torch.cat([o1.contrastive, o2.contrastive])
                    rec = torch.cat([o1.reconstruction, o2.reconstruction])
                    target = torch.cat([x1, x2])
                else:
                    v = make_views(x, gen, MaskingParams())
                    o = model(v.corrupted)
                    rot, emb, rec, target, labels = o.rotation, o.contrastive, o.reconstruction, v.views, v.rot_labels
            loss = loss_fn(rot.float(), labels, emb.float(), rec.float(), target)["total"]
        with record_function("## backward ##"):
            scaler.scale(loss).backward()
        with record_function("## optimizer ##"):
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

    counter = None
    # Not for ssl3d-compile: with the counter's dispatch mode around its warm-up step, a compiled run's steps took an
    # eager step's time and memory (the compiled code was not seen to run); its FLOPs are the eager step's.
    if a.flops and a.mode != "ssl3d-compile":
        from torch.utils.flop_counter import FlopCounterMode

        count_cpu_sdpa()
        counter = FlopCounterMode(display=False)
    times, faults = [], []
    for i in range(a.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        # The warm-up step is not timed: it also runs under the FLOP counter (whose dispatch costs time).
        with counter if counter is not None and i == 0 else contextlib.nullcontext():
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    steady = times[1:]  # the first step warms up allocators and kernels (and runs cuDNN's autotuning)
    profile = None
    if a.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities, profile_memory=True) as prof:
            step()
        profile = profile_table(prof, a.profile, device.type)
    out = {
        "mode": a.mode,
        "precision": precision,
        "grad_scaler": scaler.is_enabled(),
        "cudnn_benchmark": cudnn_benchmark,
        "tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "first_step_s": times[0],
        "step_time_s": sum(steady) / len(steady),
        "step_times_s": [round(t, 3) for t in steady],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "minor_page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
        "page_faults_per_step": sum(faults[1:]) // len(faults[1:]),
    }
    if profile is not None:
        out["profile"] = profile
    if device.type == "cuda":
        out["cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["cuda_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if counter is not None:
        gemm_dtype = (dtype or torch.float32) if device.type == "cuda" else torch.float32
        out["flops_per_step"] = counter.get_total_flops()
        out["achieved_flops_per_s"] = out["flops_per_step"] / out["step_time_s"]
        out["gemm_dtype"] = str(gemm_dtype).removeprefix("torch.")
        out["gemm_flops_per_s"] = dense_gemm_rate(device, gemm_dtype)
        out["mfu"] = out["achieved_flops_per_s"] / out["gemm_flops_per_s"]
        if gemm_dtype != torch.bfloat16 and native_bf16(device):
            out["gemm_bf16_flops_per_s"] = dense_gemm_rate(device, torch.bfloat16)
    return out


MODES = ("reference", "reference-no-anomaly", "ssl3d", "ssl3d-compile")


def print_ratios(by_mode: dict[str, dict], prefix: str = "") -> None:
    """Step-time and peak-RSS ratios of every ssl3d mode to every reference mode (and compiled to eager) of one
    round, and the MFU of both on the reference's FLOP count where ``--flops`` measured it."""
    pairs = [(o, r) for o in ("ssl3d", "ssl3d-compile") for r in ("reference", "reference-no-anomaly", "ssl3d")]
    for ours_name, ref_name in pairs:
        if ours_name == ref_name or ours_name not in by_mode or ref_name not in by_mode:
            continue
        ours, ref = by_mode[ours_name], by_mode[ref_name]
        print(
            f"{prefix}ratio {ours_name}/{ref_name}: step time {ours['step_time_s'] / ref['step_time_s']:.2f}x, "
            f"peak RSS {ours['peak_rss_gib'] / ref['peak_rss_gib']:.2f}x"
        )
    ref, ours = by_mode.get("reference"), by_mode.get("ssl3d")
    if ref is not None and ours is not None and "mfu" in ref and "mfu" in ours:
        # Model FLOPs: the reference's count (eager attention, nothing recomputed). ssl3d's executed count also
        # holds what it recomputes (the fused attention's backward, checkpointed parts), which is not progress.
        model_flops = ref["flops_per_step"]
        print(
            f"{prefix}model FLOPs {model_flops / 1e9:.1f} GFLOP/step (the reference's count); MFU on them: reference "
            f"{model_flops / ref['step_time_s'] / ref['gemm_flops_per_s']:.1%}, ssl3d "
            f"{model_flops / ours['step_time_s'] / ours['gemm_flops_per_s']:.1%} (each of its own measured "
            f"GEMM rate); ssl3d executes {ours['flops_per_step'] / model_flops:.2f}x the model FLOPs"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--modes",
        default="reference,ssl3d",
        help="comma list of: reference, reference-no-anomaly, ssl3d, ssl3d-compile",
    )
    p.add_argument("--rounds", type=int, default=1, help="run the list of modes this many times, alternating")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # internal: one mode in this process
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument("--depths", type=int, nargs=4, default=[2, 2, 2, 2])
    p.add_argument("--roi", type=int, nargs="+", default=[64], help="one size (a cube) or three")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--crops", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, help="CPU threads (default: 2 on the CPU, torch's default with CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast dtype, fp16 with a GradScaler (auto: each mode's own, fp32 on the CPU)",
    )
    p.add_argument(
        "--cudnn-benchmark",
        default="auto",
        choices=["auto", "on", "off"],
        help="torch.backends.cudnn.benchmark (auto: on for the reference, ssl3d's train.cudnn_benchmark)",
    )
    p.add_argument("--flops", action="store_true", help="FLOPs per step, the measured matmul rate and the MFU")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="one more step under torch.profiler: the N operators with the most self time, bytes allocated",
    )
    p.add_argument("--use-checkpoint", action="store_true", help="reference mode: MONAI's per-block checkpointing")
    p.add_argument(
        "--policy",
        default="none",
        help="ssl3d mode: activation checkpointing policy (none, full, ... or a JSON section)",
    )
    p.add_argument("--eager-attention", action="store_true", help="ssl3d mode: MONAI's eager window attention")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args()
    if len(a.roi) not in (1, 3):
        p.error(f"--roi: got {len(a.roi)} numbers, expected one (a cube) or three")
    a.roi = tuple(a.roi * 3 if len(a.roi) == 1 else a.roi)
    if a.threads is None and a.device == "cpu":
        a.threads = 2
    if a.mode:
        print(json.dumps(run_one(a)))
        return
    modes = a.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"--modes: unknown {', '.join(unknown)}; expected a comma list of {', '.join(MODES)}")
    results = []
    for round_ in range(a.rounds):
        by_mode: dict[str, dict] = {}
        for mode in modes:
            argv = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
            env = {**os.environ, **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {})}
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["round"] = round_ + 1
            results.append(r)
            by_mode[mode] = r
            label = a.policy if mode.startswith("ssl3d") else ("use_checkpoint" if a.use_checkpoint else "plain")
            mfu = ""
            if "mfu" in r:
                bf16 = f", bf16 {r['gemm_bf16_flops_per_s'] / 1e9:.0f}" if "gemm_bf16_flops_per_s" in r else ""
                mfu = (
                    f"\n{'':10s} {r['flops_per_step'] / 1e9:.1f} GFLOP/step executed, "
                    f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s; dense GEMM {r['gemm_flops_per_s'] / 1e9:.0f} "
                    f"GFLOP/s ({r['gemm_dtype']}{bf16}); MFU {r['mfu']:.1%}"
                )
            print(
                f"{mode:10s} {label:14s} step {r['step_time_s']:.2f} s  first step {r['first_step_s']:.2f} s  "
                f"peak RSS {r['peak_rss_gib']:.2f} GiB  {r['step_times_s']}  page faults {r['minor_page_faults']} "
                f"({r['page_faults_per_step']} a step){mfu}",
                flush=True,
            )
            if "profile" in r:
                print_profile(f"{mode} {label}", r["profile"])
        print_ratios(by_mode, f"round {round_ + 1}: " if a.rounds > 1 else "")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
