"""View generation: rotations exact, cuboid corruption with the reference's distribution and semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl3d.ssl import MaskingParams, make_views, mask_cuboids, mask_cuboids_detailed, rotate_random
from ssl3d.ssl.augment import _chunks, _paint_noise, _window_size


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- rotation


def test_rotate_random_exact_per_sample():
    x = torch.rand(32, 2, 5, 8, 8, generator=_gen(0))  # non-cubic H, rotation plane (W, D)
    x0 = x.clone()
    out, labels = rotate_random(x, _gen(1))
    assert out.shape == x.shape and labels.dtype == torch.int64 and labels.shape == (32,)
    assert set(labels.tolist()) == {0, 1, 2, 3}
    for i in range(32):
        # The reference: torch.rot90(sample, k, (2, 3)) on a (C,H,W,D) sample.
        assert torch.equal(out[i], torch.rot90(x[i], int(labels[i]), (2, 3)))
    assert torch.equal(x, x0)


def test_rotate_random_labels_uniform():
    x = torch.zeros(4000, 1, 2, 2, 2)
    _, labels = rotate_random(x, _gen(2))
    counts = torch.bincount(labels, minlength=4).double()
    chi2 = float(((counts - 1000) ** 2 / 1000).sum())
    assert chi2 < 16.3  # chi-square, 3 dof: p ~ 0.001


def test_rotate_random_other_plane_and_bf16():
    x = torch.rand(8, 1, 6, 6, 3, generator=_gen(20)).bfloat16()
    out, labels = rotate_random(x, _gen(21), dims=(2, 3))
    assert out.dtype == torch.bfloat16
    for i in range(8):
        assert torch.equal(out[i], torch.rot90(x[i], int(labels[i]), (1, 2)))


def test_rotate_random_requires_square_plane():
    with pytest.raises(ValueError):
        rotate_random(torch.zeros(1, 1, 8, 8, 4), _gen(0))


# ---------------------------------------------------------------- cuboid masking


def _ref_noise_union(shape, rs: np.random.RandomState, max_drop=0.3, max_block=0.25, tolr=0.05):
    """Geometry of the reference's patch_rand_drop (numpy randint, exclusive upper): union fraction, #cuboids."""
    h, w, z = shape
    mask = np.zeros(shape, dtype=bool)
    n_drop = rs.uniform(0, max_drop) * h * w * z
    mx = (int(h * max_block), int(w * max_block), int(z * max_block))
    tl = (int(tolr * h), int(tolr * w), int(tolr * z))
    total, count = 0, 0
    while total < n_drop:
        r, c, s = rs.randint(0, h - tl[0]), rs.randint(0, w - tl[1]), rs.randint(0, z - tl[2])
        he = min(rs.randint(tl[0], mx[0]) + r, h)
        we = min(rs.randint(tl[1], mx[1]) + c, w)
        ze = min(rs.randint(tl[2], mx[2]) + s, z)
        mask[r:he, c:we, s:ze] = True
        total += (he - r) * (we - c) * (ze - s)
        count += 1
    return mask.mean(), count


@pytest.mark.parametrize("shape", [(32, 32, 32), pytest.param((48, 48, 32), marks=pytest.mark.slow)])
def test_mask_cuboids_statistics(shape):
    n = 200
    v = math.prod(shape)
    x = torch.rand(n, 1, *shape, generator=_gen(3))
    x0 = x.clone()
    res = mask_cuboids_detailed(x, _gen(4))
    out = res.output
    assert torch.equal(x, x0), "input modified"
    assert out.shape == x.shape and out.dtype == x.dtype

    # Noise pass: the summed-volume target is uniform(0, 0.3) * V, reached by at most one extra cuboid.
    max_vol = math.prod(_window_size(shape, MaskingParams()))
    frac_target = (res.noise_target / v).numpy()
    assert 0.12 < frac_target.mean() < 0.18 and frac_target.min() >= 0 and frac_target.max() < 0.3
    assert (res.noise_volume >= res.noise_target).all()
    assert (res.noise_volume < res.noise_target + max_vol).all()
    union = res.noise_mask.double().mean((1, 2, 3))
    assert (union <= res.noise_volume / v + 1e-12).all()
    assert (union > 0).float().mean() > 0.95

    # Same geometry distribution as a direct port of the reference loop (union fraction is what the model sees).
    rs = np.random.RandomState(0)
    ref = [_ref_noise_union(shape, rs) for _ in range(n)]
    ref_union = np.mean([u for u, _ in ref])
    assert abs(float(union.mean()) - ref_union) < 0.025, (float(union.mean()), ref_union)

    # Noise values lie in [0, 1]; voxels outside the noise cuboids are the input's.
    m1 = res.noise_mask.unsqueeze(1)
    assert res.noised[m1].min() >= 0 and res.noised[m1].max() <= 1
    assert torch.equal(res.noised[~m1], x[~m1])
    assert not torch.isnan(out).any()

    # Paste pass: prob. (N-1)/N, cuboids copied from the donor's noise-corrupted voxels, the rest untouched.
    pasted = res.donor != torch.arange(n)
    assert pasted.float().mean() > 0.97
    assert not res.paste_mask[~pasted].any()
    assert (res.paste_mask.flatten(1).any(1) | (res.paste_target == 0))[pasted].all()
    assert (res.paste_volume >= res.paste_target).all()
    m2 = res.paste_mask.unsqueeze(1)
    donor_vals = res.noised[res.donor]
    assert torch.equal(out[m2.expand_as(out)], donor_vals[m2.expand_as(out)])
    assert torch.equal(out[~m2.expand_as(out)], res.noised[~m2.expand_as(out)])
    paste_union = res.paste_mask[pasted].double().mean()
    assert abs(float(paste_union) - ref_union) < 0.025

    # Overall changed fraction: roughly the two passes' unions combined.
    changed = (res.noise_mask | res.paste_mask).double().mean()
    assert float(union.mean()) < float(changed) < 2 * float(union.mean())


def test_paint_noise_later_cuboids_overwrite_earlier():
    """Chunked, vectorised painting equals painting one cuboid after the other (as the reference loop)."""
    shape = (32, 32, 32)
    n, c = 2, 2
    # Overlapping cuboids of both samples interleaved, in painting order; a small budget forces several chunks.
    cubs = [  # (sample, start, side)
        (0, (0, 0, 0), (7, 7, 7)),
        (1, (5, 5, 5), (6, 6, 6)),
        (0, (2, 2, 2), (5, 6, 4)),
        (0, (4, 1, 3), (3, 3, 3)),
        (1, (5, 5, 5), (2, 3, 4)),
        (1, (8, 6, 7), (7, 1, 7)),
        (0, (3, 3, 3), (1, 2, 3)),
        (1, (25, 25, 25), (7, 7, 7)),
        (1, (0, 0, 0), (1, 1, 1)),  # one voxel, 2 channels: still normalisable
        (0, (1, 1, 1), (5, 5, 5)),
    ]
    samp = torch.tensor([b for b, _, _ in cubs])
    st = torch.tensor([s for _, s, _ in cubs])
    ln = torch.tensor([sd for _, _, sd in cubs])
    x = torch.rand(n, c, *shape, generator=_gen(5))
    budget = 2 * 400  # ~400 voxels x 2 channels per chunk
    out, covered = _paint_noise(x, samp, st, ln, _gen(6), budget=budget)

    vols = [math.prod(sd) for _, _, sd in cubs]
    chunks = _chunks(vols, budget // c)
    assert len(chunks) >= 3
    g = _gen(6)
    ref = x.clone()
    ref_cov = torch.zeros(n, *shape, dtype=torch.bool)
    for m0, m1 in chunks:
        noise = torch.randn((sum(vols[m0:m1]), c), generator=g)
        off = 0
        for m in range(m0, m1):
            i, (r, cc, s), (lh, lw, ld) = cubs[m]
            cub = noise[off : off + vols[m]].T.reshape(c, lh, lw, ld)
            off += vols[m]
            cub = (cub - cub.min()) / (cub.max() - cub.min())
            ref[i, :, r : r + lh, cc : cc + lw, s : s + ld] = cub
            ref_cov[i, r : r + lh, cc : cc + lw, s : s + ld] = True
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert torch.equal(covered, ref_cov)
    assert torch.equal(x[:, :, 20:24], out[:, :, 20:24])  # untouched slab


def test_mask_cuboids_reproducible_and_seed_dependent():
    x = torch.rand(3, 1, 32, 32, 32, generator=_gen(7))
    a = mask_cuboids(x, _gen(8))
    b = mask_cuboids(x, _gen(8))
    c = mask_cuboids(x, _gen(9))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_mask_cuboids_single_sample_no_paste():
    x = torch.rand(1, 1, 32, 40, 48, generator=_gen(10))  # non-cubic
    x0 = x.clone()
    res = mask_cuboids_detailed(x, _gen(11))
    assert torch.equal(x, x0)
    assert res.donor.tolist() == [0] and not res.paste_mask.any()
    assert torch.equal(res.output, res.noised)
    assert torch.equal(res.output[~res.noise_mask.unsqueeze(1)], x[~res.noise_mask.unsqueeze(1)])


def test_mask_cuboids_bf16_multichannel():
    x = torch.rand(3, 2, 32, 32, 40, generator=_gen(12)).bfloat16()
    x0 = x.clone()
    res = mask_cuboids_detailed(x, _gen(13))
    out = res.output
    assert out.dtype == torch.bfloat16 and torch.equal(x, x0)
    m = res.noise_mask.unsqueeze(1).expand_as(x)
    assert res.noised[m].min() >= 0 and res.noised[m].max() <= 1
    assert torch.equal(res.noised[~m], x[~m])
    assert torch.isfinite(out.float()).all()


def test_mask_cuboids_zero_drop_is_identity():
    x = torch.rand(2, 1, 32, 32, 32, generator=_gen(14))
    out = mask_cuboids(x, _gen(15), MaskingParams(max_drop=0.0))
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


# ---------------------------------------------------------------- views


def test_make_views():
    n = 3
    x = torch.rand(n, 1, 32, 32, 32, generator=_gen(16))
    x0 = x.clone()
    v = make_views(x, _gen(17))
    assert v.views.shape == (2 * n, 1, 32, 32, 32) and v.corrupted.shape == v.views.shape
    assert v.rot_labels.shape == (2 * n,) and v.rot_labels.dtype == torch.int64
    for i in range(2 * n):
        assert torch.equal(v.views[i], torch.rot90(x[i % n], int(v.rot_labels[i]), (2, 3)))
        assert not torch.equal(v.corrupted[i], v.views[i])
    assert torch.equal(x, x0)
    w = make_views(x, _gen(17))
    assert torch.equal(w.corrupted, v.corrupted) and torch.equal(w.rot_labels, v.rot_labels)


def test_make_views_masks_each_view_within_its_own_batch():
    # As the reference's two aug_rand calls: paste donors come from the same view, never the other one.
    x = torch.rand(2, 1, 32, 32, 32, generator=_gen(18))
    v = make_views(x, _gen(19))
    g = _gen(19)
    x1, k1 = rotate_random(x, g)
    x2, k2 = rotate_random(x, g)
    c1, c2 = mask_cuboids(x1, g), mask_cuboids(x2, g)
    assert torch.equal(v.corrupted, torch.cat([c1, c2])) and torch.equal(v.rot_labels, torch.cat([k1, k2]))
