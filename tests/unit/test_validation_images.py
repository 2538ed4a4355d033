"""Validation images show content: three planes through the slices with the most foreground of the crop with the
most content, zoomed to a size a person can read (the old strip showed the middle axial slice of the first crop,
which on the demo was air)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ssl3d.logger import PANEL_PX, RunLogger, content_planes, foreground_fraction, grid, label_panels


def crop_with_body_off_centre() -> torch.Tensor:
    """[1, 32, 64, 64] (x, y, z): air (0) except a block of tissue (0.5) in z 44..59 and a bright rod (1.0) at
    x 30 (beside it), y 10..50, z 50: the middle axial slice (z 32) is all air."""
    v = torch.zeros(1, 32, 64, 64)
    v[0, 4:28, 8:56, 44:60] = 0.5
    v[0, 30, 10:50, 50] = 1.0
    return v


def test_the_planes_go_through_the_content():
    v = crop_with_body_off_centre()
    assert float(v[0, :, :, 32].max()) == 0.0  # the old choice would show air
    (axial,), (coronal,), (sagittal,) = content_planes(v)
    assert axial.shape == (64, 32) and coronal.shape == (64, 32) and sagittal.shape == (64, 64)
    assert (axial > 0).sum() == 48 * 24 + 40  # the tissue block's full cross-section and the rod
    assert axial.max() == 255  # the rod's slice (z 50) among those with the most tissue
    # coronal and sagittal planes show superior up: the tissue (high z) in the top rows
    assert coronal[: 64 - 44].max() > 0 and coronal[64 - 44 :].max() == 0
    assert sagittal[: 64 - 44].max() > 0 and sagittal[64 - 44 :].max() == 0


def test_png_has_a_readable_size_and_the_ground_truth_is_not_black(tmp_path):
    truth = crop_with_body_off_centre()
    corrupted = truth.clone()
    corrupted[0, 8:16, 8:16, 44:60] = torch.rand(8, 8, 16)
    recon = truth * 0.9
    log = RunLogger(tmp_path, enabled=True)
    path = log.images("Validation", truth, corrupted, recon, step=3)
    log.close()
    image = np.asarray(Image.open(path))
    # 3 lines (ground truth, corrupted, reconstruction) of 3 planes; panels zoomed to PANEL_PX (64 voxels x 4)
    assert image.shape[0] >= 3 * PANEL_PX and image.shape[1] >= 32 * 4 * 2 + 64 * 4
    content = grid(content_planes(truth, corrupted, recon))
    image = image[-content.shape[0] :, -content.shape[1] :]  # without the labels above and to the left
    line = image.shape[0] // 3
    ground_truth = image[:line]
    inner = ground_truth[ground_truth < 255]
    assert (inner > 0).mean() > 0.2, "the ground-truth line is (almost) all air"


def test_the_crop_with_the_most_content_wins():
    air = torch.zeros(1, 32, 64, 64)
    assert foreground_fraction(air) == 0.0
    assert foreground_fraction(crop_with_body_off_centre()) > 0.1


def _label_area_has_text(area: np.ndarray) -> bool:
    """Dark strokes on the white label background: a blank (all white) margin has none."""
    return int((area < 128).sum()) > 20


def test_the_png_names_its_rows_and_columns_and_leaves_the_content_alone(tmp_path):
    """Which line is the ground truth, the corrupted input, the reconstruction, which column which plane: named in a
    header and a left margin (before: nine unnamed panels, the PNG was exactly the grid)."""
    truth = crop_with_body_off_centre()
    corrupted, recon = truth.flip(1), truth * 0.9
    log = RunLogger(tmp_path, enabled=True)
    path = log.images("Validation", truth, corrupted, recon, step=3)
    log.close()
    image = np.asarray(Image.open(path))
    content = grid(content_planes(truth, corrupted, recon))
    top, left = image.shape[0] - content.shape[0], image.shape[1] - content.shape[1]
    assert 12 <= top <= 40 and 60 <= left <= 200, (top, left)  # a line of text above, a word or two to the left
    assert np.array_equal(image[top:, left:], content), "the labels changed the panels"
    header, margin = image[:top, left:], image[top:, :left]
    assert _label_area_has_text(header) and _label_area_has_text(margin)
    # each column's name sits above it, each line's name beside it: no third of the header or margin is blank
    for third in np.array_split(np.arange(header.shape[1]), 3):
        assert _label_area_has_text(header[:, third])
    for third in np.array_split(np.arange(margin.shape[0]), 3):
        assert _label_area_has_text(margin[third])
    assert image[:top, :left].min() == 255  # the corner stays empty


def test_label_panels_keeps_colour_and_refuses_extents_that_miss_the_image():
    strip = np.zeros((40, 90, 3), dtype=np.uint8)
    out = label_panels(strip, [("image", 30), ("label", 30), ("prediction", 30)], [("axial", 40)])
    assert out.ndim == 3 and np.array_equal(out[-40:, -90:], strip)
    assert out.shape[0] > 40 and out.shape[1] > 90
    with pytest.raises(ValueError, match="do not cover"):
        label_panels(strip, [("image", 30), ("label", 30)])


def test_the_finetuning_overlay_is_labelled_the_same_way(tmp_path):
    image = crop_with_body_off_centre()
    label = torch.zeros(1, 32, 64, 64, dtype=torch.long)
    label[0, 8:20, 10:40, 44:60] = 1
    log = RunLogger(tmp_path, enabled=True)
    path = log.overlay("Validation", image, label, label, num_classes=2, step=1)
    log.close()
    png = np.asarray(Image.open(path).convert("L"))
    # the strip (three 64 x 32 panels turned, anterior up, with 2-pixel borders) zoomed nearest to about 192 high
    zoom = 192 // 68
    top, left = png.shape[0] - 68 * zoom, png.shape[1] - 3 * 36 * zoom
    assert top > 0 and left > 0, png.shape
    assert _label_area_has_text(png[:top, left:]) and _label_area_has_text(png[top:, :left])
