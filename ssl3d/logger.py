"""TensorBoard scalars and images, plus a PNG of the same planes next to the logs (rank 0 only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# A voxel counts as content above this intensity (the scaled [0, 1] range; -800 HU with the reference's scaling).
FOREGROUND = 0.1
PANEL_PX = 256  # small ROIs are hard to see at one pixel per voxel: panels are zoomed to about this height
LABEL_PX = 14  # the labels' font size; smaller where a panel is too narrow for its name
PLANES = ("axial", "coronal", "sagittal")
VOLUMES = ("ground truth", "corrupted input", "reconstruction")

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


def _grid(rows: list[list[np.ndarray]], border: int) -> tuple[np.ndarray, list[int], list[int]]:
    """The grid, each column's width and each line's height in pixels (where the labels go)."""
    zoom = max(1, PANEL_PX // max(p.shape[0] for row in rows for p in row))
    height = max(p.shape[0] for row in rows for p in row)

    def cell(p: np.ndarray) -> np.ndarray:
        short = (height - p.shape[0]) * zoom
        p = np.pad(np.kron(p, np.ones((zoom, zoom), dtype=np.uint8)), border, constant_values=255)
        return np.pad(p, ((0, short), (0, 0)), constant_values=255)

    cells = [[cell(plane[v]) for plane in rows] for v in range(len(rows[0]))]
    lines = [np.concatenate(line, axis=1) for line in cells]
    return np.concatenate(lines, axis=0), [c.shape[1] for c in cells[0]], [line.shape[0] for line in lines]


def grid(rows: list[list[np.ndarray]], border: int = 2) -> np.ndarray:
    """Planes side by side (axial | coronal | sagittal), one line per volume (ground truth, corrupted input,
    reconstruction), white borders, zoomed (nearest) to about PANEL_PX per panel. A shorter plane is padded with
    white, never with black that would read as air."""
    return _grid(rows, border)[0]


def labelled_grid(rows: list[list[np.ndarray]], volumes: Sequence[str] = VOLUMES) -> np.ndarray:
    """``grid`` with each column's plane named above it and each line's volume to its left: nine unnamed panels
    leave a reader guessing which is the reconstruction."""
    image, widths, heights = _grid(rows, border=2)
    return label_panels(image, list(zip(PLANES, widths)), list(zip(volumes, heights)))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()  # the fixed bitmap font, about 11 pixels


def _text_size(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom)


def label_panels(
    image: np.ndarray, columns: Sequence[tuple[str, int]], rows: Sequence[tuple[str, int]] = ()
) -> np.ndarray:
    """``image`` (uint8, [H, W] or [H, W, 3]) below a header naming each column and, given ``rows``, right of a margin
    naming each row; ``columns`` / ``rows`` are (name, width / height in pixels) in order and cover the image. The
    content is copied unchanged into the lower right corner: a label never hides a voxel."""
    h, w = image.shape[:2]
    if sum(n for _, n in columns) != w or (rows and sum(n for _, n in rows) != h):
        raise ValueError(f"label extents {[n for _, n in columns]} x {[n for _, n in rows]} do not cover {w} x {h}")
    pad = 4
    size = LABEL_PX
    font = _font(size)
    while size > 8 and any(_text_size(font, name)[0] + pad > n for name, n in columns):
        size -= 1
        font = _font(size)
    line = max(_text_size(font, name)[1] for name, _ in (*columns, *rows))
    top = line + 2 * pad
    left = max((_text_size(font, name)[0] for name, _ in rows), default=-2 * pad) + 2 * pad
    mode = "RGB" if image.ndim == 3 else "L"
    ink = (0, 0, 0) if mode == "RGB" else 0
    canvas = Image.new(mode, (left + w, top + h), (255, 255, 255) if mode == "RGB" else 255)
    canvas.paste(Image.fromarray(np.ascontiguousarray(image)), (left, top))
    draw = ImageDraw.Draw(canvas)
    x = left
    for name, n in columns:
        draw.text((x + max(0, (n - _text_size(font, name)[0]) // 2), pad), name, fill=ink, font=font)
        x += n
    y = top
    for name, n in rows:
        draw.text((pad, y + (n - line) // 2), name, fill=ink, font=font)
        y += n
    return np.asarray(canvas)


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
        its content: TensorBoard gets each one's axial plane (named by its tag) and the labelled grid, the log folder
        the same grid as a PNG."""
        if self.writer is None:
            return None
        rows = content_planes(truth, corrupted, recon)
        for name, s in zip(("ground_truth", "corrupted", "reconstruction"), rows[0]):
            self.writer.add_image(f"{tag}/{name}", s[None], step, dataformats="CHW")
        image = labelled_grid(rows)
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
        strip = np.kron(strip, np.ones((zoom, zoom, 1), dtype=np.uint8))  # nearest-neighbour zoom
        columns = [(name, p.shape[1] * zoom) for name, p in zip(("image", "label", "prediction"), pad)]
        path = self.logdir / "images" / f"{tag.lower()}_overlay_step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_panels(strip, columns, [(f"axial z {z}", strip.shape[0])])).save(path)
        return path

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
