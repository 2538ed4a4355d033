"""What keeps the contrastive head from collapsing? Short pre-trainings on the demo data, one change each.

A collapsed contrastive head maps every view to the same point: its loss sits at exactly ln(2N - 1) for 2N views in
the loss (ln 3 at the reference's 4), the embeddings' per-dimension std goes to 0 and their effective rank to 1
(``ssl3d.ssl.monitors``). Each variant below is a real ``ssl3d pretrain`` run (two processes over torchrun for the
global negatives), read back from its TensorBoard events at every validation:

- ``reference``: the CPU demo preset's model and data, 2 crops a volume (4 views), temperature 0.5, weights 1/1/1;
- ``temperature-0.1``: a sharper softmax;
- ``crops-4``: 4 crops a volume (8 views, 7 negatives each), with contrastive gradient caching 4 views a chunk;
- ``contrastive-x4``: contrastive weight 4 (the reconstruction loss no longer dominates the encoder's gradient);
- ``gather-2-ranks``: DDP on 2 ranks with ``"gather_contrastive": true``: each rank's loss sees both ranks' views.

    python bench/collapse.py --work /tmp/ssl3d_collapse --steps 60 --eval-every 20   # results: BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl3d.run_config import DEMO_CPU  # noqa: E402

# The CPU demo preset's model, data and optimiser (``ssl3d pretrain`` with no config), cosine schedule.
BASE = {
    **{k: v for k, v in DEMO_CPU.items() if not k.startswith("train.")},
    "data.num_workers": 1,
    "train.batch_size": 1,
    "optim.schedule": "warmup_cosine",
    "train.progress": False,
}
VARIANTS: dict[str, tuple[dict, int, dict | None]] = {  # name -> (overrides, ranks, preset)
    "reference": ({}, 1, None),
    "temperature-0.1": ({"ssl.temperature": 0.1}, 1, None),
    "crops-4": ({"data.num_samples": 4, "ssl.grad_cache_chunk": 4}, 1, None),
    "contrastive-x4": ({"ssl.contrastive_weight": 4.0}, 1, None),
    "gather-2-ranks": ({}, 2, {"strategy": "ddp", "gather_contrastive": True}),
}
TAGS = {
    "contrastive": "Validation/loss_contrastive",
    "rotation": "Validation/loss_rotation",
    "std": "Validation/collapse_embedding_std",
    "rank": "Validation/collapse_effective_rank",
    "recon_masked": "Validation/loss_reconstruction_masked",
}


def sets(values: dict) -> list[str]:
    return [f"--set={k}={json.dumps(v)}" for k, v in values.items()]


def read_events(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags()["scalars"])
    return {k: [(e.step, e.value) for e in acc.Scalars(tag)] for k, tag in TAGS.items() if tag in have}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/ssl3d_collapse"))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--only", help="comma list of variants")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    demo = a.work / "demo_data"
    if not (demo / "dataset_demo.json").is_file():
        subprocess.run([sys.executable, "-m", "ssl3d.cli", "data", "demo", str(demo)], check=True)
    results = {}
    for name, (overrides, ranks, preset) in VARIANTS.items():
        if a.only and name not in a.only.split(","):
            continue
        logdir = a.work / name
        cfg = {**BASE, **overrides, "train.num_steps": a.steps, "train.eval_num": a.eval_every}
        cfg |= {"train.logdir": str(logdir), "train.seed": a.seed}
        args = ["--datalist", str(demo / "dataset_demo.json"), *sets(cfg)]
        if preset:
            (a.work / f"{name}.json").write_text(json.dumps(preset))
            args += ["--ds_config", str(a.work / f"{name}.json")]
        if ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "launch/pretrain.py"]
        else:
            cmd = [sys.executable, "-m", "ssl3d.cli", "pretrain"]
        if not (logdir / "summary.json").is_file():
            t = time.perf_counter()
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // ranks))}
            proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
            print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        # Validation runs each rank's own batches (no gathering): its collapsed value depends on the local views.
        local = 2 * cfg["data.num_samples"] * cfg["train.batch_size"]
        results[name] = {
            "views_in_training_loss": local * ranks if preset and preset.get("gather_contrastive") else local,
            "views_in_validation_loss": local,
            "collapsed_at": math.log(local - 1),
            **read_events(logdir),
        }
    (a.work / "collapse.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))


def format_table(results: dict) -> str:
    lines = [
        "| variant | views in training loss | val: ln(2N-1) | val contrastive (each validation) | embedding std | "
        "effective rank | val rotation (ln 4 = 1.386) | masked recon. L1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():

        def series(key: str, fmt: str = "{:.3f}", r: dict = r) -> str:
            return " / ".join(fmt.format(v) for _, v in r.get(key, [])) or "-"

        lines.append(
            f"| {name} | {r['views_in_training_loss']} | {r['collapsed_at']:.4f} | {series('contrastive', '{:.4f}')} | "
            f"{series('std')} | {series('rank', '{:.2f}')} | {series('rotation')} | {series('recon_masked')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
