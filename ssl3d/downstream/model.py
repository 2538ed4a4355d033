"""Initialising the downstream networks (``ssl3d.model.segmentation``) from any weights ssl3d reads.

Fine-tuning uses MONAI's own ``SwinUNETR`` (the network users fine-tune); the probe is the same ``SwinTransformer``
frozen, with one 1x1x1 convolution per stage output, upsampled to the input and summed. Both keep the encoder at
``swinViT``, so one loader serves both: every source (``model_swinvit.pt``, a run or step folder of any backend, the
reference's checkpoints) goes to the released format and through ``SwinUNETR.load_from``; before that, the names,
shapes and (when ``model_swinvit.json`` is there) the fingerprints are checked, and after it every encoder tensor is
compared with its source bit for bit, so weights that "load" but land nowhere or permuted fail loudly.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl3d.checkpoint import load_weights_file, read_weights, resolve_resume, to_swinvit_format
from ssl3d.config import ConfigError, ModelConfig
from ssl3d.metadata import ARCH_KEYS, read_metadata, verify_tensors
from ssl3d.model.segmentation import ProbeModel, build_segmentation_model

__all__ = [
    "InitSource",
    "ProbeModel",
    "build_segmentation_model",
    "load_encoder",
    "read_init",
]


# ---------------------------------------------------------------------------------------------------------
# Initialisation


@dataclasses.dataclass
class InitSource:
    path: Path  # the file or checkpoint folder read
    encoder: dict[str, torch.Tensor]  # SwinTransformer state-dict names (as model.swinViT.state_dict())
    metadata: dict[str, Any] | None  # model_swinvit.json, when there is one

    def load_into(self, model: nn.Module) -> int:
        """``load_encoder(model, self)``: the segmentation task initialises its network through this."""
        return load_encoder(model, self)


def resolve_init(init: str) -> Path:
    """A file as is; a run folder: its ``model_swinvit.pt`` (else its newest checkpoint); a step folder itself."""
    p = Path(init)
    if p.is_dir():
        if (p / "model_swinvit.pt").is_file():
            return p / "model_swinvit.pt"
        found = resolve_resume(str(p), p)
        assert found is not None
        return found
    if not p.is_file():
        raise ConfigError(f"finetune.init: {init} not found")
    return p


def read_init(init: str) -> InitSource:
    path = resolve_init(init)
    meta = read_metadata(path) if path.is_file() else None
    if meta is not None:
        raw = load_weights_file(path)
        verify_tensors(path, meta, raw.get("state_dict", {}))
    state = read_weights(path)
    encoder = {k[len("swinViT.") :]: v for k, v in state.items() if k.startswith("swinViT.")}
    if not encoder:
        raise ConfigError(f"{path}: no encoder tensors (swinViT / patch_embed / layers1-4) found")
    return InitSource(path, encoder, meta)


def infer_architecture(encoder: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Feature size, depths, heads and input channels that the tensors themselves show (for files without JSON)."""
    out: dict[str, Any] = {}
    pe = encoder.get("patch_embed.proj.weight")
    if pe is not None:
        out["feature_size"], out["in_channels"], out["patch_size"] = (
            int(pe.shape[0]),
            int(pe.shape[1]),
            int(pe.shape[2]),
        )
    depths, heads = [], []
    for i in range(1, 5):
        blocks = {int(m.group(1)) for k in encoder if (m := re.match(rf"layers{i}\.0\.blocks\.(\d+)\.", k))}
        depths.append(max(blocks) + 1 if blocks else 0)
        table = encoder.get(f"layers{i}.0.blocks.0.attn.relative_position_bias_table")
        heads.append(int(table.shape[1]) if table is not None else 0)
    if all(depths):
        out["depths"] = depths
    if all(heads):
        out["num_heads"] = heads
    return out


def reconcile_model_config(m: ModelConfig, source: InitSource, explicit: set[str]) -> tuple[ModelConfig, list[str]]:
    """The model config the export needs: its metadata (or what its tensors show) fills what the user left unset;
    a value the user set that contradicts it is an error naming the file. Returns the config and notes."""
    known = dict(source.metadata["model"]) if source.metadata else infer_architecture(source.encoder)
    where = f"{source.path.name} metadata" if source.metadata else f"the tensors of {source.path.name}"
    problems, changes, notes = [], {}, []
    for key in ARCH_KEYS:
        if key not in known:
            continue
        want = tuple(known[key]) if isinstance(known[key], list) else known[key]
        have = getattr(m, key)
        if have == want:
            continue
        if f"model.{key}" in explicit:
            problems.append(
                f"finetune.init: {source.path}: {key} {_show(want)} ({where}) but model.{key} is {_show(have)}; "
                f"drop model.{key} to take it from the export, or choose an export with {key} {_show(have)}"
            )
        else:
            changes[key] = want
            notes.append(f"model.{key} = {_show(want)} from {where}")
    if problems:
        raise ConfigError(problems)
    return m.model_copy(update=changes), notes


def _show(v: Any) -> str:
    return str(list(v)) if isinstance(v, tuple | list) else str(v)


def load_encoder(model: nn.Module, source: InitSource) -> int:
    """Copy the source's encoder into ``model.swinViT`` through ``SwinUNETR.load_from``; returns tensors checked.

    Raises ConfigError for names or shapes that do not fit, RuntimeError if ``load_from`` left any tensor unequal."""
    own = model.swinViT.state_dict()
    problems = []
    for name, t in own.items():
        if name not in source.encoder:
            problems.append(f"{name} missing (renamed, or another depth?)")
        elif source.encoder[name].shape != t.shape:
            problems.append(f"{name} has shape {list(source.encoder[name].shape)}, this model's is {list(t.shape)}")
    unused = sorted(set(source.encoder) - set(own))
    if unused:
        problems.append(f"{unused[0]} has no place in this model ({len(unused)} such tensors; another depth?)")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"finetune.init: {source.path}: {problems[0]}{more}")
    model.load_from(to_swinvit_format({f"swinViT.{k}": v for k, v in source.encoder.items()}))
    loaded = model.swinViT.state_dict()
    for name, t in source.encoder.items():
        if not torch.equal(loaded[name].cpu(), t.to(loaded[name].dtype)):
            raise RuntimeError(f"{source.path}: {name} differs from its source after SwinUNETR.load_from")
    return len(source.encoder)
