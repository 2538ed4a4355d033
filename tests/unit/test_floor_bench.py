"""bench/floor.py: the step-time floor counts the step's real attention calls and MONAI's padding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from monai.networks.nets.swin_unetr import get_window_size

from ssl3d.config import ModelConfig
from ssl3d.model import build_model
from ssl3d.model.attention import apply_fused_attention, window_order

ROOT = Path(__file__).resolve().parents[2]


def _floor_bench():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("floor_bench", ROOT / "bench/floor.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("roi", [64, 96, 128])
def test_the_real_token_shares_are_monais_padding(roi: int) -> None:
    """Per attention call, the share of real tokens among the window tokens is what MONAI's pad-and-partition
    makes (read from ``window_order``'s padding rows), block by block in the order the step calls them."""
    shares = _floor_bench().real_token_shares(roi, (2, 2, 2, 2))
    expected = []
    for stage in range(4):
        dims = (roi // 2 // 2**stage,) * 3
        for shift in ((0, 0, 0), (3, 3, 3)):
            window, shift_used = get_window_size(dims, (7, 7, 7), shift)
            order = window_order(dims, window, shift_used, torch.device("cpu"))
            expected.append(1 - order.pad.numel() / order.src.numel())
    assert shares == pytest.approx(expected, abs=1e-12)
    if roi == 64:  # the third stage: 8^3 real tokens padded to 14^3
        assert shares[4] == shares[5] == pytest.approx((8 / 14) ** 3)


def test_the_floor_times_every_attention_call_of_the_step() -> None:
    """The FLOP count and the attention shapes come from one real forward and backward: one call per Swin block,
    [windows x views, heads, window tokens, head dim], and the attention's products are counted apart from the
    rest (the bmm the fused backward runs)."""
    bench = _floor_bench()
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_size=12, depths=(1, 1, 1, 1), window_size=4))
    apply_fused_attention(model)
    by_op, shapes = bench.step_flops(model, views=4, roi=(64, 32, 32))
    assert len(shapes) == 4
    # stage 0: 32 x 16 x 16 tokens in 4^3 windows = 128 windows x 4 views, 3 heads, 64 tokens, head dim 4
    assert shapes[0] == (512, 3, 64, 4)
    assert [s[1] for s in shapes] == [3, 6, 12, 24] and all(s[3] == 4 for s in shapes)
    assert by_op["bmm"] > 0 and by_op["mm"] > 0 and sum(by_op.values()) > by_op["bmm"]
    times, flops = bench.attention_times(shapes[-1:], repeats=1)
    b, h, n, d = shapes[-1]
    assert flops == 12 * b * h * n * n * d and len(times) == 1 and times[0] > 0
