"""Regional ``torch.compile``: each Swin block compiled on its own, in place (``model.compile`` in the run config).

Why regions, not the whole model: the blocks of a stage are identical, so one compiled graph serves all of them
(compile time grows with the number of distinct blocks, not the depth); the data-dependent Python around them (the
stages' window orders, the SSL heads, the losses) stays eager; and a region is what activation checkpointing and
FSDP2 already treat as a unit (torchtitan compiles per transformer block for the same reasons).

Order: ``apply_fused_attention`` -> ``apply_activation_checkpointing`` -> ``compile_regions`` -> ``Strategy.setup``
(wrap/shard) -> optimizer. ``nn.Module.compile`` compiles a module's call in place: the module keeps its class (the
checkpointing and fused-attention class swaps are compiled with it, non-reentrant checkpoints become compiled
recomputation), its parameter names and its state_dict, so checkpoints and ``model_swinvit.pt`` are unchanged.

Inductor keeps compiled kernels in its on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, by default under the system's
temporary folder), so a second run with the same shapes skips most of the compile time. On the CPU inductor needs a
C++ compiler; ``compile_problem`` (config validation) says when there is none.
"""

from __future__ import annotations

from typing import Any

from monai.networks.nets.swin_unetr import SwinTransformerBlock
from torch import nn

from ssl3d.config import compile_problem

__all__ = ["compile_problem", "compile_regions", "compiled_regions"]


def compile_regions(model: nn.Module, **options: Any) -> int:
    """Compile every Swin block of ``model`` in place (``nn.Module.compile``); returns how many.

    Call on the bare model after activation checkpointing and before DDP/FSDP/DeepSpeed wrap it. ``options`` go to
    ``torch.compile`` (e.g. ``mode="max-autotune"``); by default graphs are compiled for the shapes seen
    (``dynamic=False``): every block of a stage has the same shapes, and a new crop size compiles once more."""
    options.setdefault("dynamic", False)
    count = 0
    for module in model.modules():
        if isinstance(module, SwinTransformerBlock):
            module.compile(**options)
            count += 1
    return count


def compiled_regions(model: nn.Module) -> list[str]:
    """Names of the modules ``compile_regions`` compiled (for logs and tests)."""
    return [name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
