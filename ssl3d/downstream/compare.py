"""One table from many runs: Dice per initialisation and labelled-volume count, mean and spread over seeds.

Writes ``comparison.json`` (every run and the aggregate), ``comparison.md`` (the table) and ``comparison.png``
(final mean Dice against labelled volumes, one line per initialisation, bars from the smallest to the largest seed).
The final validation Dice is compared, not the best over evaluations: choosing the best step on the validation
volumes would flatter whichever run is noisier.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ssl3d.memory.plan import _COLORS


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["init"], r["labelled"]), []).append(r)
    out = []
    for (init, labelled), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        final = [r["final_dice"] for r in runs]
        out.append(
            {
                "init": init,
                "labelled": labelled,
                "seeds": [r["seed"] for r in runs],
                "final_dice_mean": statistics.fmean(final),
                "final_dice_std": statistics.stdev(final) if len(final) > 1 else 0.0,
                "final_dice_min": min(final),
                "final_dice_max": max(final),
                "best_dice_mean": statistics.fmean(r["best_dice"] for r in runs),
            }
        )
    return out


def format_markdown(task: str, table: list[dict[str, Any]]) -> str:
    lines = [
        f"| {task}: init | labelled volumes | seeds | final mean Dice (mean +- std) | min .. max "
        "| best-step Dice (mean) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t in table:
        lines.append(
            f"| {t['init']} | {t['labelled']} | {len(t['seeds'])} | {t['final_dice_mean']:.3f} +- "
            f"{t['final_dice_std']:.3f} | {t['final_dice_min']:.3f} .. {t['final_dice_max']:.3f} | "
            f"{t['best_dice_mean']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_comparison(out_dir: Path, task: str, rows: list[dict[str, Any]]) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = aggregate(rows)
    paths = {"json": out_dir / "comparison.json", "md": out_dir / "comparison.md", "png": out_dir / "comparison.png"}
    paths["json"].write_text(json.dumps({"task": task, "runs": rows, "table": table}, indent=2) + "\n")
    paths["md"].write_text(format_markdown(task, table))
    plot_comparison(paths["png"], task, table)
    return paths


def plot_comparison(path: Path, task: str, table: list[dict[str, Any]]) -> None:
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 760, 480, 70, 210, 40, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = sorted({t["labelled"] for t in table})
    ymax = 1.0  # Dice: the whole range, so a small gain looks as small as it is
    x0, x1 = min(xs), max(xs)

    def px(n: float, dice: float) -> tuple[float, float]:
        frac = (n - x0) / (x1 - x0) if x1 > x0 else 0.5
        return left + frac * (w - left - right), h - bottom - dice / ymax * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(11):
        _, y = px(x0, i / 10)
        d.line([left, y, w - right, y], fill=(230, 230, 230))
        d.text((30, y - 6), f"{i / 10:.1f}", fill="black")
    for n in xs:
        x, _ = px(n, 0)
        d.line([x, h - bottom, x, h - bottom + 5], fill="black")
        d.text((x - 4, h - bottom + 8), str(n), fill="black")
    inits = sorted({t["init"] for t in table})
    for i, init in enumerate(inits):
        color = _COLORS[i % len(_COLORS)]
        rows = sorted((t for t in table if t["init"] == init), key=lambda t: t["labelled"])
        shift = (i - (len(inits) - 1) / 2) * 6  # keep the spread bars apart
        pts = []
        for t in rows:
            x, y = px(t["labelled"], t["final_dice_mean"])
            _, ylo = px(0, t["final_dice_min"])
            _, yhi = px(0, t["final_dice_max"])
            d.line([x + shift, ylo, x + shift, yhi], fill=color, width=1)
            pts.append((x + shift, y))
            d.ellipse([x + shift - 3, y - 3, x + shift + 3, y + 3], fill=color)
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        d.text((w - right + 10, top + 16 * i), f"init {init}"[:30], fill=color)
    d.text(
        (left, 12), f"{task}: final mean Dice (validation) vs labelled volumes; bars: min..max over seeds", fill="black"
    )
    d.text((w // 2 - 60, h - 20), "labelled training volumes", fill="black")
    img.save(path)
