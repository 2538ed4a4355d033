"""CUDA autocast's op lists, applied to the estimator's CPU trace.

Why: the estimator traces a step on fake CPU tensors (no GPU needed), so bf16/fp16 runs under CPU autocast, whose
op lists differ from CUDA's. Under CUDA autocast ``layer_norm`` runs in fp32 and saves an fp32 copy of its input
for backward (+2 bytes per element against CPU autocast, for every norm of every Swin block), its fp32 output flows
through pad, roll and window partition, trilinear upsampling and softmax run in fp32, and so on. A step traced under
CPU rules is therefore biased low for a GPU (GPU_AUDIT S1).

How: while ``cuda_autocast_rules()`` is active, the dispatcher's ``AutocastCPU`` key runs CUDA's policies. Python
kernels registered with ``torch.library`` replace CPU autocast's for every op on CUDA's lists (and pass through the
ops that only CPU autocast changes). They sit where autocast sits, above autograd, so what autograd saves for
backward has the dtype it has on a GPU. The lists below are torch's own (``ATen/autocast_mode.h``, the same as the
"CUDA Ops that can autocast to float32" tables of https://pytorch.org/docs/stable/amp.html); a unit test holds them
equal to the ops that have an ``AutocastCUDA`` kernel in the installed torch.

Rejected alternatives: fake CUDA tensors with real CUDA autocast are exact but need a CUDA build of torch (on a CPU
build the dispatcher's device guard aborts the process); correcting the CPU trace afterwards for known ops
(LayerNorm saves) misses what the fp32 outputs do downstream.

The registrations are process-wide while active: only the (single-threaded) trace runs under them.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "CUDA_BANNED",
    "CUDA_FP32",
    "CUDA_FP32_APPEND_DTYPE",
    "CUDA_FP32_SET_OPT_DTYPE",
    "CUDA_LOWER_PRECISION",
    "CUDA_PROMOTE",
    "cpu_only_autocast_ops",
    "cuda_autocast_ops",
    "cuda_autocast_rules",
    "registered_autocast_ops",
]

# torch 2.13, ATen/autocast_mode.h: AT_FORALL_LOWER_PRECISION_FP (cast floating inputs to the autocast dtype).
CUDA_LOWER_PRECISION = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
    "cudnn_convolution", "cudnn_convolution_transpose",  # these two: autocast_mode.cpp
)  # fmt: skip
# AT_FORALL_FP32: cast floating inputs to fp32.
CUDA_FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
    "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
    "_upsample_bicubic2d_aa",
)  # fmt: skip
# AT_FORALL_FP32_SET_OPT_DTYPE: a floating first input -> the op's own dtype argument set to fp32 (if not given).
CUDA_FP32_SET_OPT_DTYPE = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
)  # fmt: skip
# AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE: redispatched to the overload with a dtype, fp32.
CUDA_FP32_APPEND_DTYPE = {"norm.Scalar": "ScalarOpt_dtype", "norm.ScalarOpt_dim": "ScalarOpt_dim_dtype"}
# AT_FORALL_PROMOTE: cast floating inputs to the widest floating type among them.
CUDA_PROMOTE = (
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put", "tensordot",
    "scatter_add",
)  # fmt: skip
# autocast_mode.cpp: refused under CUDA autocast (it tells users to use binary_cross_entropy_with_logits).
CUDA_BANNED = ("binary_cross_entropy",)

_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
_LOW = (torch.bfloat16, torch.float16)


def cuda_autocast_ops() -> frozenset[str]:
    """Every op (``name`` or ``name.overload``) on the lists above: what has an ``AutocastCUDA`` kernel."""
    return frozenset(
        (*CUDA_LOWER_PRECISION, *CUDA_FP32, *CUDA_FP32_SET_OPT_DTYPE, *CUDA_FP32_APPEND_DTYPE, *CUDA_PROMOTE)
        + CUDA_BANNED
    )


def registered_autocast_ops(key: str) -> frozenset[str]:
    """Ops with a kernel (not a fallthrough) for dispatch key ``key`` ("AutocastCPU", "AutocastCUDA") in this torch;
    CUDA's are registered in CPU-only builds too, which is how a test checks the lists above."""
    names = torch._C._dispatch_get_all_op_names()
    return frozenset(
        n.removeprefix("aten::")
        for n in names
        if n.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(n, key)
    )


@functools.cache
def cpu_only_autocast_ops() -> frozenset[str]:
    """Ops CPU autocast changes and CUDA autocast leaves alone (e.g. ``cat``, ``max_pool3d``): passed through."""
    return registered_autocast_ops("AutocastCPU") - cuda_autocast_ops()


def _overload(name: str) -> Any:
    op, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


def _redispatch(op: Any, args: tuple, kwargs: dict) -> Any:
    """The op again, below autocast (what CUDA autocast's wrappers do after casting)."""
    with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
        return op(*args, **kwargs)


def _cast_to(dtype: torch.dtype, only_low: bool = False) -> Callable[[Any], Any]:
    """autocast's ``cached_cast``: floating tensors other than fp64 (``only_low``: bf16/fp16 only) become ``dtype``."""

    def cast(t: Any) -> Any:
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
            return t
        return t.to(dtype) if not only_low or t.dtype in _LOW else t

    return cast


def _kernel(name: str, policy: str) -> Callable[..., Any]:
    if policy == "passthrough":  # as if CPU autocast had no kernel: the op's own inner calls still autocast
        return torch.library.fallthrough_kernel
    op = _overload(name)
    if policy == "banned":

        def banned(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(
                f"torch.nn.functional.{name} and torch.nn.BCELoss are unsafe to autocast (CUDA autocast refuses "
                "them); use binary_cross_entropy_with_logits"
            )

        return banned
    if policy == "fp32":
        cast = _cast_to(torch.float32)
        return lambda *args, **kwargs: _redispatch(op, tree_map(cast, args), tree_map(cast, kwargs))
    if policy == "lower":

        def lower(*args: Any, **kwargs: Any) -> Any:
            cast = _cast_to(torch.get_autocast_dtype("cpu"))
            return _redispatch(op, tree_map(cast, args), tree_map(cast, kwargs))

        return lower
    if policy == "promote":

        def promote(*args: Any, **kwargs: Any) -> Any:
            leaves = tree_flatten((args, kwargs))[0]
            floats = [t.dtype for t in leaves if isinstance(t, Tensor) and t.is_floating_point()]
            if not floats:
                return _redispatch(op, args, kwargs)
            widest = functools.reduce(torch.promote_types, floats)
            cast = _cast_to(widest)
            return _redispatch(op, tree_map(cast, args), tree_map(cast, kwargs))

        return promote
    if policy == "set_opt_dtype":
        schema = [a.name for a in op._schema.arguments]
        i = schema.index("dtype")
        kwarg_only = op._schema.arguments[i].kwarg_only

        def set_opt_dtype(*args: Any, **kwargs: Any) -> Any:
            if not (args and isinstance(args[0], Tensor) and args[0].is_floating_point()):
                return _redispatch(op, args, kwargs)
            if kwarg_only or len(args) <= i:
                if kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
            elif args[i] is None:
                args = (*args[:i], torch.float32, *args[i + 1 :])
            return _redispatch(op, args, kwargs)

        return set_opt_dtype
    if policy == "append_dtype":
        target = _overload(f"{name.partition('.')[0]}.{CUDA_FP32_APPEND_DTYPE[name]}")

        def append_dtype(*args: Any, **kwargs: Any) -> Any:
            if not (args and isinstance(args[0], Tensor) and args[0].is_floating_point()):
                return _redispatch(op, args, kwargs)
            return _redispatch(target, args, {**kwargs, "dtype": torch.float32})

        return append_dtype
    raise ValueError(f"unknown autocast policy {policy!r}")


def _policies() -> dict[str, str]:
    """Op -> the kernel this mode registers for it. CUDA's lower-precision ops that CPU autocast also casts down keep
    CPU's kernel: same policy, and it shares autocast's cache of low-precision weight copies, as CUDA's does."""
    cpu = registered_autocast_ops("AutocastCPU")
    out = {name: "passthrough" for name in cpu_only_autocast_ops()}
    out.update({n: "lower" for n in CUDA_LOWER_PRECISION if n not in cpu})
    out.update({n: "fp32" for n in CUDA_FP32})
    out.update({n: "set_opt_dtype" for n in CUDA_FP32_SET_OPT_DTYPE})
    out.update({n: "append_dtype" for n in CUDA_FP32_APPEND_DTYPE})
    out.update({n: "promote" for n in CUDA_PROMOTE})
    out.update({n: "banned" for n in CUDA_BANNED})
    return out


@contextlib.contextmanager
def cuda_autocast_rules() -> Iterator[None]:
    """Within: ``torch.autocast("cpu", dtype)`` follows CUDA autocast's op lists (see the module docstring)."""
    lib = torch.library.Library("aten", "IMPL")  # registrations undone on exit
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")  # replacing CPU autocast's kernels
            for name, policy in _policies().items():
                try:
                    op = _overload(name)
                except AttributeError:  # an op this torch build does not have
                    continue
                lib.impl(op, _kernel(name, policy), "AutocastCPU")
        yield
    finally:
        lib._destroy()
