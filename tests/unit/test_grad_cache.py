"""Contrastive gradient caching: chunked forward/backward gives the one-pass step's losses and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from ssl3d.config import ModelConfig
from ssl3d.model import build_model
from ssl3d.ssl import LossWeights, MaskingParams, SSLLoss, SSLViews, make_views
from ssl3d.ssl.grad_cache import chunk_slices, grad_cached_backward

TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), window_size=4, decoder="deconv")
# Gradients are compared with the one-pass step in float64, per tensor relative to its largest entry. fp32
# reductions over the 786k output voxels put the decoder's last biases up to 5e-4 of their scale off (the
# one-pass fp32 step itself is 5e-4 off too); every other tensor is within 1e-5 (measured). A missing or
# mis-scaled term would be off by O(1).
REL = 2e-3


def _setup(crops: int = 3):
    torch.manual_seed(0)
    model = build_model(TINY, contrastive_dim=16)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(crops, 1, 32, 64, 64, generator=g)
    views = make_views(x, g, MaskingParams())
    loss_fn = SSLLoss(LossWeights(1.0, 0.7, 1.3), temperature=0.3)
    return model, views, loss_fn


def _one_pass(model, views, loss_fn):
    """The reference step in float64 on a copy of the model: losses and gradients."""
    model = copy.deepcopy(model).double()
    views = SSLViews(views.views.double(), views.corrupted.double(), views.rot_labels)
    out = model(views.corrupted)
    losses = loss_fn(out.rotation, views.rot_labels, out.contrastive, out.reconstruction, views.views)
    losses["total"].backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunk_slices_cover_every_row_once() -> None:
    assert chunk_slices(6, 4) == [slice(0, 4), slice(4, 6)]
    assert chunk_slices(3, 8) == [slice(0, 3)]
    with pytest.raises(ValueError, match="at least 1"):
        chunk_slices(4, 0)


@pytest.fixture(scope="module")
def one_pass():
    model, views, loss_fn = _setup()
    return model, views, loss_fn, *_one_pass(model, views, loss_fn)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 4, 6])  # one view at a time; uneven chunks (4 + 2); one chunk of all 6
def test_same_losses_and_gradients_as_one_pass(chunk: int, one_pass) -> None:
    model, views, loss_fn, want_losses, want_grads = one_pass
    model = copy.deepcopy(model)
    calls: list[bool] = []

    def backward(loss: torch.Tensor, last: bool) -> None:
        calls.append(last)
        loss.backward()

    got = grad_cached_backward(model, views, loss_fn, chunk, backward)
    assert calls == [False] * (len(chunk_slices(6, chunk)) - 1) + [True]
    for k, v in want_losses.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for name, grad in want_grads.items():
        err = float((model.get_parameter(name).grad.double() - grad).abs().max() / grad.abs().max().clamp_min(1e-12))
        assert err < REL, f"{name}: max |chunked - one pass| is {err:.1e} of the gradient's scale"
    assert any(float(g.abs().max()) > 1e-3 for n, g in want_grads.items() if n.startswith("contrastive_head"))


@pytest.mark.slow
def test_contrastive_weight_zero_leaves_the_contrastive_head_without_gradient() -> None:
    """The cached term really carries the contrastive gradient: with weight 0 the head gets none."""
    model, views, _ = _setup(crops=2)
    loss_fn = SSLLoss(LossWeights(1.0, 0.0, 1.0))
    grad_cached_backward(model, views, loss_fn, 2, lambda loss, last: loss.backward())
    assert float(model.contrastive_head.weight.grad.abs().max()) == 0.0
    assert float(model.rotation_head.weight.grad.abs().max()) > 0.0
