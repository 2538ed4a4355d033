"""The CUDA estimate follows CUDA's rules: autocast's op lists, the stated allowances, pinned host blocks, and the
``--fit-memory`` size suggested for a card (margin, rounded down)."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ssl3d.memory.estimate as est
from ssl3d.config import ModelConfig
from ssl3d.memory.cuda_autocast import (
    CUDA_LOWER_PRECISION,
    cpu_only_autocast_ops,
    cuda_autocast_ops,
    cuda_autocast_rules,
    registered_autocast_ops,
)
from ssl3d.memory.plan import CAPACITY_MARGIN, fit_memory_flag, usable_capacity
from ssl3d.model.meta import model_key
from ssl3d.tasks import PRETRAIN

GIB, MIB = 2**30, 2**20
TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24), window_size=4)
ROI = (32, 64, 64)


def test_the_lists_are_the_installed_torchs() -> None:
    """Every op with an AutocastCUDA kernel in this torch is on ssl3d's lists and nothing else is: a torch that
    changes CUDA autocast's lists fails here, naming the ops."""
    assert registered_autocast_ops("AutocastCUDA") == cuda_autocast_ops()
    assert "cat" in cpu_only_autocast_ops() and "layer_norm" not in cpu_only_autocast_ops()


def test_lower_precision_ops_left_to_cpu_autocast_cast_down_there_too() -> None:
    """CUDA's lower-precision ops that CPU autocast also handles keep CPU's kernel (it shares autocast's cache of
    low-precision weight copies): that is only right if CPU's policy is the same, checked on the ones models use."""
    cpu = registered_autocast_ops("AutocastCPU")
    assert {"linear", "conv3d", "matmul", "bmm", "mm", "addmm", "baddbmm", "scaled_dot_product_attention"} <= cpu
    a, w = torch.randn(2, 4, 8), torch.randn(8, 8)
    x, k = torch.randn(1, 2, 6, 6, 6), torch.randn(3, 2, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [
            F.linear(a, w),
            F.conv3d(x, k),
            a @ w,
            torch.bmm(a, a.transpose(1, 2)),
            torch.mm(w, w),
            torch.addmm(w, w, w),
            torch.baddbmm(a[:, :, :4], a, a.transpose(1, 2)[:, :, :4]),
            F.scaled_dot_product_attention(a[None], a[None], a[None]),
        ]
    assert all(o.dtype == torch.bfloat16 for o in outs)
    assert set(CUDA_LOWER_PRECISION) >= {"linear", "conv3d", "scaled_dot_product_attention"}


def test_cpu_autocast_takes_cudas_rules_inside_and_its_own_after() -> None:
    x = torch.randn(2, 4, 16, requires_grad=True)
    ln, lin = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)
    vol = torch.randn(1, 2, 4, 4, 4)
    with cuda_autocast_rules(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        z = ln(y)
        assert y.dtype == torch.bfloat16 and z.dtype == torch.float32  # layer_norm: CUDA's fp32 list
        # What LayerNorm saves for backward is an fp32 copy of its (bf16) input.
        assert z.grad_fn.next_functions[0][0].name() == "ToCopyBackward0"
        assert torch.softmax(y, -1).dtype == torch.float32  # set_opt_dtype: softmax(..., dtype=float32)
        assert F.interpolate(vol.bfloat16(), scale_factor=2, mode="trilinear").dtype == torch.float32
        # cross_entropy is no autocast op on CUDA, but its inner log_softmax and nll_loss are: fp32 (a
        # pass-through must let the inner calls autocast, not switch autocast off).
        assert F.cross_entropy(y.reshape(8, 16), torch.zeros(8, dtype=torch.long)).dtype == torch.float32
        with pytest.raises(RuntimeError, match="unsafe to autocast"):
            F.binary_cross_entropy(torch.sigmoid(y.float()).bfloat16(), torch.zeros(2, 4, 16, dtype=torch.bfloat16))
    z.float().sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ln(lin(x)).dtype == torch.bfloat16  # CPU autocast's own rules are back


def _traces(precision: str = "bf16", **kw):
    """The CUDA trace, and the same step traced under CPU autocast's rules (the estimate before)."""
    step = est.step_settings(TINY, ROI, 1, 1, precision, None, **kw, task=PRETRAIN)
    key, bare = model_key(step.model), dataclasses.replace(step, model=None)
    cuda = est._trace_cached.__wrapped__(key, bare, True)
    rules = est.cuda_autocast_rules
    est.cuda_autocast_rules = contextlib.nullcontext
    try:
        cpu_rules = est._trace_cached.__wrapped__(key, bare, True)
    finally:
        est.cuda_autocast_rules = rules
    return cuda, cpu_rules


def _end_of_forward(trace: est.StepTrace) -> int:
    return int(trace.column("activations")[int(np.argmax(trace.phase == 2)) - 1])


def _layer_norm_saves() -> int:
    """Bytes CUDA autocast's LayerNorms keep beyond CPU autocast's at the end of forward, derived per LayerNorm whose
    output the loss uses (norm1 and norm2 of every block, every patch merging, the last stage's output norm): its
    input saved as an fp32 copy instead of the bf16 tensor (+2 bytes per element), and its mean and rstd (one per
    token) in fp32 instead of bf16 (+2 x 2 bytes per token). The stage outputs' norms 0-3 feed nothing: freed."""
    views, c = 2, TINY.feature_size  # 1 volume x 1 crop, two views
    total = 0
    for i in range(4):
        tokens = views * np.prod([r // 2 ** (i + 1) for r in ROI])
        ch = c * 2**i
        numel = int(tokens * ch)
        total += 2 * (2 * numel + 4 * numel // ch)  # norm1, norm2: [tokens, ch]
        total += 2 * numel + 4 * numel // (8 * ch)  # the merging's norm: [tokens / 8, 8 ch]
    tokens = views * np.prod([r // 32 for r in ROI])
    total += int(tokens * (2 * 16 * c + 4))  # the last stage's output norm: [tokens, 16 c]
    return total


@pytest.mark.parametrize("fused", [True, False])
def test_cuda_estimate_keeps_layer_norms_fp32_copies(fused: bool) -> None:
    """The CUDA trace keeps more than the CPU-rules one by exactly the LayerNorm saves derived above. Tolerance:
    the caching allocator's 512-byte rounding of the ~3 tensors per LayerNorm that change dtype (13 LayerNorms:
    < 20 KiB), plus the heads' two [2, 192] bf16 token copies (CUDA saves casts of the fp32 norm's output where the
    CPU saves views of its bf16 one): 32 KiB in all, 1% of the ~3.4 MB difference."""
    cuda, cpu_rules = _traces(fused_attention=fused)
    delta = _end_of_forward(cuda) - _end_of_forward(cpu_rules)
    assert abs(delta - _layer_norm_saves()) <= 32 * 1024, (delta, _layer_norm_saves())
    assert cuda.events[:, 1:-1].sum(1).max() > cpu_rules.events[:, 1:-1].sum(1).max()


@pytest.mark.slow
def test_fp32_is_traced_as_it_was() -> None:
    cuda, cpu_rules = _traces("fp32")
    assert np.array_equal(cuda.events, cpu_rules.events)


def test_cuda_allowances_are_in_the_estimate() -> None:
    """cuBLAS + cuDNN workspaces in the allocator's figures, the CUDA context after them, NCCL only with ranks."""
    one = est.estimate_memory(TINY, ROI, 1, 1, "bf16", task=PRETRAIN).breakdown
    assert one["workspace"] == est.CUBLAS_WORKSPACE + est.CUDNN_WORKSPACE
    assert one["runtime"] == est.CUDA_CONTEXT and one["nccl"] == 0
    assert one["total"] == one["reserved"] + one["runtime"]
    ddp = est.estimate_memory(TINY, ROI, 1, 1, "bf16", strategy="ddp", world_size=8, task=PRETRAIN)
    assert ddp.breakdown["nccl"] == est.NCCL_BUFFERS
    assert ddp.breakdown["total"] == ddp.breakdown["reserved"] + ddp.breakdown["runtime"] + est.NCCL_BUFFERS
    assert "NCCL buffers (outside the allocator)" in est.format_estimate(ddp)
    assert "NCCL" not in est.format_estimate(est.estimate_memory(TINY, ROI, 1, 1, "bf16", task=PRETRAIN))
    assert est.estimate_memory(
        TINY, ROI, 1, 1, "bf16", strategy="ddp", world_size=8, nccl_bytes=0, task=PRETRAIN
    ).total == (ddp.total - est.NCCL_BUFFERS)
    cpu = est.estimate_memory(
        TINY, ROI, 1, 1, "fp32", device="cpu", strategy="ddp", world_size=2, task=PRETRAIN
    ).breakdown
    assert "nccl" not in cpu


def test_pinned_host_blocks_round_up_to_powers_of_two() -> None:
    """S3: torch's caching host allocator gives offloaded tensors power-of-two blocks and keeps them."""
    tracker = est.StorageTracker(round_bytes=est.CUDA_BLOCK, pinned_host=True)
    with tracker:
        with tracker.host():
            kept = torch.empty(3000, dtype=torch.uint8) + 1  # 3000 bytes -> a 4096-byte block
        dev = torch.empty(3000, dtype=torch.uint8) + 1  # device memory: 512-byte rounding
    assert tracker.current[est.CATEGORIES.index("host")] == 4096
    assert tracker.current[est.CATEGORIES.index("activations")] == 3072
    del kept, dev
    offload = {"policy": "offload"}
    host = est.estimate_memory(TINY, ROI, 1, 1, "fp32", offload, task=PRETRAIN).breakdown["host_offload_max"]
    assert host > 0 and "powers of two" in est.format_estimate(
        est.estimate_memory(TINY, ROI, 1, 1, "fp32", offload, task=PRETRAIN)
    )


@pytest.mark.parametrize(
    "total, gib",
    [
        (34_089_730_048, 29),  # 32 GB V100: 31.75 GiB
        (16_945_512_448, 14),  # 16 GB V100: 15.78 GiB
        (42_949_672_960, 37),  # 40 GB A100: 40 GiB
        (85_520_809_984, 74),  # 80 GB H100: 79.65 GiB
    ],
)
def test_suggested_fit_memory_keeps_the_margin_and_rounds_down(total: int, gib: int) -> None:
    size, flag = fit_memory_flag(total)
    assert (size, flag) == (gib * GIB, f"{gib}GiB")
    assert size <= usable_capacity(total) < size + GIB
    assert usable_capacity(total) == int(total * (1 - CAPACITY_MARGIN)) and 0.05 <= CAPACITY_MARGIN <= 0.08


def test_suggested_fit_memory_below_a_gib_is_in_mib() -> None:
    assert fit_memory_flag(GIB) == (962 * MIB, "962MiB")
