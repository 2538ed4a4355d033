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

By default (``--precision auto --cudnn-benchmark auto``) each mode runs at its own training settings: the
reference on a GPU as its script trains (fp16 autocast with a GradScaler, ``torch.backends.cudnn.benchmark =
True``), ssl3d at its own defaults (``train.precision`` "auto": bf16 from compute capability 8, fp16 below;
``train.cudnn_benchmark`` and ``train.allow_tf32`` where the run config has them); both in fp32 on the CPU, where
the reference cannot run at all. fp16 always comes with a GradScaler. ``--flops`` adds the step's FLOPs (torch's
FLOP counter on the untimed warm-up step) and the model FLOP utilisation: achieved FLOP/s over the dense matmul rate
measured in the same process (in the step's compute dtype on a GPU, fp32 on the CPU).
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
from typing import TYPE_CHECKING

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
    reference = a.mode == "reference"
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
    torch.autograd.set_detect_anomaly(reference)

    def step() -> None:
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
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    counter = None
    if a.flops:
        from torch.utils.flop_counter import FlopCounterMode

        count_cpu_sdpa()
        counter = FlopCounterMode(display=False)
    times = []
    for i in range(a.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # The warm-up step is not timed: it also runs under the FLOP counter (whose dispatch costs time).
        with counter if counter is not None and i == 0 else contextlib.nullcontext():
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = times[1:]  # the first step warms up allocators and kernels (and runs cuDNN's autotuning)
    out = {
        "mode": a.mode,
        "precision": precision,
        "grad_scaler": scaler.is_enabled(),
        "cudnn_benchmark": cudnn_benchmark,
        "tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "step_time_s": sum(steady) / len(steady),
        "step_times_s": [round(t, 3) for t in steady],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "minor_page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
    }
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
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="reference,ssl3d", help="comma list: reference, ssl3d")
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
    results = []
    for mode in a.modes.split(","):
        argv = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {})}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        label = a.policy if mode == "ssl3d" else ("use_checkpoint" if a.use_checkpoint else "plain")
        mfu = f"  {r['flops_per_step'] / 1e9:.1f} GFLOP/step, MFU {r['mfu']:.1%}" if "mfu" in r else ""
        print(
            f"{mode:10s} {label:14s} step {r['step_time_s']:.2f} s  "
            f"peak RSS {r['peak_rss_gib']:.2f} GiB  {r['step_times_s']}  page faults {r['minor_page_faults']}{mfu}"
        )
    if len(results) == 2:
        ref, ours = results
        print(
            f"ratio ssl3d/reference: step time {ours['step_time_s'] / ref['step_time_s']:.2f}x, "
            f"peak RSS {ours['peak_rss_gib'] / ref['peak_rss_gib']:.2f}x"
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
