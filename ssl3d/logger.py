"""TensorBoard scalars and images, plus a PNG strip of the same slices next to the logs (rank 0 only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def middle_slices(*volumes: torch.Tensor) -> list[np.ndarray]:
    """Axial slice at the middle of the last axis of [C, H, W, D] volumes, as uint8 [H, W] in [0, 255]."""
    out = []
    for v in volumes:
        s = v[0, :, :, v.shape[-1] // 2].detach().float().clamp(0, 1).cpu().numpy()
        out.append((s * 255).round().astype(np.uint8))
    return out


class RunLogger:
    """Writes only on the main process; every call is a no-op elsewhere."""

    def __init__(self, logdir: Path, enabled: bool):
        self.logdir = Path(logdir)
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(self.logdir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def images(
        self, tag: str, truth: torch.Tensor, corrupted: torch.Tensor, recon: torch.Tensor, step: int
    ) -> Path | None:
        """Ground truth / corrupted input / reconstruction of one sample ([C, H, W, D] each)."""
        if self.writer is None:
            return None
        slices = middle_slices(truth, corrupted, recon)
        for name, s in zip(("ground_truth", "corrupted", "reconstruction"), slices):
            self.writer.add_image(f"{tag}/{name}", s[None], step, dataformats="CHW")
        strip = np.concatenate([np.pad(s, ((2, 2), (2, 2)), constant_values=255) for s in slices], axis=1)
        zoom = max(1, 192 // strip.shape[0])  # small ROIs are hard to see at one pixel per voxel
        path = self.logdir / "images" / f"{tag.lower()}_step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(strip).resize((strip.shape[1] * zoom, strip.shape[0] * zoom), Image.NEAREST).save(path)
        return path

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
