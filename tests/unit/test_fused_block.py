"""The speed changes of the fused path keep MONAI's numbers: window gathers, one qkv gradient, output layout.

``FusedSwinBlock`` only moves values (one gather each way instead of pad + roll + partition and reverse + roll +
crop), and ``_WindowAttentionQKVFn`` writes the same dq, dk, dv into one tensor instead of three zero-filled ones
that autograd adds up. So the patched model is compared with the model as it was before these changes (MONAI's
blocks around the fused attention, q, k, v as three tensors) with a tolerance of 1e-6 on every output and gradient
(observed: 0 without checkpointing, the same bits; 2e-10 with the selective policy), with and without an
activation-checkpointing policy.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import SwinTransformerBlock, window_partition, window_reverse

from ssl3d.config import ModelConfig
from ssl3d.memory import apply_activation_checkpointing
from ssl3d.memory.activation_checkpointing import CheckpointedFusedSwinBlock, CheckpointedSwinBlock
from ssl3d.model import build_model
from ssl3d.model.attention import (
    _SCORE_TENSORS,
    FusedSwinBlock,
    FusedWindowAttention,
    _backward,
    _mask_chunk,
    _windows_per_chunk,
    apply_fused_attention,
    fused_window_attention,
    remove_fused_attention,
    window_labels,
    window_order,
)
from ssl3d.ssl import SSLLoss

TOL = 1e-6


@pytest.mark.parametrize(
    ("dims", "window", "shift"),
    [((5, 9, 8), (4, 4, 4), (2, 2, 2)), ((4, 7, 7), (4, 7, 7), (0, 3, 3)), ((8, 8, 8), (4, 4, 4), (0, 0, 0))],
    ids=["padded-shifted", "window-cut", "plain"],
)
def test_window_order_is_monai_pad_roll_partition(dims, window, shift):
    torch.manual_seed(0)
    d, h, w = dims
    x = torch.randn(2, d, h, w, 3)
    dp, hp, wp = (-(-a // k) * k for a, k in zip(dims, window))
    padded = F.pad(x, (0, 0, 0, wp - w, 0, hp - h, 0, dp - d))
    rolled = torch.roll(padded, shifts=tuple(-s for s in shift), dims=(1, 2, 3)) if any(shift) else padded
    monai_windows = window_partition(rolled, window)
    order = window_order(dims, window, shift, x.device)
    ours = x.reshape(2, -1, 3).index_select(1, order.src).index_fill_(1, order.pad, 0)
    assert torch.equal(ours.view_as(monai_windows), monai_windows)
    back = window_reverse(monai_windows.view(-1, *window, 3), window, [2, dp, hp, wp])
    back = torch.roll(back, shifts=shift, dims=(1, 2, 3)) if any(shift) else back
    assert torch.equal(ours.index_select(1, order.dst).view(2, d, h, w, 3), back[:, :d, :h, :w])
    assert (order.labels is not None) == any(shift)


def _unpatched(fused: torch.nn.Module) -> torch.nn.Module:
    """The model as the fused path was before: MONAI's blocks, q, k, v handed to attention as three tensors."""
    old = copy.deepcopy(fused)
    for m in old.modules():
        if type(m) is FusedSwinBlock:
            m.__class__ = SwinTransformerBlock
        if type(m) is FusedWindowAttention:
            m.__class__ = _ThreeTensorAttention
    return old


class _ThreeTensorAttention(FusedWindowAttention):
    def forward(self, x, mask):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1)
        y = fused_window_attention(qkv[0], qkv[1], qkv[2], bias, mask, self.scale, self._ssl3d_chunk_bytes)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, c)))


def _loss_and_grads(model, x):
    out = model(x)
    loss = SSLLoss()(out.rotation, torch.tensor([0, 2]), out.contrastive, out.reconstruction, x)["total"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy", ["none", "selective-both"])
def test_patched_model_matches_unpatched(policy):
    """The tiny SSL model (stage 1: 16 x 16 x 32 tokens padded to 21 x 21 x 35 by window 7, shifted; stage 3 a
    window cut to 4 x 4 x 7; stage 4 a single window) in fp32: loss and every gradient within 1e-6."""
    torch.manual_seed(0)
    cfg = ModelConfig(feature_size=12, depths=(2, 2, 2, 1), num_heads=(3, 3, 6, 6))
    fused = build_model(cfg)
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()
    apply_fused_attention(fused)
    assert sum(type(m) is FusedSwinBlock for m in fused.modules()) == sum(cfg.depths)
    old = _unpatched(fused)
    if policy != "none":
        section = {"policy": "selective", "stages": [0, 1], "part": "both", "decoder": True}
        for m in (fused, old):
            apply_activation_checkpointing(m, section)
        assert sum(type(m) is CheckpointedFusedSwinBlock for m in fused.modules()) == 4
        assert sum(type(m) is CheckpointedSwinBlock for m in old.modules()) == 4
    x = torch.rand(2, 1, 32, 32, 64)
    (l0, g0), (l1, g1) = _loss_and_grads(old, x), _loss_and_grads(fused, x)
    assert abs(l1 - l0).item() <= TOL
    for k in g0:
        err = (g1[k] - g0[k]).abs().max().item()
        assert err <= TOL, f"{k}: max difference {err:.3g}"
    assert list(fused.state_dict()) == list(old.state_dict())


def test_checkpointing_and_removal_keep_the_fused_block():
    model = build_model(ModelConfig(feature_size=12, depths=(2, 2, 2, 2)))
    apply_fused_attention(model)
    apply_activation_checkpointing(model, "full")
    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    assert {type(b) for b in blocks} == {CheckpointedFusedSwinBlock}
    apply_activation_checkpointing(model, "none")
    assert {type(b) for b in blocks} == {FusedSwinBlock}
    apply_activation_checkpointing(model, "full")
    remove_fused_attention(model)
    assert {type(b) for b in blocks} == {CheckpointedSwinBlock}


def _backward_with_fresh_tensors(q, k, v, grad_out, bias, mask, scale, step):
    """The chunked backward as it was before its two reused score buffers: four fresh score-sized tensors and
    matmul's own copies of the strided gradient per chunk (the reference the buffered version must equal)."""
    b, h, n, d = q.shape
    nw = mask.shape[0]
    groups = b // nw
    shape5 = (groups, nw, h, n, d)
    q5, k5, v5, g5 = (t.reshape(shape5) for t in (q, k, v, grad_out))
    dq, dk, dv = (torch.empty(shape5, dtype=q.dtype) for _ in range(3))
    dbias = torch.zeros(h, n, n, dtype=q.dtype)
    for w0 in range(0, nw, step):
        w1 = min(nw, w0 + step)
        qc, kc, vc, gc = (t[:, w0:w1] for t in (q5, k5, v5, g5))
        qs = qc * scale
        s = torch.matmul(qs, kc.transpose(-1, -2)).add_(bias)
        s.add_(_mask_chunk(mask, w0, w1).unsqueeze(1))
        p = torch.softmax(s, dim=-1)
        dv[:, w0:w1] = torch.matmul(p.transpose(-1, -2), gc)
        dp = torch.matmul(gc, vc.transpose(-1, -2))
        ds = torch.ops.aten._softmax_backward_data(dp, p, -1, q.dtype)
        dq[:, w0:w1] = torch.matmul(ds, kc).mul_(scale)
        dk[:, w0:w1] = torch.matmul(ds.transpose(-1, -2), qs)
        dbias += ds.sum(dim=(0, 1))
    return dq.view(b, h, n, d), dk.view(b, h, n, d), dv.view(b, h, n, d), dbias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_buffered_backward_is_bit_identical(dtype):
    """The fused attention's backward reuses two score buffers (matmul's out=, softmax and its backward in place):
    the same bits as fresh tensors, for full chunks and a shorter last one (27 windows in chunks of 4)."""
    torch.manual_seed(0)
    groups, nw, h, n, d, scale = 2, 27, 3, 64, 8, 8**-0.5
    labels = window_labels([12, 12, 12], (4, 4, 4), (2, 2, 2), torch.device("cpu"))  # [27, 64]
    qkv = torch.randn(groups * nw, n, 3, h, d, dtype=dtype)  # the projection's layout: q, k, v are strided views
    q, k, v = (qkv.select(2, i).transpose(1, 2) for i in range(3))
    grad_out = torch.randn(groups * nw, n, h, d, dtype=dtype).transpose(1, 2)  # as the output's reshape gives it
    bias = torch.randn(h, n, n, dtype=dtype)
    per_window = groups * h * n * n * 4 * _SCORE_TENSORS
    assert _windows_per_chunk(nw, h, n, groups, 4 * per_window) == 4
    dqkv = torch.empty_like(qkv)
    dq, dk, dv = (dqkv.select(2, i).transpose(1, 2) for i in range(3))
    dbias = _backward(q, k, v, grad_out, bias, labels, scale, 4 * per_window, dq, dk, dv, True)
    expected = _backward_with_fresh_tensors(q, k, v, grad_out, bias, labels, scale, 4)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), (dq, dk, dv, dbias), expected):
        assert torch.equal(got, want), f"{name}: max difference {(got - want).abs().max().item():.3g}"
