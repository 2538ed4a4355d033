"""TensorBoard scalars and images, plus a PNG of the same planes next to the logs (rank 0 only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

# A voxel counts as content above this intensity (the scaled [0, 1] range; -800 HU with the reference's scaling).
FOREGROUND = 0.1
PANEL_PX = 256  # small ROIs are hard to see at one pixel per voxel: panels are zoomed to about this height

# Label colours (index 0, background, is never drawn): red, green, blue, yellow, magenta, cyan, orange, purple.
PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [0, 130, 200],
        [255, 225, 25],
        [240, 50, 230],
        [70, 240, 240],
        [245, 130, 48],
        [145, 30, 180],
    ],
    dtype=np.uint8,
)


def foreground_fraction(volume: torch.Tensor) -> float:
    """Share of a [C, H, W, D] crop that is content rather than air: picks the crop worth looking at."""
    return float((volume[0] > FOREGROUND).float().mean())


def _to_uint8(plane: torch.Tensor) -> np.ndarray:
    return (plane.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def content_planes(truth: torch.Tensor, *others: torch.Tensor) -> list[list[np.ndarray]]:
    """Axial, coronal and sagittal planes ([C, H, W, D] in RAS: x, y, z), each at the slice where the ground
    truth holds the most foreground (not the middle slice, which in a crop of a body is often air), shown with
    anterior / superior up. One row per plane, one column per volume, as uint8 images."""
    fg = (truth[0] > FOREGROUND).float()
    x = int(fg.sum(dim=(1, 2)).argmax())  # sagittal: the x with most content
    y = int(fg.sum(dim=(0, 2)).argmax())
    z = int(fg.sum(dim=(0, 1)).argmax())
    rows = []
    for take in (lambda v: v[0, :, :, z], lambda v: v[0, :, y, :], lambda v: v[0, x, :, :]):
        rows.append([_to_uint8(take(v).T.flip(0)) for v in (truth, *others)])
    return rows


def grid(rows: list[list[np.ndarray]], border: int = 2) -> np.ndarray:
    """Planes side by side (axial | coronal | sagittal), one line per volume (ground truth, corrupted input,
    reconstruction), white borders, zoomed (nearest) to about PANEL_PX per panel. A shorter plane is padded with
    white, never with black that would read as air."""
    zoom = max(1, PANEL_PX // max(p.shape[0] for row in rows for p in row))
    height = max(p.shape[0] for row in rows for p in row)

    def cell(p: np.ndarray) -> np.ndarray:
        short = (height - p.shape[0]) * zoom
        p = np.pad(np.kron(p, np.ones((zoom, zoom), dtype=np.uint8)), border, constant_values=255)
        return np.pad(p, ((0, short), (0, 0)), constant_values=255)

    lines = [np.concatenate([cell(plane[v]) for plane in rows], axis=1) for v in range(len(rows[0]))]
    return np.concatenate(lines, axis=0)


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
        """Ground truth / corrupted input / reconstruction of one crop ([C, H, W, D] each), in three planes through
        its content: TensorBoard gets each column's axial plane and the whole grid, the log folder a PNG."""
        if self.writer is None:
            return None
        rows = content_planes(truth, corrupted, recon)
        for name, s in zip(("ground_truth", "corrupted", "reconstruction"), rows[0]):
            self.writer.add_image(f"{tag}/{name}", s[None], step, dataformats="CHW")
        image = grid(rows)
        self.writer.add_image(f"{tag}/planes", image[None], step, dataformats="CHW")
        path = self.logdir / "images" / f"{tag.lower()}_step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        return path

    def overlay(
        self, tag: str, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, num_classes: int, step: int
    ) -> Path | None:
        """Image / label / prediction ([1, H, W, D] each) on the axial slice with the most labelled voxels."""
        if self.writer is None:
            return None
        z = int((label[0] > 0).sum(dim=(0, 1)).argmax())
        gray = (image[0, :, :, z].detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.float32)
        base = np.repeat(gray[..., None], 3, axis=2)
        panels = [base]
        for seg in (label, pred):
            s = seg[0, :, :, z].detach().long().cpu().numpy()
            colour = PALETTE[s % len(PALETTE)].astype(np.float32)
            mixed = np.where((s > 0)[..., None], 0.45 * base + 0.55 * colour, base)
            panels.append(mixed)
        for name, panel in zip(("image", "label", "prediction"), panels):
            self.writer.add_image(f"{tag}/{name}", panel.astype(np.uint8), step, dataformats="HWC")
        # Each panel turned so that anterior is up, as axial slices are shown.
        pad = [np.pad(np.rot90(p), ((2, 2), (2, 2), (0, 0)), constant_values=255) for p in panels]
        strip = np.ascontiguousarray(np.concatenate(pad, axis=1).astype(np.uint8))
        zoom = max(1, 192 // strip.shape[0])
        path = self.logdir / "images" / f"{tag.lower()}_overlay_step_{step:08d}.png"
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
