"""Fused window attention against MONAI's eager path: forward, gradients, masks, the whole SSL model.

Tolerances. One attention module in fp32: ``assert_close(rtol=1e-4, atol=1e-5)`` elementwise (observed ~1e-7
relative). The whole SSL model is compared in fp64, per gradient tensor max |difference| <= 1e-9 x max |reference|
(observed ~2e-14): in fp32 the rounding differences of the two summation orders (SDPA's online softmax, chunked
backward) pass through ~20 layers and reach 1e-4 relative on some weight gradients, which would hide little; fp64
shows the two paths compute the same function. Under bf16 autocast each path is compared with an fp64 reference
instead: the fused one may be no less accurate than MONAI's (per tensor, relative error at most twice eager's or
under 1%; observed on the CPU: both 0.3-0.5%).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from monai.networks.nets.swin_unetr import BasicLayer, WindowAttention, compute_mask

from ssl3d.config import ModelConfig
from ssl3d.model import build_model
from ssl3d.model.attention import (
    FusedBasicLayer,
    FusedWindowAttention,
    _mask_chunk,
    apply_fused_attention,
    remove_fused_attention,
    window_labels,
)
from ssl3d.ssl import SSLLoss

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _pair(chunk_bytes=None, dim=24, heads=3):
    torch.manual_seed(0)
    eager = WindowAttention(dim, heads, (7, 7, 7), qkv_bias=True)
    with torch.no_grad():
        eager.relative_position_bias_table.normal_()  # MONAI's init (std 0.02) would hide bias errors
    fused = copy.deepcopy(eager)
    assert apply_fused_attention(fused, chunk_bytes=chunk_bytes) == 1
    return eager, fused


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
@pytest.mark.parametrize("mask_form", ["dense", "labels"])
@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-chunk", "per-window-chunks"])
def test_window_attention_matches_eager(shifted, mask_form, chunk_bytes):
    if not shifted and mask_form == "labels":
        pytest.skip("no mask without a shift")
    eager, fused = _pair(chunk_bytes)
    dims, ws, shift = [14, 14, 14], (7, 7, 7), (3, 3, 3)
    dense = compute_mask(dims, ws, shift, "cpu") if shifted else None
    mask = window_labels(dims, ws, shift, torch.device("cpu")) if mask_form == "labels" and shifted else dense
    x = torch.randn(2 * 8, 343, 24, requires_grad=True)  # 2 samples x 8 windows
    x2 = x.detach().clone().requires_grad_()
    y, y2 = eager(x, dense), fused(x2, mask)
    torch.testing.assert_close(y2, y, **TOL)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, **TOL)
    params = list(zip(eager.named_parameters(), fused.parameters(), strict=True))
    assert len(params) == 5  # the relative position bias table; qkv and proj, weight and bias
    for (name, p), q in params:
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_window_labels_rebuild_monai_mask():
    for dims, shift in (([14, 14, 14], (3, 3, 3)), ([21, 14, 7], (3, 3, 0)), ([7, 14, 14], (0, 3, 3))):
        labels = window_labels(dims, (7, 7, 7), shift, torch.device("cpu"))
        dense = compute_mask(dims, (7, 7, 7), shift, "cpu")
        assert labels.shape == dense.shape[:2]
        torch.testing.assert_close(_mask_chunk(labels, 0, labels.shape[0]), dense, rtol=0, atol=0)


def test_no_grad_path_and_names():
    eager, fused = _pair()
    x = torch.randn(8, 343, 24)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, None), eager(x, None), **TOL)
    assert list(fused.state_dict()) == list(eager.state_dict())
    assert remove_fused_attention(fused) == 1 and type(fused) is WindowAttention


def test_bf16_autocast_close():
    eager, fused = _pair()
    x = torch.randn(8, 343, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = eager(x, None), fused(x, None)
    assert b.dtype == a.dtype
    torch.testing.assert_close(b.float(), a.float(), rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_ssl_model_end_to_end():
    """The tiny SSL model with and without fusion: shifted blocks in stages 1-2, stage 3 windows cut to the token
    grid (4 x 8 x 8 tokens, window 4 x 4 x 4 only along depth), stage 4 smaller than a window (n < window^3)."""
    torch.manual_seed(0)
    cfg = ModelConfig(feature_size=12, depths=(2, 2, 1, 1), num_heads=(3, 6, 12, 24), window_size=4)
    model = build_model(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()
    fused = copy.deepcopy(model)
    assert apply_fused_attention(fused) == sum(cfg.depths)
    assert {type(m) for m in fused.modules() if isinstance(m, BasicLayer)} == {FusedBasicLayer}
    assert all(type(m) is FusedWindowAttention for m in fused.modules() if isinstance(m, WindowAttention))
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.rand(2, 1, 32, 64, 64, dtype=torch.float64)
    labels = torch.tensor([0, 2])
    results = []
    for m in (model, fused):
        out = m(x)
        loss = SSLLoss()(out.rotation, labels, out.contrastive, out.reconstruction, x)["total"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    for k in g0:
        err, scale = (g1[k] - g0[k]).abs().max().item(), g0[k].abs().max().item()
        assert err <= 1e-9 * scale + 1e-15, f"{k}: max difference {err:.3g}, max |grad| {scale:.3g}"
    remove_fused_attention(fused)
    assert {type(m) for m in fused.modules() if isinstance(m, BasicLayer)} == {BasicLayer}


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BF16_FLOOR = 1e-2  # relative error any bf16 result may have (unit roundoff 2^-8 = 0.4%)


@pytest.fixture
def no_tf32():
    """fp32 matmuls in full fp32 for one test (ssl3d's CUDA runs turn TF32 on for the whole process)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = False
    yield
    matmul.allow_tf32 = before


def _attention_grads(module, x, mask, g, autocast_dtype=None):
    """Output and gradients (input, then each parameter) of one forward + backward, as float64 on the CPU."""
    x = x.detach().clone().requires_grad_()
    autocast = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with autocast:
        y = module(x, mask)
    y.backward(g)
    return [t.detach().double().cpu() for t in (y, x.grad, *(p.grad for p in module.parameters()))]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("dim", "heads"), [(24, 3), (48, 3)], ids=["head_dim8", "head_dim16"])
def test_fused_matches_eager_per_device(device, dtype, dim, heads, no_tf32):
    """The kernels each device runs (on CUDA SDPA's with the padded, 16-aligned bias layout), shifted windows,
    forward and every gradient, at the tests' head_dim 8 and the model's 16 (feature size 48, 3 heads).

    fp32: fused against eager elementwise (TF32 off: it would round both to 10-bit products). bf16 autocast, the
    training setting: both against an fp64 reference; the fused path may be no less accurate than MONAI's own, per
    tensor (relative error at most twice eager's, or under ``BF16_FLOOR``)."""
    eager, fused = _pair(dim=dim, heads=heads)
    reference = copy.deepcopy(eager).double()
    eager, fused = eager.to(device), fused.to(device)
    dims, ws, shift = [14, 14, 14], (7, 7, 7), (3, 3, 3)
    dense = compute_mask(dims, ws, shift, device)
    labels = window_labels(dims, ws, shift, torch.device(device))
    torch.manual_seed(1)
    x = torch.randn(16, 343, dim)  # 2 samples x 8 windows
    g = torch.randn(16, 343, dim)
    names = ["output", "input grad", *(name for name, _ in eager.named_parameters())]
    if dtype == torch.float32:
        want = _attention_grads(eager, x.to(device), dense, g.to(device))
        got = _attention_grads(fused, x.to(device), labels, g.to(device))
        for name, a, b in zip(names, want, got, strict=True):
            torch.testing.assert_close(b, a, **TOL, msg=lambda m, name=name: f"{name}: {m}")
        return
    exact = _attention_grads(reference, x.double(), dense.cpu().double(), g.double())
    want = _attention_grads(eager, x.to(device), dense, g.to(device), dtype)
    got = _attention_grads(fused, x.to(device), labels, g.to(device), dtype)
    for name, ref, a, b in zip(names, exact, want, got, strict=True):
        err_eager, err_fused = ((t - ref).norm().item() / ref.norm().item() for t in (a, b))
        assert err_fused <= max(2 * err_eager, BF16_FLOOR), f"{name}: fused {err_fused:.3g}, eager {err_eager:.3g}"
