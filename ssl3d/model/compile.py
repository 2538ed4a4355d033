"""Regional ``torch.compile``: each Swin block and the decoder compiled on their own, in place (``model.compile``).

Why regions, not the whole model: the blocks of a stage are identical, so one compiled graph serves all of them
(compile time grows with the number of distinct blocks, not the depth); the data-dependent Python around them (the
stages' window orders, the SSL heads, the losses) stays eager; and a region is what activation checkpointing and
FSDP2 already treat as a unit (torchtitan compiles per transformer block for the same reasons).

Order: ``apply_fused_attention`` -> ``apply_activation_checkpointing`` -> ``compile_regions`` -> ``Strategy.setup``
(wrap/shard) -> optimizer. ``nn.Module.compile`` compiles a module's call in place: the module keeps its class (the
checkpointing and fused-attention class swaps are compiled with it, non-reentrant checkpoints become compiled
recomputation), its parameter names and its state_dict, so checkpoints and ``model_swinvit.pt`` are unchanged.

The decoder is a region too: the SSL model's reconstruction decoder (``conv``: five [Conv, Norm, Act, Upsample]
stages, one graph; checkpointed per stage where the policy says so) and SwinUNETR's up-sampling blocks
(``decoder1``-``decoder5``, one region each). At full resolution its instance norms, activations and upsampling are
the elementwise traffic that fusing removes.

Inductor keeps compiled kernels in its on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, by default under the system's
temporary folder), so a second run with the same shapes skips most of the compile time. On the CPU inductor needs a
C++ compiler; ``compile_problem`` (config validation) says when there is none.
"""

from __future__ import annotations

from typing import Any

from monai.networks.blocks import UnetrUpBlock
from monai.networks.nets.swin_unetr import SwinTransformerBlock
from torch import nn

from ssl3d.config import compile_problem

__all__ = ["compile_problem", "compile_refusal", "compile_regions", "compiled_regions", "decoder_regions"]


def compile_regions(model: nn.Module, *, decoder: bool = True, **options: Any) -> int:
    """Compile every Swin block of ``model`` and (with ``decoder``) its decoder in place (``nn.Module.compile``);
    returns how many regions.

    Call on the bare model after activation checkpointing and before DDP/FSDP/DeepSpeed wrap it. ``options`` go to
    ``torch.compile`` (e.g. ``mode="max-autotune"``); by default graphs are compiled for the shapes seen
    (``dynamic=False``): every block of a stage has the same shapes, and a new crop size compiles once more."""
    options.setdefault("dynamic", False)
    regions = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    if decoder:
        regions += decoder_regions(model)
    for module in regions:
        module.compile(**options)
    return len(regions)


def decoder_regions(model: nn.Module) -> list[nn.Module]:
    """The decoder's regions: the SSL model's reconstruction decoder ``conv`` as one (a frozen one is left out), or
    SwinUNETR's up-sampling blocks."""
    conv = getattr(model, "conv", None)
    if isinstance(conv, nn.Module) and any(p.requires_grad for p in conv.parameters()):
        return [conv]
    return [m for m in model.modules() if isinstance(m, UnetrUpBlock)]


def compile_refusal(strategy: str, zero_stage: int) -> str | None:
    """Why ``model.compile`` is refused for this backend (``strategy`` as in the ds_config, ``zero_stage`` its
    ``zero_optimization.stage``), or None: one line naming the key and what to use instead.

    ZeRO-3 gathers every layer's parameters in forward hooks that DeepSpeed marks ``torch.compiler.disable``, so
    each compiled Swin block breaks into a graph per layer and nothing fuses across them, for the compile time of
    many more graphs (BENCHMARKS.md, "Regional torch.compile"). DDP, FSDP2, fairscale and ZeRO-0/1/2 keep one graph
    per region (tests/dist/test_compile_strategies.py for DDP and FSDP2)."""
    if strategy == "deepspeed" and zero_stage == 3:
        return (
            "model.compile: true is refused with DeepSpeed ZeRO-3 (zero_optimization.stage 3): its per-layer "
            "parameter gathering cuts every compiled block into a graph per layer, so nothing fuses across layers "
            'and compiling takes about twice as long; use strategy "fsdp" (FSDP2 also shards parameters and '
            "keeps whole blocks compiled), ZeRO stage 1 or 2, or model.compile=false"
        )
    return None


def compiled_regions(model: nn.Module) -> list[str]:
    """Names of the modules ``compile_regions`` compiled (for logs and tests)."""
    return [name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
