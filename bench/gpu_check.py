"""The GPU checks of the memory issue in one script (a few minutes on one H100/H200):

1. largest cubic ROI that trains with the device capped at 32 GiB (``set_per_process_memory_fraction``), using
   what ``--fit-memory 32GiB`` would choose at each ROI, with the estimate next to the measured peak;
2. throughput at ROI 96, batch 2 x 2 crops: ssl3d (bf16, fused attention) against the reference-equivalent step
   (fp32, eager attention, anomaly detection, one forward per view) on the same card.

Each configuration runs in a fresh process, so an out-of-memory error or the cap cannot leak into the next one.

    python bench/gpu_check.py --json gpu_check.json
    python bench/gpu_check.py --device cpu --feature-size 12 --rois 64 --cap-gib 0 --skip-throughput  # dry run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 2**30


def run_one(a: argparse.Namespace) -> dict:
    """One ROI in this process: cap the device, plan with the estimator, train ``--steps`` steps, report."""
    import torch

    from ssl3d.config import ConfigError, ModelConfig
    from ssl3d.memory.plan import fit_memory
    from ssl3d.memory.profile import profile_memory

    model = ModelConfig(feature_size=a.feature_size)
    cap = int(a.cap_gib * GIB)
    if a.device == "cuda" and cap:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
    common = {"precision": a.precision, "fused_attention": True, "device": a.device}
    try:
        fit = fit_memory(cap or 2**50, model, a.one, a.batch, a.crops, **common)
        policy, chunk, planned = fit.policy, fit.grad_cache_chunk, fit.describe(cap or 2**50)
    except ConfigError as exc:  # the estimator says it does not fit: try the most frugal setting anyway
        policy, chunk, planned = {"policy": "full"}, 1, f"estimator: does not fit ({exc})"
    out = {"roi": a.one, "plan": planned, "policy": policy, "grad_cache_chunk": chunk}
    try:
        r = profile_memory(
            model,
            a.one,
            a.batch,
            a.crops,
            a.precision,
            policy,
            True,
            steps=a.steps,
            device=a.device,
            module_peaks=False,
            breakdown=False,
            grad_cache_chunk=chunk,
        )
        out.update(trained=True, measured=r["measured"], estimate=r["estimate"]["bytes"], step_time_s=r["step_time_s"])
    except torch.OutOfMemoryError as exc:
        out.update(trained=False, error=str(exc).splitlines()[0])
    return out


def sub(args: list[str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"trained": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument("--cap-gib", type=float, default=32.0, help="device memory cap (0: none)")
    p.add_argument("--rois", type=int, nargs="+", default=[128, 160, 192, 224, 256])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--crops", type=int, default=2)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--json", help="write all results here")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one ROI in this process
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a), default=str))
        return
    t0 = time.perf_counter()
    results: dict = {"args": vars(a), "rois": []}
    print(f"## Largest ROI under a {a.cap_gib:g} GiB cap ({a.precision}, batch {a.batch} x {a.crops} crops)")
    print("| ROI | plan | trained | measured peak allocated / reserved (GiB) | estimated allocated (GiB) | step (s) |")
    print("|---|---|---|---|---|---|")
    flags = [f"--device={a.device}", f"--feature-size={a.feature_size}", f"--cap-gib={a.cap_gib}"]
    flags += [f"--batch={a.batch}", f"--crops={a.crops}", f"--precision={a.precision}", f"--steps={a.steps}"]
    for roi in a.rois:
        r = sub([__file__, *flags, f"--one={roi}"], a.timeout)
        results["rois"].append(r)
        m = r.get("measured", {})
        peak = f"{m.get('cuda_max_allocated', m.get('rss_peak_over_baseline', 0)) / GIB:.2f}"
        if "cuda_max_reserved" in m:
            peak += f" / {m['cuda_max_reserved'] / GIB:.2f}"
        est = f"{r['estimate']['allocated_peak'] / GIB:.2f}" if "estimate" in r else "-"
        times = r.get("step_time_s") or [float("nan")]
        print(f"| {roi} | {r.get('plan', '-')} | {r['trained']} | {peak} | {est} | {min(times):.2f} |", flush=True)
        if not r["trained"]:
            print(f"  {r.get('error')}")
    if not a.skip_throughput:
        common = ["bench/step.py", "--roi=96", "--batch=2", "--crops=2", "--steps=5", f"--device={a.device}"]
        ref = sub([*common, "--modes=reference", "--precision=fp32", "--mode=reference"], 600)
        ours = sub([*common, "--modes=ssl3d", f"--precision={a.precision}", "--mode=ssl3d"], 600)
        results["throughput"] = {"reference": ref, "ssl3d": ours}
        if "step_time_s" in ref and "step_time_s" in ours:
            print(
                f"\nROI 96, batch 2 x 2: reference-equivalent {ref['step_time_s']:.3f} s/step, ssl3d "
                f"{ours['step_time_s']:.3f} s/step: throughput {ref['step_time_s'] / ours['step_time_s']:.2f}x"
            )
        else:
            print(f"\nthroughput run failed: {ref.get('error')} / {ours.get('error')}")
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\n{results['seconds']} s in all")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
