"""How fast could one pre-training step be on this machine? A lower bound from the step's own FLOPs and shapes.

MFU divides a step's FLOPs by the rate of one large square matmul, but half of a Swin step's FLOPs are window
attention products at head dim 16 (48 channels / 3 heads in the first stage): [343 x 16] x [16 x 343] and
[343 x 343] x [343 x 16], a shape no BLAS runs at its square-matmul rate. This bound asks what the step would take
if everything were as fast as the machine's own kernels can make it:

- the attention: per call, forward and backward each the faster of its products as batched matmuls (forward:
  scores and output; backward: the gradients of values, scores, queries and keys; no softmax, nothing
  recomputed; outputs preallocated) and torch's fused CPU flash-attention kernel (its backward without the bias
  gradient the model's trainable bias table needs; one bias broadcast over the windows, the cheaper of its two
  mask forms), timed at the step's real shapes (every block's windows x views, heads, tokens, head dim);
- every other FLOP of the step (linears, convolutions, patch merging, heads; torch's FLOP counter on the real step,
  minus the attention's) at the dense fp32 GEMM rate measured in the same process;
- nothing else: no LayerNorm, GELU, copies, optimizer or data movement (all of which a real step pays).

So the real step cannot be faster than the printed floor on this machine with these kernels; a target below it
asks for faster kernels, not for less overhead. One more line puts it in context: the floor of an attention that
skipped the padding's query rows (MONAI pads every stage to whole windows: 35^3 tokens for 32^3 in the first stage
at ROI 64, 14^3 for 8^3 in the third; the padding's outputs are thrown away, but a window kernel that skips them
must handle a different number of queries in every window), the attention's time scaled by the stage's share of
real tokens.

    python bench/floor.py --feature-size 48 --roi 64 --views 4 --threads 2    # results: BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
from monai.networks.nets.swin_unetr import get_window_size

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import count_cpu_sdpa, dense_gemm_rate  # noqa: E402

from ssl3d.config import ModelConfig  # noqa: E402
from ssl3d.model import attention as fused  # noqa: E402
from ssl3d.model import build_model  # noqa: E402
from ssl3d.ssl import MaskingParams, SSLLoss, make_views  # noqa: E402

ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "bmm")


def step_flops(model: torch.nn.Module, views: int, roi: tuple[int, int, int]) -> tuple[dict[str, int], list]:
    """FLOPs by operator of one real forward + backward (fused attention), and every attention call's
    (q/k/v shape) as it ran: the shapes the floor times."""
    from torch.utils.flop_counter import FlopCounterMode

    shapes: list[tuple[int, int, int, int]] = []
    inner = fused._forward

    def recording_forward(q, k, v, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        shapes.append(tuple(q.shape))  # [windows x views, heads, n, d]
        return inner(q, k, v, *args, **kwargs)

    count_cpu_sdpa()
    x = torch.rand(views // 2, 1, *roi)
    v = make_views(x, torch.Generator().manual_seed(0), MaskingParams())
    fused._forward = recording_forward
    try:
        with FlopCounterMode(display=False) as counter:
            o = model(v.corrupted)
            loss = SSLLoss()(o.rotation, v.rot_labels, o.contrastive, o.reconstruction, v.views)["total"]
            loss.backward()
    finally:
        fused._forward = inner
    by_op = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    return by_op, shapes


def real_token_shares(roi: int, depths: tuple[int, ...], window: int = 7, patch: int = 2) -> list[float]:
    """For every attention call in order (stage by stage, block by block): real tokens / padded window tokens."""
    shares = []
    for stage, depth in enumerate(depths):
        side = roi // patch // 2**stage
        w = get_window_size((side,) * 3, (window,) * 3)[0]  # a stage no larger than the window is one window
        padded = -(-side // w) * w
        shares += [(side / padded) ** 3] * depth
    return shares


def best_time(fn, repeats: int) -> float:  # noqa: ANN001
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def attention_times(shapes: list, repeats: int) -> tuple[list[float], float]:
    """Per attention call in ``shapes``: the fastest way this machine's kernels do it, forward and backward each
    the faster of (a) its products as batched matmuls with preallocated outputs (forward: scores, output;
    backward: dV, dP, dQ, dK; no softmax, nothing recomputed) and (b) torch's fused CPU flash-attention kernel
    (forward; backward without the bias gradient); each timed at the call's shape, best of ``repeats``.
    Returns the per-call seconds and the products' FLOPs."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    times, total_flops = [], 0.0
    for b, h, n, d in shapes:
        q, k, v, g = (torch.randn(b * h, n, d) for _ in range(4))
        p = torch.rand(b * h, n, n)
        s_out, o_out, nd_out = torch.empty(b * h, n, n), torch.empty(b * h, n, d), torch.empty(b * h, n, d)
        forward_products = [
            partial(torch.bmm, q, k.transpose(1, 2), out=s_out),  # scores
            partial(torch.bmm, p, v, out=o_out),  # output
        ]
        backward_products = [
            partial(torch.bmm, p.transpose(1, 2), g, out=nd_out),  # dV = P^T dO
            partial(torch.bmm, g, v.transpose(1, 2), out=s_out),  # dP = dO V^T
            partial(torch.bmm, p, k, out=nd_out),  # dQ = dS K
            partial(torch.bmm, p.transpose(1, 2), q, out=nd_out),  # dK = dS^T Q
        ]
        q4, k4, v4, g4 = (t.view(b, h, n, d) for t in (q, k, v, g))
        bias = torch.randn(1, h, n, n)
        out, lse = flash(q4, k4, v4, 0.0, False, attn_mask=bias)
        forward = min(
            sum(best_time(fn, repeats) for fn in forward_products),
            best_time(partial(flash, q4, k4, v4, 0.0, False, attn_mask=bias), repeats),
        )
        backward = min(
            sum(best_time(fn, repeats) for fn in backward_products),
            best_time(partial(flash_backward, g4, q4, k4, v4, out, lse, 0.0, False, attn_mask=bias), repeats),
        )
        times.append(forward + backward)
        total_flops += 6 * 2 * b * h * n * n * d
    return times, total_flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--views", type=int, default=4, help="views a step (the reference's batch 1 x 2 crops: 4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args()
    if a.views < 2 or a.views % 2:
        p.error(f"--views: got {a.views}, expected an even number (two views of every crop), at least 2")
    if a.roi < 64 or a.roi % 32:
        p.error(f"--roi: got {a.roi}, expected a multiple of 32 of at least 64 (the heads read 2 last-stage tokens)")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_size=a.feature_size))
    fused.apply_fused_attention(model)
    by_op, shapes = step_flops(model, a.views, (a.roi,) * 3)
    attention_counted = sum(by_op.get(op, 0) for op in ATTENTION_OPS)
    other = sum(by_op.values()) - attention_counted
    gemm = dense_gemm_rate(torch.device("cpu"), torch.float32)
    times, attn_flops = attention_times(shapes, a.repeats)
    attn_s = sum(times)
    shares = real_token_shares(a.roi, (2, 2, 2, 2))
    skip_s = sum(t * share for t, share in zip(times, shares, strict=True))
    other_s = other / gemm
    out = {
        "step_flops_executed": sum(by_op.values()),
        "flops_by_op": by_op,
        "attention_calls": len(shapes),
        "attention_products_flops": attn_flops,
        "attention_s": attn_s,
        "attention_s_per_call": times,
        "other_flops": other,
        "gemm_flops_per_s": gemm,
        "other_at_gemm_rate_s": other_s,
        "floor_s": attn_s + other_s,
        "floor_skipping_padding_s": skip_s + other_s,
    }
    print(
        f"step: {out['step_flops_executed'] / 1e9:.1f} GFLOP executed; {len(shapes)} attention calls\n"
        f"attention, the faster of its 6 products and torch's flash kernel, each direction: {attn_s:.2f} s "
        f"({attn_flops / 1e9:.1f} GFLOP of products, {attn_flops / attn_s / 1e9:.0f} GFLOP/s)\n"
        f"everything else: {other / 1e9:.1f} GFLOP at the dense GEMM rate {gemm / 1e9:.0f} GFLOP/s: {other_s:.2f} s\n"
        f"floor (no norms, copies, optimizer): {out['floor_s']:.2f} s a step\n"
        f"  an attention skipping the padding's queries (products {skip_s:.2f} s): "
        f"{out['floor_skipping_padding_s']:.2f} s"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
