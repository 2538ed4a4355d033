"""Validation images show content: three planes through the slices with the most foreground of the crop with the
most content, zoomed to a size a person can read (the old strip showed the middle axial slice of the first crop,
which on the demo was air)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ssl3d.logger import PANEL_PX, RunLogger, content_planes, foreground_fraction


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
    line = image.shape[0] // 3
    ground_truth = image[:line]
    inner = ground_truth[ground_truth < 255]
    assert (inner > 0).mean() > 0.2, "the ground-truth line is (almost) all air"


def test_the_crop_with_the_most_content_wins():
    air = torch.zeros(1, 32, 64, 64)
    assert foreground_fraction(air) == 0.0
    assert foreground_fraction(crop_with_body_off_centre()) > 0.1
