"""Published GPU memory figures for Swin UNETR against ssl3d's estimate, on paper (no GPU is run).

Every configuration of the reference list of published figures whose settings are known is estimated as its source
ran it: MONAI's own window attention (ssl3d's fused attention off), MONAI's ``use_checkpoint`` (each Swin block's
attention half and MLP half recomputed, nothing else: ssl3d's ``selective`` policy on all stages with ``part`` "both",
``MONAI_USE_CHECKPOINT``), fp16 autocast for AMP, PyTorch DDP's default separate gradient buckets for multi-GPU runs.
Fine-tuning figures use the estimator's fine-tuning task (MONAI's SwinUNETR, Dice+CE), the reference's
pre-training statement its pre-training task (two forward passes, one per view). Where a source does not state a
setting (AMP, checkpointing, the batch's meaning, GB or GiB), each reading is a row.

Measured figures: ratio estimate / figure, for the allocated peak (``max_memory_allocated``) and for the total (what
nvidia-smi shows: reserved + CUDA context), reading the source's "GB" as 10^9 bytes and as GiB. Fit statements ("it
ran on card X"): the estimate's total against the card's capacity and against the capacity less ``--fit-memory``'s
margin (``CAPACITY_MARGIN``).

    python bench/published.py                 # every figure (a few minutes on 2 CPU cores: ~30 traces)
    python bench/published.py --only 4,5      # figures 4 and 5 of the list
    python bench/published.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl3d.config import ModelConfig  # noqa: E402
from ssl3d.memory.estimate import GIB, estimate_memory  # noqa: E402
from ssl3d.memory.plan import CAPACITY_MARGIN, usable_capacity  # noqa: E402
from ssl3d.step import StepSettings  # noqa: E402
from ssl3d.tasks import get_task  # noqa: E402

GB = 10**9
MIB = 2**20
# MONAI's SwinTransformerBlock with use_checkpoint: checkpoint(forward_part1) and checkpoint(forward_part2), each
# block; no patch merging, no decoder (a unit test holds this equal to building the model with MONAI's flag).
MONAI_USE_CHECKPOINT = {
    "policy": "selective",
    "stages": [0, 1, 2, 3],
    "part": "both",
    "decoder": False,
    "merging": False,
}
# Capacities as torch reports them (get_device_properties().total_memory; OOM messages print it in GiB).
V100_32GB = ("V100 32 GB", 34_089_730_048)  # 32510 MiB
V100_16GB = ("V100 16 GB", 16_945_512_448)  # 16160 MiB: "15.78 GiB total capacity"
T4 = ("T4 16 GB (Colab)", int(14.75 * GIB))  # "14.75 GiB total capacity" in Colab's OOM messages
RTX4070 = ("RTX 4070 12 GB", int(11.71 * GIB))  # the source's own OOM message
AMP = {"fp16 AMP": "fp16", "fp32": "fp32"}
CKPT = {"no ckpt": None, "MONAI ckpt": MONAI_USE_CHECKPOINT}


@dataclass(frozen=True)
class Reading:
    """One way to run a figure's configuration (the source's stated settings plus one choice per unstated one)."""

    label: str
    precision: str
    policy: dict[str, Any] | None
    batch_size: int = 1
    num_samples: int = 1


@dataclass(frozen=True)
class Figure:
    """A published figure (GPU_FIGURES.md item ``number``) and the configuration its source ran."""

    number: str
    source: str
    settings: str  # what is stated, in words
    kind: str  # "measured" (a peak), "lower bound" (peak allocated above it), "fits" / "does not fit" (on ``card``)
    task: str
    model: ModelConfig
    roi: int
    readings: tuple[Reading, ...]
    value: float = 0.0  # measured / lower bound: as published, in ``unit``
    unit: str = "GB"  # "GB" (unstated: read as 10^9 bytes and as GiB) or "GiB" (PyTorch's message)
    card: tuple[str, int] | None = None
    num_classes: int = 14
    world_size: int = 1  # DDP ranks (the reference's torch.distributed.launch), 1: one GPU
    two_passes: bool = False
    heuristic: bool = False  # a formula, not a measurement: shown, not counted
    notes: tuple[str, ...] = field(default=())


def _readings(
    amp: dict[str, str] = AMP, ckpt: dict[str, Any] = CKPT, batches: dict[str, tuple[int, int]] | None = None
) -> tuple[Reading, ...]:
    out = []
    for b_label, (batch, crops) in (batches or {"": (1, 1)}).items():
        for a_label, precision in amp.items():
            for c_label, policy in ckpt.items():
                label = ", ".join(x for x in (b_label, a_label, c_label) if x)
                out.append(Reading(label, precision, policy, batch, crops))
    return tuple(out)


def figures() -> list[Figure]:
    """GPU_FIGURES.md, items with known settings (2, 6, 12, 13, 15: time, inference or no settings; see the end)."""
    f48 = ModelConfig(feature_size=48)
    seg = "1 -> 14 ch"
    return [
        Figure(
            "1", "SegResMamba (arXiv:2503.07766) Table 8, BTCV", f"SwinUNETR f48 {seg}, 128^3, batch 1, A100 40GB",
            "measured", "finetune", f48, 128, _readings(), value=7.77,
            notes=("AMP likely ('gradient scaling'), checkpointing and how memory was read not stated",),
        ),
        Figure(
            "1", "SegResMamba (arXiv:2503.07766) Table 8, BraTS", "SwinUNETR f48 4 -> 3 ch, 128^3, batch 1, A100 40GB",
            "measured", "finetune", ModelConfig(feature_size=48, in_channels=4), 128, _readings(), value=7.68,
            num_classes=3,
        ),
        Figure(
            "4", "MONAI issue #8042 (OOM message)", "SwinUNETR f24 4 -> 3 ch, 128^3, batch 1, no ckpt, RTX 4070",
            "lower bound", "finetune", ModelConfig(feature_size=24, in_channels=4), 128,
            _readings(ckpt={"no ckpt": None}), value=6.92 + 1.32, unit="GiB", num_classes=3,
            notes=("peak allocated > 6.92 GiB allocated + the 1.32 GiB it failed to allocate",),
        ),
        Figure(
            "4", "MONAI issue #8042 (OOM message)", "the same run did not fit the RTX 4070 (11.71 GiB)",
            "does not fit", "finetune", ModelConfig(feature_size=24, in_channels=4), 128,
            _readings(ckpt={"no ckpt": None}), card=RTX4070, num_classes=3,
            notes=("3.48 GiB were reserved but unallocated at the failure: fragmentation well above 10%",),
        ),
        Figure(
            "5", "research-contributions SwinUNETR/Pretrain README + main.py defaults",
            "pre-training f48, 96^3, batch 1 x 2 crops, 2 forward passes (views), fp16 AMP, no ckpt, AdamW, "
            "DDP 8 ranks", "fits", "pretrain", f48, 96,
            (Reading("as stated", "fp16", None, 1, 2),), card=V100_32GB, world_size=8, two_passes=True,
        ),
        Figure(
            "7", "research-contributions issue #94 (BTCV fine-tuning)",
            f"SwinUNETR f48 {seg}, 96^3, AMP, DDP 4 ranks, 'batch size 4'", "fits", "finetune", f48, 96,
            _readings(amp={"fp16 AMP": "fp16"}, batches={"4 x 4 = 16 patches": (4, 4), "1 x 4 = 4 patches": (1, 4)}),
            card=V100_32GB, world_size=4,
        ),
        Figure(
            "8", "model-zoo swin_unetr_btcv_segmentation", f"SwinUNETR f48 {seg}, 96^3, 2 x 2 = 4 patches, AMP, Adam",
            "fits", "finetune", f48, 96, _readings(amp={"fp16 AMP": "fp16"}, batches={"": (2, 2)}), card=V100_32GB,
            notes=("'at least 32GB'; use_checkpoint true in train.json (false for one day in 2023)",),
        ),
        Figure(
            "9", "Swin UNETR BraTS paper (arXiv:2201.01266) + BRATS21 README",
            "SwinUNETR f48 4 -> 3 ch, 128^3, batch 1 per GPU, DDP 8 ranks, V100 16 or 32 GB", "fits", "finetune",
            ModelConfig(feature_size=48, in_channels=4), 128, _readings(), card=V100_32GB, num_classes=3,
            world_size=8, notes=("repo default: --use_checkpoint --noamp (fp32 + MONAI ckpt)",),
        ),
        Figure(
            "10", "Auto3DSeg swinunetr template (auto_scale heuristic)", f"SwinUNETR f48 {seg}, 96^3, AMP, no ckpt",
            "measured", "finetune", f48, 96, _readings(amp={"fp16 AMP": "fp16"}, ckpt={"no ckpt": None},
            batches={"2 patches": (1, 2)}), value=2 * (6 + 14 * 12 / 103), heuristic=True,
            notes=("a formula (mem_bs2, C = 14), not a measurement",),
        ),
        Figure(
            "10", "Auto3DSeg swinunetr template (auto_scale heuristic)", f"SwinUNETR f48 {seg}, 96^3, AMP, no ckpt",
            "measured", "finetune", f48, 96, _readings(amp={"fp16 AMP": "fp16"}, ckpt={"no ckpt": None},
            batches={"9 patches": (1, 9)}), value=2 * (24 + 50 * 12 / 103), heuristic=True,
            notes=("a formula (mem_bs9, C = 14), not a measurement",),
        ),
        Figure(
            "10", "Auto3DSeg swinunetr template README", f"SwinUNETR f48 {seg}, 96^3, 2 patches, AMP, no ckpt",
            "fits", "finetune", f48, 96, _readings(amp={"fp16 AMP": "fp16"}, ckpt={"no ckpt": None},
            batches={"": (1, 2)}), card=V100_16GB, notes=("'at least 16GB-memory GPUs'",),
        ),
        Figure(
            "11", "tutorials PR #774 (Optimize Swin UNETR)", f"SwinUNETR f48 {seg}, 96^3, 1 x 4 patches, MONAI ckpt",
            "fits", "finetune", f48, 96, _readings(ckpt={"MONAI ckpt": MONAI_USE_CHECKPOINT}, batches={"": (1, 4)}),
            card=V100_32GB, notes=("'one 32GB RAM GPU', fp32 and AMP runs both",),
        ),
        Figure(
            "14", "tutorials issue #1258 (free Colab)", f"SwinUNETR f48 {seg}, 96^3, 1 x 4 patches, AMP, MONAI ckpt",
            "fits", "finetune", f48, 96, (Reading("as stated", "fp16", MONAI_USE_CHECKPOINT, 1, 4),), card=T4,
            notes=("training steps ran, then OOM in validation (not modelled); the GPU is not named: a T4 assumed",),
        ),
    ]  # fmt: skip


LEFT_OUT = (
    ("2", "epoch time (321 s), not memory"),
    ("6", "GPU counts only (32 GPUs / 8 GPUs), no memory; the step is #5's"),
    ("12", "training hours; the batch is auto-scaled, the step is not reconstructable"),
    ("13", "inference time, input shape not stated"),
    ("15", "not plain SwinUNETR (text-driven heads)"),
)


def estimate(fig: Figure, r: Reading) -> dict[str, Any]:
    """The estimate of one reading; a DDP run adds PyTorch DDP's default buckets (gradient_as_bucket_view=False: a
    second copy of the fp32 gradients; ssl3d's DDP uses the gradients as the buckets)."""
    step = StepSettings(
        fig.model, (fig.roi,) * 3, r.batch_size, r.num_samples, r.precision, r.policy, fused_attention=False,
        two_passes=fig.two_passes, task=get_task(fig.task), num_classes=fig.num_classes,
    )  # fmt: skip
    strategy = "ddp" if fig.world_size > 1 else "single"
    est = estimate_memory(step, strategy=strategy, world_size=fig.world_size, device="cuda")
    b = est.breakdown
    buckets = est.config["parameters_count"] * 4 if strategy == "ddp" else 0
    return {"allocated": b["allocated_peak"] + buckets, "total": b["total"] + buckets, "ddp_buckets": buckets}


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def judge(fig: Figure, e: dict[str, Any]) -> tuple[str, bool | None]:
    """The row's last column and whether it agrees with the figure (None: a heuristic, not counted)."""
    if fig.kind == "measured":
        units = {"GB": GB, "GiB": GIB} if fig.unit == "GB" else {"GiB": GIB}
        ratios = {(m, u): e[m] / (fig.value * f) for m in ("allocated", "total") for u, f in units.items()}
        text = "; ".join(f"{m[:5]} " + "/".join(f"{ratios[(m, u)]:.2f}" for u in units) for m in ("allocated", "total"))
        ok = any(0.8 <= v <= 1.2 for v in ratios.values())
        return text + (f" ({'/'.join(units)})" if len(units) > 1 else ""), None if fig.heuristic else ok
    if fig.kind == "lower bound":
        bound = fig.value * (GIB if fig.unit == "GiB" else GB)
        ok = e["allocated"] >= bound
        return f"alloc {e['allocated'] / bound:.2f} x the bound: {'consistent' if ok else 'BELOW the bound'}", ok
    assert fig.card is not None
    name, capacity = fig.card
    total = e["total"]
    if fig.kind == "does not fit":
        ok = total > capacity
        return f"{_gib(total)} of {_gib(capacity)} GiB: {'does not fit (consistent)' if ok else 'FITS'}", ok
    if total <= usable_capacity(capacity):
        return (
            f"fits {name} with the {CAPACITY_MARGIN:.0%} margin ({_gib(total)} <= {_gib(usable_capacity(capacity))})",
            True,
        )
    if total <= capacity:
        return f"fits {name}, inside the margin ({_gib(total)} of {_gib(capacity)})", True
    return f"DOES NOT FIT {name} ({_gib(total)} > {_gib(capacity)})", False


def run(only: set[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for fig in figures():
        if only and fig.number not in only:
            continue
        for r in fig.readings:
            t0 = time.perf_counter()
            e = estimate(fig, r)
            verdict, ok = judge(fig, e)
            rows.append(
                {
                    "figure": fig.number,
                    "kind": fig.kind + (" (heuristic)" if fig.heuristic else ""),
                    "source": fig.source,
                    "settings": fig.settings,
                    "reading": r.label,
                    "published": f"{fig.value:.2f} {fig.unit}" if fig.value else (fig.card[0] if fig.card else ""),
                    "estimate_allocated": e["allocated"],
                    "estimate_total": e["total"],
                    "verdict": verdict,
                    "agrees": ok,
                    "notes": list(fig.notes),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
    return rows


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per figure (and kind): does at least one reading agree (within 20% / consistent)?"""
    out = []
    seen: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        seen.setdefault((row["figure"], row["kind"], row["source"]), []).append(row)
    for (number, kind, source), group in seen.items():
        if group[0]["agrees"] is None:
            continue
        good = [r["reading"] for r in group if r["agrees"]]
        goal = "within 20%" if kind == "measured" else "consistent"
        out.append(f"#{number} {source} ({kind}): " + (f"{goal} under: {'; '.join(good)}" if good else f"NOT {goal}"))
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| # | source | settings | reading | published | est. allocated (GiB) | est. total (GiB) "
        "| ratio est/figure or verdict |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['figure']} | {r['source']} | {r['settings']} | {r['reading']} | {r['published']} | "
            f"{_gib(r['estimate_allocated'])} | {_gib(r['estimate_total'])} | {r['verdict']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma list of figure numbers of the list (default: all)")
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args(argv)
    only = set(a.only.split(",")) if a.only else None
    rows = run(only)
    print(table(rows))
    print()
    for line in summary(rows):
        print(line)
    printed: set[str] = set()
    for fig in figures():
        for note in fig.notes if not only or fig.number in only else ():
            if note not in printed:
                print(f"note #{fig.number}: {note}")
                printed.add(note)
    for number, why in LEFT_OUT:
        if not only or number in only:
            print(f"left out #{number}: {why}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
