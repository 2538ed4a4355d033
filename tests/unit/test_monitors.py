"""Collapse monitors against hand-computed values: a collapsed set of embeddings, a spread one, a masked region."""

from __future__ import annotations

import math

import torch

from ssl3d.ssl.monitors import collapse_monitors, effective_rank, embedding_std


def test_collapsed_embeddings_have_zero_std_and_rank_one() -> None:
    same = torch.randn(1, 32).repeat(8, 1) * torch.arange(1, 9).float()[:, None]  # parallel rows, other lengths
    assert float(embedding_std(same)) < 1e-6
    assert abs(float(effective_rank(same)) - 1.0) < 1e-4


def test_orthogonal_embeddings_use_every_direction() -> None:
    eye = torch.eye(8, 16) * 3.0  # 8 orthogonal rows: 8 equal singular values
    assert abs(float(effective_rank(eye)) - 8.0) < 1e-4
    # Per dimension: 8 of 16 dims hold one 1 among 8 rows (std sqrt(1/8)), the other 8 dims are 0.
    assert abs(float(embedding_std(eye)) - 0.5 * math.sqrt(1 / 8)) < 1e-6


def test_scalars_of_a_validation_pass() -> None:
    masked = torch.tensor([6.0, 4.0], dtype=torch.float64)  # L1 sum 6 over 4 corrupted voxels
    same = [torch.ones(2, 8), torch.ones(3, 8)]  # every view embedded at one point: collapsed
    out = collapse_monitors(same, masked)
    assert out["Validation/loss_reconstruction_masked"] == 1.5
    assert out["Validation/collapse_embedding_std"] < 1e-6 and abs(out["Validation/collapse_effective_rank"] - 1) < 1e-4
    assert math.isnan(collapse_monitors([], torch.zeros(2))["Validation/loss_reconstruction_masked"])
