"""The "vae" reconstruction decoder runs its 1x1x1 output conv before the last upsampling: same math, less memory.

Reference: the same modules (same weights) run in registration order, as the reference's ``nn.Sequential`` does:
... -> Upsample(x2, trilinear) -> Conv1x1x1. Tolerance (fp32): rtol 1e-5 / atol 1e-6 for outputs and gradients; the
two orders sum the same products in a different order, so only float rounding may differ.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ssl3d.config import ModelConfig
from ssl3d.memory.activation_checkpointing import apply_activation_checkpointing, decoder_segments
from ssl3d.model import ReorderedSequential, build_decoder, build_model, execution_order
from ssl3d.ssl import SSLLoss

TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))
RTOL, ATOL = 1e-5, 1e-6


def reference_decoder(decoder: nn.Sequential) -> nn.Sequential:
    """The reference's layout: the very same modules in registration order (Upsample before the 1x1x1 conv)."""
    return nn.Sequential(*[copy.deepcopy(m) for m in decoder])


def _randomize(decoder: nn.Module) -> None:
    """Non-zero biases everywhere (a dropped bias must show), InstanceNorm has no affine parameters here."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(0, 0.2)


def _grads(decoder: nn.Module, feat: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
    decoder.zero_grad(set_to_none=True)
    feat = feat.clone().requires_grad_(True)
    out = decoder(feat)
    (out - target).abs().mean().backward()  # the reconstruction loss's shape: L1 against the input
    return out.detach(), {n: p.grad.clone() for n, p in decoder.named_parameters()}, feat.grad


@pytest.fixture(scope="module")
def decoders():
    dec = build_decoder("vae", dim=64, out_channels=1)
    _randomize(dec)
    return dec, reference_decoder(dec)


def test_order_is_the_only_difference(decoders):
    dec, ref = decoders
    assert isinstance(dec, ReorderedSequential)
    n = len(dec)
    assert isinstance(dec[n - 2], nn.Upsample) and isinstance(dec[n - 1], nn.Conv3d)
    assert execution_order(dec)[-2:] == (n - 1, n - 2)  # conv first, then the upsampling
    assert execution_order(ref) == tuple(range(n))
    assert list(dec.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("policy", ["none", "full"])
def test_outputs_and_gradients_equal_the_reference_order(decoders, policy):
    dec, ref = decoders
    dec = copy.deepcopy(dec)
    if policy == "full":  # per-stage checkpointing of the decoder follows the new order
        holder = nn.Module()
        holder.swinViT, holder.conv = nn.Module(), dec
        apply_activation_checkpointing(holder, {"policy": "selective", "stages": [], "decoder": True})
    torch.manual_seed(2)
    feat = torch.randn(2, 64, 2, 2, 2)
    target = torch.rand(2, 1, 64, 64, 64)
    out, grads, gfeat = _grads(dec, feat, target)
    out_ref, grads_ref, gfeat_ref = _grads(ref, feat, target)
    assert out.shape == out_ref.shape == (2, 1, 64, 64, 64)
    torch.testing.assert_close(out, out_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gfeat, gfeat_ref, rtol=RTOL, atol=ATOL)
    assert grads.keys() == grads_ref.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")


def test_full_resolution_tensors_have_out_channels():
    """What the reordering is for: the largest tensor the decoder creates is out_channels wide at full size."""
    dec = build_decoder("vae", dim=64, out_channels=1)
    sizes: list[tuple[int, ...]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape))) for m in dec]
    dec(torch.randn(1, 64, 2, 2, 2))
    for h in hooks:
        h.remove()
    full = [s for s in sizes if s[2:] == (64, 64, 64)]
    assert full == [(1, 1, 64, 64, 64)]
    assert (1, 4, 32, 32, 32) in sizes  # the 1x1x1 conv's input: dim/16 channels at half size


@pytest.mark.slow
def test_reference_state_dict_loads_and_reproduces(decoders):
    """A checkpoint saved by the reference's layout loads strictly and gives its outputs (whole model too)."""
    dec, ref = decoders
    fresh = build_decoder("vae", dim=64, out_channels=1)
    fresh.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 64, 2, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref(x), rtol=RTOL, atol=ATOL)
    model = build_model(TINY)
    old = copy.deepcopy(model)
    old.conv = reference_decoder(model.conv)
    assert list(old.state_dict()) == list(model.state_dict())
    _randomize(old.conv)
    model.load_state_dict(old.state_dict(), strict=True)
    torch.manual_seed(3)
    views = torch.rand(2, 1, 32, 64, 64)
    labels = torch.tensor([0, 2])
    losses = []
    for m in (model, old):
        out = m(views)
        losses.append(SSLLoss()(out.rotation, labels, out.contrastive, out.reconstruction, views)["reconstruction"])
    torch.testing.assert_close(losses[0], losses[1], rtol=RTOL, atol=ATOL)


def test_checkpointing_keeps_and_restores_the_order():
    m = build_model(TINY)
    # Stages in execution order: [Conv, Norm, Act, Upsample] x 4, then [Conv, Norm, Act, Conv1x1, Upsample].
    assert decoder_segments(m.conv) == ((0, 4), (4, 8), (8, 12), (12, 16), (16, 21))
    apply_activation_checkpointing(m, "full")
    assert execution_order(m.conv)[-2:] == (20, 19)
    apply_activation_checkpointing(m, "none")
    assert type(m.conv) is ReorderedSequential
    assert execution_order(m.conv)[-2:] == (20, 19)


def test_old_order_available_and_bad_order_refused():
    dec = build_decoder("vae", dim=64, out_channels=1, output_conv_first=False)
    assert execution_order(dec) == tuple(range(len(dec)))
    with pytest.raises(ValueError, match="permutation"):
        ReorderedSequential(nn.Identity(), nn.Identity(), order=(0, 0))
