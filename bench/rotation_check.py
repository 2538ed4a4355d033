"""Can the rotation pretext learn at all in the collapse benchmark's setting? A control for ``bench/collapse.py``.

On real CT, no setting of ``bench/collapse.py --direct`` learns rotation in 300 steps, and rotation alone (the
other two weights at 0) stays at chance too. This control runs the same training path (``SSLTask`` with the
rotation-only loss, the benchmark's small model, crop size, AdamW, warm-up + cosine schedule, the reference's 4
views a step, masked and pasted inputs) on crops of a synthetic volume whose four rotations look different: an
intensity ramp along one axis of the rotation plane and a bright slab at one end of the other. If the path were
broken (labels not matching the views, the head reading the wrong token, the corruption hiding the orientation),
it would stay at chance here as well.

    python bench/rotation_check.py --steps 300 --eval-every 25        # results: BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from collapse import DIRECT_LR, DIRECT_MODEL, DIRECT_ROI, DIRECT_WARMUP, _loss, _monitors  # noqa: E402

from ssl3d.config import ModelConfig, OptimConfig  # noqa: E402
from ssl3d.model import build_model  # noqa: E402
from ssl3d.optim import lr_at  # noqa: E402
from ssl3d.ssl import MaskingParams, make_views  # noqa: E402
from ssl3d.ssl.task import SSLTask  # noqa: E402
from ssl3d.step import LocalBackend  # noqa: E402


def oriented_volume(shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """[1, H, W, D] in [0, 1]: noise, a ramp along W and a bright slab at the low end of D (the rotation plane is
    (W, D)), so each of the four rotations of a crop looks different."""
    h, w, d = shape
    vol = torch.rand(1, h, w, d, generator=generator, device=generator.device) * 0.2
    vol += torch.linspace(0, 0.5, w).view(1, 1, w, 1)
    vol[..., : d // 5] += 0.3
    return vol.clamp_(0, 1)


def random_crops(vol: torch.Tensor, count: int, roi: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """``count`` random crops of ``roi`` from ``vol`` [1, H, W, D] -> [count, 1, *roi]."""
    out = []
    for _ in range(count):
        starts = [
            int(torch.randint(0, s - r + 1, (1,), generator=generator, device=generator.device))
            for s, r in zip(vol.shape[1:], roi)
        ]
        out.append(vol[(slice(None), *(slice(s, s + r) for s, r in zip(starts, roi)))])
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    roi = DIRECT_ROI
    gen = torch.Generator().manual_seed(a.seed * 1000 + 1)
    vol = oriented_volume((roi[0] + 32, roi[1] * 2, roi[2] * 2), gen)
    val = make_views(random_crops(vol, 32, roi, gen), gen, MaskingParams())  # 64 fixed validation views
    model = build_model(ModelConfig(**DIRECT_MODEL))
    optim_cfg = OptimConfig(lr=DIRECT_LR, warmup_steps=DIRECT_WARMUP, schedule="warmup_cosine")
    optimizer = torch.optim.AdamW(model.parameters(), lr=DIRECT_LR, weight_decay=optim_cfg.weight_decay)
    backend = LocalBackend(optimizer)
    task = SSLTask(_loss({"contrastive_weight": 0, "reconstruction_weight": 0}), MaskingParams(), gen)
    record: dict = {"steps": a.steps, "seed": a.seed, "monitors": []}
    t0 = time.perf_counter()
    train_losses: list[float] = []
    for step in range(a.steps + 1):
        if step % a.eval_every == 0:
            acc = _monitors(model, [val], task.loss_fn)["rotation_acc"]  # the benchmark's own monitor
            window = train_losses[-a.eval_every :]
            mean_loss = sum(window) / len(window) if window else float("nan")
            record["monitors"].append({"step": step, "rotation_acc": acc, "train_rotation_loss": mean_loss})
            print(f"step {step}: validation rotation accuracy {acc:.3f}, training rotation loss {mean_loss:.3f}")
        if step == a.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(optim_cfg, step, a.steps)
        losses = task.forward_backward(model, random_crops(vol, 2, roi, gen), backend, sync=True)
        backend.step()
        train_losses.append(float(losses["rotation"]))
    record["seconds"] = time.perf_counter() - t0
    if a.json:
        Path(a.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
