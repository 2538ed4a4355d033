"""Memory-lean training path for MONAI's window attention.

MONAI's ``WindowAttention`` uses ``scaled_dot_product_attention`` only when autograd is off; in training it builds
the full attention matrix ``[windows x batch, heads, n, n]`` (n = 343 tokens for 7^3 windows), keeps the softmax
output for backward and allocates several more of its size in backward. At 96^3 and the reference batch that
matrix is about 1.9 GiB per block in the first stage, so attention matrices, not weights, decide the peak.

``FusedWindowAttention`` computes the same function without keeping any n x n tensor between forward and
backward:

- forward: SDPA (flash / memory-efficient kernels where the backend has them) with the relative position bias
  and the shifted-window mask combined once per block into ``[nW, heads, n, n]`` for a chunk of windows and
  broadcast over the batch (never copied per sample); the non-shifted blocks pass ``[1, heads, n, n]``;
- backward: recomputes the attention probabilities chunk by chunk (as flash attention's backward does) and
  accumulates the gradient of the relative position bias table on the way. The working set is bounded by
  ``chunk_bytes`` whatever the batch and crop size.

A plain ``SDPA`` call cannot do this: with a bias that needs a gradient (the trainable bias table) PyTorch's CPU
kernels fall back to the math path, which materialises the matrix again, and on CUDA the memory-efficient kernel
returns the bias gradient at the full ``[windows x batch, heads, n, n]`` size.

``apply_fused_attention(model)`` swaps the class of every ``WindowAttention`` for this subclass (and of every Swin
block for ``FusedSwinBlock``, whose window partition and roll are one gather each way): parameter and buffer
names, state_dict and the MONAI weight-loading code stay exactly as they are.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import (
    BasicLayer,
    SwinTransformerBlock,
    WindowAttention,
    get_window_size,
    window_partition,
)
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FusedBasicLayer",
    "FusedSwinBlock",
    "FusedWindowAttention",
    "apply_fused_attention",
    "fused_window_attention",
    "fused_window_attention_qkv",
    "remove_fused_attention",
    "window_labels",
    "window_order",
]

# Bytes of fp32 score-sized tensors (scores, probabilities, their gradient) alive at once per chunk in backward.
DEFAULT_CHUNK_BYTES = 128 * 2**20
# Score-sized tensors a chunk is sized for: three, though the backward keeps two alive (its reused buffers), so the
# budget has headroom; changing it would regroup the windows and with them the bias gradient's summation order.
_SCORE_TENSORS = 3


def _chunk_starts(total: int, step: int, *tensors: Tensor) -> list[int]:
    """Chunk start offsets. Under FakeTensorMode (the memory estimator) only the first and the last chunk run:
    every chunk frees its temporaries before the next, so those two show the same peak at a fraction of the cost."""
    starts = list(range(0, total, step))
    # torch.compile traces with fake tensors too: there every chunk must be traced, it is the real computation.
    if len(starts) > 2 and not torch.compiler.is_compiling() and any(is_fake(t) for t in tensors):
        return [starts[0], starts[-1]]
    return starts


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """SDPA with a fixed kernel on the CPU: the flash kernel, called directly.

    ``F.scaled_dot_product_attention`` picks its kernel at run time and falls back to the math path (which builds
    the n x n matrix) under FakeTensorMode or any TorchDispatchMode, i.e. exactly when the estimator or the
    profiler watches it. Calling the kernel directly makes what is measured what runs.
    """
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale
        )[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _windows_per_chunk(rows: int, heads: int, n: int, groups: int, chunk_bytes: int) -> int:
    """Windows per chunk so that ``groups`` samples x windows x heads x n x n fp32 scores fit ``chunk_bytes``."""
    per_window = groups * heads * n * n * 4 * _SCORE_TENSORS
    return max(1, min(rows, chunk_bytes // max(per_window, 1)))


@torch.compiler.disable  # a constant of the shapes: built eagerly, so tracing never sees its slice arithmetic
def window_labels(
    dims: list[int], window_size: tuple[int, ...], shift_size: tuple[int, ...], device: torch.device
) -> Tensor:
    """Region id of every token of every window, [nW, n]: MONAI's ``compute_mask`` without the final pairwise step.

    The dense shift mask [nW, n, n] (3 GiB in the first stage at 256^3) follows from it as
    ``where(id_i == id_j, 0, -100)``; building it per chunk of windows keeps it out of memory altogether.
    """
    d, h, w = dims
    img = torch.zeros((1, d, h, w, 1), device=device)
    cnt = 0
    for ds in slice(-window_size[0]), slice(-window_size[0], -shift_size[0]), slice(-shift_size[0], None):
        for hs in slice(-window_size[1]), slice(-window_size[1], -shift_size[1]), slice(-shift_size[1], None):
            for ws in slice(-window_size[2]), slice(-window_size[2], -shift_size[2]), slice(-shift_size[2], None):
                img[:, ds, hs, ws, :] = cnt
                cnt += 1
    return window_partition(img, window_size).squeeze(-1)  # [nW, n]


def _mask_chunk(mask: Tensor, w0: int, w1: int) -> Tensor:
    """Dense additive mask [w1-w0, n, n] of windows w0..w1, from a dense mask or from window labels [nW, n]."""
    if mask.dim() == 3:
        return mask[w0:w1]
    lab = mask[w0:w1]
    return torch.where(lab.unsqueeze(2) == lab.unsqueeze(1), 0.0, -100.0).to(torch.float32)


def _combined_bias(bias: Tensor, mask: Tensor | None, w0: int, w1: int, dtype: torch.dtype) -> Tensor:
    """Relative position bias [h, n, n] plus the shift mask of windows w0..w1 -> [w1-w0 or 1, h, n, n] in ``dtype``.

    On CUDA the result is laid out with its last-dim stride padded to 16 elements: the memory-efficient kernel
    requires that alignment and would otherwise copy the mask on every call.
    """
    h, n, _ = bias.shape
    combined = bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + _mask_chunk(mask, w0, w1).unsqueeze(1)
    if bias.is_cuda and n % 16:
        buf = bias.new_empty(combined.shape[0], h, n, (n + 15) // 16 * 16, dtype=dtype)[..., :n]
        return buf.copy_(combined)
    return combined.to(dtype)


def _forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None, scale: float, chunk: int) -> Tensor:
    """softmax(q k^T * scale + bias + mask) v for q, k, v [b, h, n, d]; no autograd graph is built here.

    With a shift mask the chunks are written into a result laid out as [b, n, h, d] (returned as its [b, h, n, d]
    transpose), so the caller's ``transpose(1, 2).reshape(b, n, h * d)`` is a view, not one more copy; without one
    the kernel's own output is returned as it is."""
    b, h, n, d = q.shape
    if mask is None:
        # One call: the [1, h, n, n] bias broadcasts over all windows of all samples.
        return _sdpa(q, k, v, _combined_bias(bias, None, 0, 1, q.dtype), scale)
    nw = mask.shape[0]
    groups = b // nw  # samples; rows are ordered (sample, window) as MONAI's window_partition makes them
    out = q.new_empty(b, n, h, d).transpose(1, 2).view(groups, nw, h, n, d)
    q5, k5, v5 = (t.reshape(groups, nw, h, n, d) for t in (q, k, v))
    step = _windows_per_chunk(nw, h, n, 1, chunk)
    for w0 in _chunk_starts(nw, step, q):
        w1 = min(nw, w0 + step)
        m = _combined_bias(bias, mask, w0, w1, q.dtype)  # [w, h, n, n], shared by every sample
        for s in range(groups):
            out[s, w0:w1] = _sdpa(q5[s, w0:w1], k5[s, w0:w1], v5[s, w0:w1], m, scale)
    return out.view(b, h, n, d)


def _backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grad_out: Tensor,
    bias: Tensor,
    mask: Tensor | None,
    scale: float,
    chunk: int,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    need_dbias: bool,
) -> Tensor | None:
    """Gradients of ``_forward`` written into ``dq``, ``dk``, ``dv`` (any [b, h, n, d] layout whose first dim
    splits into (sample, window)); returns the gradient of the [h, n, n] bias (or None).

    Recomputes the probabilities chunk by chunk, as flash attention's backward does."""
    b, h, n, d = q.shape
    nw = 1 if mask is None else mask.shape[0]
    groups = b // nw
    if mask is None:  # no per-window term: chunk over all rows as one group
        groups, nw = 1, b
    shape5 = (groups, nw, h, n, d)
    q5, k5, v5, g5 = (t.reshape(shape5) for t in (q, k, v, grad_out))
    dq5, dk5, dv5 = (t.view(shape5) for t in (dq, dk, dv))
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 math for bf16/fp16 inputs, fp64 stays fp64
    bias32 = bias.to(acc)
    dbias = torch.zeros(h, n, n, dtype=acc, device=q.device) if need_dbias else None
    step = _windows_per_chunk(nw, h, n, groups, chunk)
    # Two score-sized buffers serve every chunk: scores -> dp -> ds in one, the probabilities in the other. Fresh
    # tensors per chunk (four of them) were most of the bytes the step allocated; each kernel writes into its buffer
    # exactly what it returned before (matmul's out=, softmax and its backward in place), so the numbers are the same.
    size = groups * step * h * n * n
    buf_s, buf_p = (torch.empty(size, dtype=acc, device=q.device) for _ in range(2))
    for w0 in _chunk_starts(nw, step, q):
        w1 = min(nw, w0 + step)
        score_shape = (groups, w1 - w0, h, n, n)
        numel = groups * (w1 - w0) * h * n * n
        s, p = buf_s[:numel].view(score_shape), buf_p[:numel].view(score_shape)
        qc, kc, vc, gc = (t[:, w0:w1].to(acc) for t in (q5, k5, v5, g5))  # [g, w, h, n, d]
        # matmul would copy the strided gradient into this same contiguous layout for each of its two products.
        gc = gc.contiguous()
        qs = qc * scale
        torch.matmul(qs, kc.transpose(-1, -2), out=s).add_(bias32)  # scores [g, w, h, n, n]
        if mask is not None:
            s.add_(_mask_chunk(mask, w0, w1).unsqueeze(1).to(acc))
        torch.ops.aten._softmax.out(s, -1, False, out=p)
        dv5[:, w0:w1] = torch.matmul(p.transpose(-1, -2), gc)
        dp = torch.matmul(gc, vc.transpose(-1, -2), out=s)
        # p * (dp - rowsum(p * dp)), written over dp: each row is read whole before it is written.
        ds = torch.ops.aten._softmax_backward_data.out(dp, p, -1, acc, grad_input=dp)
        dq5[:, w0:w1] = torch.matmul(ds, kc).mul_(scale)
        dk5[:, w0:w1] = torch.matmul(ds.transpose(-1, -2), qs)
        if dbias is not None:
            dbias += ds.sum(dim=(0, 1))
    return None if dbias is None else dbias.to(bias.dtype)


class _WindowAttentionFn(torch.autograd.Function):
    """SDPA forward; chunked recomputing backward that also yields the gradient of the [h, n, n] bias."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None, scale: float, chunk: int):
        ctx.scale, ctx.chunk = scale, chunk
        ctx.save_for_backward(q, k, v, bias, mask)
        return _forward(q, k, v, bias, mask, scale, chunk)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias, mask = ctx.saved_tensors
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        dbias = _backward(q, k, v, grad_out, bias, mask, ctx.scale, ctx.chunk, dq, dk, dv, ctx.needs_input_grad[3])
        return dq, dk, dv, dbias, None, None, None


class _WindowAttentionQKVFn(torch.autograd.Function):
    """``_WindowAttentionFn`` on the qkv projection's output [b, n, 3, h, d] as one tensor.

    Autograd's three ``qkv[0]``, ``qkv[1]``, ``qkv[2]`` selections would each give back a zero-filled gradient of
    the whole projection and add the three up (three fills, three copies, two additions of its size per block);
    here dq, dk and dv are written straight into one gradient laid out as the projection's output, so the
    reshapes before it stay views. Same numbers: the zeros added were exact."""

    @staticmethod
    def forward(ctx, qkv: Tensor, bias: Tensor, mask: Tensor | None, scale: float, chunk: int):
        ctx.scale, ctx.chunk = scale, chunk
        ctx.save_for_backward(qkv, bias, mask)
        q, k, v = (qkv.select(2, i).transpose(1, 2) for i in range(3))  # [b, h, n, d] views
        return _forward(q, k, v, bias, mask, scale, chunk)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qkv, bias, mask = ctx.saved_tensors
        q, k, v = (qkv.select(2, i).transpose(1, 2) for i in range(3))
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # [b, n, 3, h, d]
        dq, dk, dv = (dqkv.select(2, i).transpose(1, 2) for i in range(3))
        dbias = _backward(q, k, v, grad_out, bias, mask, ctx.scale, ctx.chunk, dq, dk, dv, ctx.needs_input_grad[1])
        return dqkv, dbias, None, None, None


def fused_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    mask: Tensor | None,
    scale: float,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tensor:
    """Window attention ``softmax(q k^T * scale + bias + mask) v`` without keeping n x n tensors for backward.

    q, k, v: [b, h, n, d] with rows ordered (sample, window); bias: [h, n, n] (may require grad);
    mask: [nW, n, n] additive shift mask, or window labels [nW, n] (see ``window_labels``), or None.
    Returns [b, h, n, d].
    """
    mask = None if mask is None else mask.detach()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias)):
        return _WindowAttentionFn.apply(q, k, v, bias, mask, scale, chunk_bytes)
    return _forward(q, k, v, bias, mask, scale, chunk_bytes)


def fused_window_attention_qkv(
    qkv: Tensor, bias: Tensor, mask: Tensor | None, scale: float, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Tensor:
    """``fused_window_attention`` on the qkv projection's output ``qkv`` [b, n, 3, h, d]; returns [b, h, n, d].
    Gradients flow to ``qkv`` as one tensor."""
    mask = None if mask is None else mask.detach()
    if torch.is_grad_enabled() and (qkv.requires_grad or bias.requires_grad):
        return _WindowAttentionQKVFn.apply(qkv, bias, mask, scale, chunk_bytes)
    q, k, v = (qkv.select(2, i).transpose(1, 2) for i in range(3))
    return _forward(q, k, v, bias, mask, scale, chunk_bytes)


class FusedWindowAttention(WindowAttention):
    """MONAI's ``WindowAttention`` with the fused path in training too; same parameters, buffers and names.

    Not constructed directly: ``apply_fused_attention`` swaps an existing module's class to this one.
    """

    _ssl3d_chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if self.training and self.attn_drop.p > 0:  # attention dropout needs the explicit matrix
            dense = None if mask is None else _mask_chunk(mask, 0, mask.shape[0])
            return super().forward(x, dense)
        b, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).view(b, n, 3, heads, c // heads)  # [b, n, 3, h, d]
        index = self.relative_position_index[:n, :n].reshape(-1)  # type: ignore[index]
        bias = self.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1)  # [h, n, n]
        y = fused_window_attention_qkv(qkv, bias, mask, self.scale, self._ssl3d_chunk_bytes)  # [b, h, n, d]
        y = y.transpose(1, 2).reshape(b, n, c)  # a view where y is laid out as [b, n, h, d] (shifted windows)
        return self.proj_drop(self.proj(y))


class WindowOrder(NamedTuple):
    """Where every token of a stage goes when MONAI pads, rolls and partitions it into windows, as indices.

    ``src`` [nW * n]: for each window token, its index in the unpadded d*h*w grid (0 where it is padding);
    ``pad`` [nW * n - d*h*w]: the window tokens that are padding (zeros); ``dst`` [d*h*w]: for each grid token, its
    position among the window tokens; ``labels``: the window labels [nW, n] of a shifted block, else None."""

    src: Tensor
    pad: Tensor
    dst: Tensor
    labels: Tensor | None


def window_order(
    dims: tuple[int, int, int], window_size: tuple[int, ...], shift_size: tuple[int, ...], device: torch.device
) -> WindowOrder:
    """The token order of MONAI's ``forward_part1`` (pad at the end, roll by ``-shift_size``, ``window_partition``)
    for a [b, d, h, w, c] stage, computed once on an index grid by MONAI's own functions (so it is theirs).

    Static shapes only (no ``nonzero``), so it also runs under FakeTensorMode (the memory estimator)."""
    d, h, w = dims
    dp, hp, wp = (-(-x // k) * k for x, k in zip(dims, window_size))
    n_grid, n_win = d * h * w, dp * hp * wp
    grid = torch.arange(n_grid, device=device).view(1, d, h, w, 1)
    grid = F.pad(grid, (0, 0, 0, wp - w, 0, hp - h, 0, dp - d), value=-1)
    shifted = any(i > 0 for i in shift_size)
    if shifted:
        grid = torch.roll(grid, shifts=tuple(-i for i in shift_size), dims=(1, 2, 3))
    src = window_partition(grid, window_size).reshape(-1)  # [nW * n], -1 where padding
    is_pad = src < 0
    # Padding tokens get the slots n_grid.. of an inverse permutation: inv[:n_grid] = dst, inv[n_grid:] = pad.
    slot = torch.where(is_pad, n_grid + torch.cumsum(is_pad, 0) - 1, src)
    inv = torch.empty_like(src).scatter_(0, slot, torch.arange(n_win, device=device))
    labels = window_labels([dp, hp, wp], window_size, shift_size, device) if shifted else None
    return WindowOrder(src.clamp(min=0), inv[n_grid:], inv[:n_grid], labels)


def _gather_tokens(x: Tensor, index: Tensor, zero: Tensor | None) -> Tensor:
    """x [b, N, c] -> [b, len(index), c]: rows ``index`` of every sample, rows ``zero`` of the result set to 0."""
    out = x.index_select(1, index)
    if zero is not None and zero.numel():
        out.index_fill_(1, zero, 0)
    return out


class _PermuteTokens(torch.autograd.Function):
    """One gather forward, one gather backward: what pad + roll + window_partition (and window_reverse + roll +
    crop) do in three copies each way, plus the zero-filled gradients of pad and crop."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, zero: Tensor | None, back: Tensor, back_zero: Tensor | None):
        ctx.save_for_backward(back, back_zero)
        return _gather_tokens(x, index, zero)

    @staticmethod
    def backward(ctx, grad: Tensor):
        back, back_zero = ctx.saved_tensors
        return _gather_tokens(grad.contiguous(), back, back_zero), None, None, None, None


class FusedSwinBlock(SwinTransformerBlock):
    """MONAI's Swin block whose window shuffling is one index gather each way (``window_order``).

    MONAI's ``forward_part1`` pads, rolls and partitions the normalised tokens (three copies), and after attention
    reverses, rolls back and crops them (three more); autograd does as many again, plus zero-filled tensors for the
    pad and the crop. Here each direction is one ``index_select``, forward and backward: the same numbers in the
    same layout (the gathers move values and add nothing). Given anything but a ``WindowOrder`` (MONAI's own
    ``BasicLayer``, a 2D input) it is MONAI's block. Not constructed directly: ``apply_fused_attention`` swaps
    an existing block's class to this one; parameter names do not change."""

    def forward_part1(self, x: Tensor, mask_matrix: Tensor | WindowOrder | None) -> Tensor:
        if not isinstance(mask_matrix, WindowOrder) or x.dim() != 5:
            return super().forward_part1(x, mask_matrix)
        order = mask_matrix
        b, d, h, w, c = x.shape
        window_size, _ = get_window_size((d, h, w), self.window_size, self.shift_size)
        n = math.prod(window_size)  # not numpy: under torch.compile a checkpoint traces numpy calls as tensors
        x = self.norm1(x).reshape(b, d * h * w, c)
        windows = _PermuteTokens.apply(x, order.src, order.pad, order.dst, None)  # [b, nW * n, c]
        y = self.attn(windows.view(-1, n, c), mask=order.labels)  # [b * nW, n, c]
        y = _PermuteTokens.apply(y.view(b, -1, c), order.dst, None, order.src, order.pad)
        return y.view(b, d, h, w, c)


class FusedBasicLayer(BasicLayer):
    """MONAI's ``BasicLayer`` handing its blocks window labels [nW, n] instead of the dense [nW, n, n] shift mask,
    and to ``FusedSwinBlock`` s the whole ``WindowOrder`` (labels and gather indices), computed once per stage.

    Same computation (``FusedWindowAttention`` rebuilds the mask per chunk); a 2D input or Hyena stages take
    MONAI's own path.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or self.use_hyena:
            return super().forward(x)
        b, c, d, h, w = x.shape
        window_size, shift_size = get_window_size((d, h, w), self.window_size, self.shift_size)
        x = x.permute(0, 2, 3, 4, 1)  # b c d h w -> b d h w c (a view, as einops' rearrange)
        dp = -(-d // window_size[0]) * window_size[0]
        hp = -(-h // window_size[1]) * window_size[1]
        wp = -(-w // window_size[2]) * window_size[2]
        labels = window_labels([dp, hp, wp], window_size, shift_size, x.device)
        orders: dict[tuple[int, ...], WindowOrder] = {}
        for blk in self.blocks:
            if isinstance(blk, FusedSwinBlock):
                _, shift = get_window_size((d, h, w), blk.window_size, blk.shift_size)
                if shift not in orders:
                    orders[shift] = window_order((d, h, w), window_size, shift, x.device)
                x = blk(x, orders[shift])
            else:
                x = blk(x, labels)
        x = x.view(b, d, h, w, -1)
        if self.downsample is not None:
            x = self.downsample(x)
        return x.permute(0, 4, 1, 2, 3)  # b d h w c -> b c d h w


def apply_fused_attention(model: nn.Module, chunk_bytes: int | None = None) -> int:
    """Swap every MONAI ``WindowAttention`` in ``model`` to the fused training path; returns how many.

    Call before wrapping the model (DDP/FSDP/compile). Idempotent; ``chunk_bytes`` bounds the backward working set.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, WindowAttention):
            if type(module) not in (WindowAttention, FusedWindowAttention):
                raise TypeError(
                    f"apply_fused_attention: found {type(module).__name__}, a subclass of WindowAttention; "
                    "apply it to the bare model, before DDP/FSDP/torch.compile wrap it"
                )
            module.__class__ = FusedWindowAttention
            if chunk_bytes is not None:
                if chunk_bytes <= 0:
                    raise ValueError(f"chunk_bytes: got {chunk_bytes}, expected a positive number of bytes")
                module._ssl3d_chunk_bytes = int(chunk_bytes)
            count += 1
    for module in model.modules():
        if type(module) is SwinTransformerBlock and type(module.attn) is FusedWindowAttention:
            module.__class__ = FusedSwinBlock
    for module in model.modules():
        if type(module) is BasicLayer and all(
            isinstance(blk, nn.Module) and type(getattr(blk, "attn", None)) is FusedWindowAttention
            for blk in module.blocks
        ):
            module.__class__ = FusedBasicLayer
    return count


def remove_fused_attention(model: nn.Module) -> int:
    """Undo ``apply_fused_attention``: MONAI's own forward again (for comparisons and benchmarks)."""
    count = 0
    for module in model.modules():
        if type(module) is FusedWindowAttention:
            module.__class__ = WindowAttention
            module.__dict__.pop("_ssl3d_chunk_bytes", None)
            count += 1
        elif type(module) is FusedBasicLayer:
            module.__class__ = BasicLayer
        elif isinstance(module, FusedSwinBlock):
            # FusedSwinBlock -> SwinTransformerBlock; a checkpointed one -> the checkpointed MONAI block.
            module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, FusedSwinBlock))
    return count
