"""SSL losses against hand arithmetic and a naive port of the reference formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl3d.ssl import LossWeights, SSLLoss, contrastive_loss


def _naive_contrastive(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """Row-by-row loop of the reference: -log(exp(pos/T) / sum_{k != i} exp(sim_ik/T)), mean over 2N rows."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        sims = [float(F.cosine_similarity(z[i], z[k], dim=0)) for k in range(n2)]
        pos = sims[(i + n) % n2]
        denom = sum(math.exp(s / temperature) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(pos / temperature) / denom)
    return total / n2


def test_contrastive_hand_computed_2x2():
    # Normalised rows: a=(1,0), b=(0,1) | c=(0,1), d=(1,1)/sqrt2. Pairs (a,c) and (b,d). T = 0.5 -> exp(2*sim).
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.0, 3.0], [2.0, 2.0]])  # scale must not matter
    s = 1 / math.sqrt(2)
    la = -math.log(math.exp(0) / (math.exp(0) + math.exp(0) + math.exp(2 * s)))  # a: sims b=0, c=0, d=s
    lb = -math.log(math.exp(2 * s) / (math.exp(0) + math.exp(2) + math.exp(2 * s)))  # b: a=0, c=1, d=s
    lc = -math.log(math.exp(0) / (math.exp(0) + math.exp(2) + math.exp(2 * s)))  # c: a=0, b=1, d=s
    ld = -math.log(math.exp(2 * s) / (3 * math.exp(2 * s)))  # d: a=b=c=s
    expected = (la + lb + lc + ld) / 4
    assert contrastive_loss(z1, z2, 0.5).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n,e,t", [(1, 3, 0.5), (3, 8, 0.5), (5, 16, 0.1), (4, 32, 2.0)])
def test_contrastive_matches_naive_loop(n, e, t):
    g = torch.Generator().manual_seed(n * 100 + e)
    z1, z2 = torch.randn(n, e, generator=g), torch.randn(n, e, generator=g)
    got = contrastive_loss(z1, z2, t).item()
    assert got == pytest.approx(_naive_contrastive(z1, z2, t), rel=1e-5)


def test_contrastive_stable_and_differentiable():
    # Large logits (tiny T) would overflow exp() in the reference; gradients must stay finite with the -inf diagonal.
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(4, 8, generator=g, requires_grad=True)
    z2 = torch.randn(4, 8, generator=g, requires_grad=True)
    loss = contrastive_loss(z1, z2, 0.005)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    assert z1.grad.abs().sum() > 0


def test_contrastive_bf16_computed_in_fp32():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    out = contrastive_loss(z1.bfloat16(), z2.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(contrastive_loss(z1.bfloat16().float(), z2.bfloat16().float()).item(), rel=1e-6)


def _inputs(dtype=torch.float32):
    rot_logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 3.0]], dtype=dtype)
    rot_labels = torch.tensor([0, 3])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    recon = torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=dtype).view(2, 1, 2, 1, 1)
    target = torch.tensor([0.5, 0.5, 0.0, 1.0], dtype=dtype).view(2, 1, 2, 1, 1)
    return rot_logits, rot_labels, emb, recon, target


def test_rotation_and_reconstruction_hand_computed():
    out = SSLLoss()(*_inputs())
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 3))
    ce1 = -math.log(math.exp(3) / (1 + math.exp(1) + 1 + math.exp(3)))
    assert out["rotation"].item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    assert out["reconstruction"].item() == pytest.approx((0.5 + 0.0 + 1.0 + 0.75) / 4, rel=1e-6)
    # N = 1: rows (1,0) and (0,1); each row's only other column is its positive -> loss 0.
    assert out["contrastive"].item() == pytest.approx(0.0, abs=1e-6)


def test_weights_scale_terms_and_total_is_weighted_sum():
    g = torch.Generator().manual_seed(3)
    n = 3
    args = (
        torch.randn(2 * n, 4, generator=g),
        torch.randint(0, 4, (2 * n,), generator=g),
        torch.randn(2 * n, 16, generator=g),
        torch.rand(2 * n, 1, 4, 4, 4, generator=g),
        torch.rand(2 * n, 1, 4, 4, 4, generator=g),
    )
    base = SSLLoss()(*args)
    assert base["total"].item() == pytest.approx(
        base["rotation"].item() + base["contrastive"].item() + base["reconstruction"].item(), rel=1e-6
    )
    w = LossWeights(rotation=0.5, contrastive=2.0, reconstruction=3.0)
    out = SSLLoss(w, temperature=0.5)(*args)
    for key in ("rotation", "contrastive", "reconstruction"):
        assert out[key].item() == pytest.approx(base[key].item(), rel=1e-6)  # weights do not change the terms
    expected = 0.5 * base["rotation"] + 2.0 * base["contrastive"] + 3.0 * base["reconstruction"]
    assert out["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    zero = SSLLoss(LossWeights(rotation=0.0, contrastive=0.0, reconstruction=1.0))(*args)
    assert zero["total"].item() == pytest.approx(base["reconstruction"].item(), rel=1e-6)
    # Temperature reaches the contrastive term.
    t = SSLLoss(temperature=0.1)(*args)
    assert t["contrastive"].item() == pytest.approx(contrastive_loss(args[2][:n], args[2][n:], 0.1).item(), rel=1e-6)


def test_bf16_inputs_give_fp32_losses():
    out = SSLLoss()(*_inputs(torch.bfloat16))
    ref = SSLLoss()(*_inputs(torch.float32))
    for key, val in out.items():
        assert val.dtype == torch.float32, key
        assert val.item() == pytest.approx(ref[key].item(), rel=1e-6, abs=1e-6), key


def test_rejects_bad_shapes():
    args = list(_inputs())
    with pytest.raises(ValueError):
        SSLLoss()(args[0], args[1], torch.randn(3, 2), args[3], args[4])
    with pytest.raises(ValueError):
        SSLLoss(temperature=0.0)
