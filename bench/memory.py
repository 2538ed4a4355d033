"""Peak memory and step time of every checkpointing policy, measured next to the estimate.

Each configuration runs in a fresh interpreter (``profile_in_subprocess``), so its peak RSS is its own; on CUDA the
figures are max_memory_allocated / reserved instead. The first step also warms up kernels and creates the optimizer
states; the step time reported is the best of the later steps (the CPU may be shared: times are noisy).

    python bench/memory.py                      # full-size model, ROI 64, batch 1 x 2 crops, CPU
    python bench/memory.py --roi 96 --device cuda --precision bf16 --json out.json
    python bench/memory.py --crops 4 --only none,full --grad-cache-chunk 2   # gradient caching, 2 of 8 views
    python bench/memory.py --task finetune --num-classes 14 --roi 96 --crops 1 --only none,decoder,full

Fine-tuning (``--task finetune``: MONAI's SwinUNETR, Dice+CE) and the probe run the ladder's rungs that differ for
their model (``task_ladder``); MONAI's ``use_checkpoint`` row is pre-training's only (ssl3d builds SwinUNETR without).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl3d.config import ModelConfig  # noqa: E402
from ssl3d.memory.estimate import GIB  # noqa: E402
from ssl3d.memory.plan import DEFAULT_LADDER, task_ladder  # noqa: E402
from ssl3d.memory.profile import profile_in_subprocess  # noqa: E402
from ssl3d.step import StepSettings  # noqa: E402
from ssl3d.tasks import PRETRAIN, TASKS, get_task  # noqa: E402

ROWS = [
    ("eager-none", {"policy": "none"}, False, False),
    ("eager-monai-use_checkpoint", {"policy": "none"}, False, True),
    *[(name, pol, True, False) for name, pol in DEFAULT_LADDER],
    ("offload-no-recompute", {"policy": "offload"}, True, False),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--crops", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--only", help="comma list of row names to run (default: all)")
    p.add_argument("--grad-cache-chunk", type=int, default=0, help="views per chunk with gradient caching (0: off)")
    p.add_argument("--task", default=PRETRAIN.name, choices=list(TASKS))
    p.add_argument("--num-classes", type=int, default=14, help="finetune/probe: classes including background")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args()
    rows = ROWS
    task = get_task(a.task)
    if task is not PRETRAIN:
        step = StepSettings(
            ModelConfig(feature_size=a.feature_size), (a.roi,) * 3, task=task, num_classes=a.num_classes
        )
        rows = [("eager-none", {"policy": "none"}, False, False)]
        rows += [(name, pol, True, False) for name, pol in task_ladder(DEFAULT_LADDER, step)]
    rows = [r for r in rows if not a.only or r[0] in a.only.split(",")]
    results = []
    head = (
        "| policy | fused attn | measured peak (GiB) | estimated (GiB) | est/meas | whole-process measured (GiB) "
        "| whole-process estimated (GiB) | est/meas | step time (s) |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    views = f" (x{task.views_per_crop} views)" if task.views_per_crop > 1 else ""
    print(
        f"{task.describe(a.num_classes)}full-size={a.feature_size == 48} feature {a.feature_size}, ROI {a.roi}^3, "
        f"batch {a.batch} x {a.crops} crops{views}, {a.precision}, {a.device}, {a.threads} threads, gradient caching "
        f"{a.grad_cache_chunk or 'off'}"
    )
    print(head, flush=True)
    for name, policy, fused, monai_ckpt in rows:
        model = ModelConfig(feature_size=a.feature_size, use_checkpoint=monai_ckpt)
        r = profile_in_subprocess(
            model=model,
            roi=a.roi,
            batch_size=a.batch,
            num_samples=a.crops,
            precision=a.precision,
            policy=policy,
            fused_attention=fused,
            steps=a.steps,
            device=a.device,
            threads=a.threads,
            module_peaks=False,
            breakdown=False,
            grad_cache_chunk=a.grad_cache_chunk,
            task=task,
            num_classes=a.num_classes,
        )
        m = r["measured"]
        measured = m.get("cuda_max_allocated", m.get("rss_peak_over_baseline", 0))
        est = r["estimate"]["bytes"]["allocated_peak" if "cuda_max_allocated" in m else "total"]
        times = r["step_time_s"][1:] or r["step_time_s"]
        # Whole process (what top shows) on CPU: the libraries' baseline + the step; on CUDA the reserved peak.
        whole = m.get("cuda_max_reserved", m.get("rss_peak", 0))
        whole_est = r["estimate"]["bytes"].get("process_peak", r["estimate"]["bytes"]["reserved"])
        row = {"name": name, "policy": policy, "fused": fused, "monai_checkpoint": monai_ckpt, **r}
        results.append(row)
        print(
            f"| {name} | {'on' if fused else 'off'} | {measured / GIB:.3f} | {est / GIB:.3f} | "
            f"{est / max(measured, 1):.2f} | {whole / GIB:.3f} | {whole_est / GIB:.3f} | "
            f"{whole_est / max(whole, 1):.2f} | {min(times):.1f} |",
            flush=True,
        )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
