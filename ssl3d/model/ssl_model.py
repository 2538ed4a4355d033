"""The SSL model: the encoder plus the reference's three pretext heads.

Attribute names (``swinViT``, ``rotation_head``, ``contrastive_head``, ``conv``) match the reference's
``SSLHead`` so its checkpoints load without renaming.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ssl3d.config import ModelConfig
from ssl3d.model.encoder import build_encoder


class SSLOutput(NamedTuple):
    rotation: torch.Tensor  # [N, 4] logits
    contrastive: torch.Tensor  # [N, E] embeddings
    reconstruction: torch.Tensor  # [N, C, H, W, D]


class ReorderedSequential(nn.Sequential):
    """A Sequential whose modules run in ``order`` (indices), so the execution order can differ from the
    registration order while parameter names (``conv.20.weight``) stay those of the reference's checkpoints."""

    def __init__(self, *modules: nn.Module, order: tuple[int, ...] | None = None):
        super().__init__(*modules)
        self.order = tuple(range(len(self))) if order is None else tuple(order)
        if sorted(self.order) != list(range(len(self))):
            raise ValueError(f"order: got {self.order}, expected a permutation of 0..{len(self) - 1}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in self.order:
            x = self[i](x)
        return x


def execution_order(seq: nn.Sequential) -> tuple[int, ...]:
    """The order a Sequential's modules run in (``ReorderedSequential.order``, else registration order)."""
    order = seq.__dict__.get("order")
    return tuple(order) if order is not None else tuple(range(len(seq)))


def build_decoder(kind: str, dim: int, out_channels: int, output_conv_first: bool = True) -> nn.Module:
    """Reconstruction decoder from the (N, dim, H/32, W/32, D/32) map back to the input size.

    "vae" (the reference's default) ends with Upsample(x2, trilinear) -> Conv1x1x1(dim/16 -> out_channels). Both are
    linear and the trilinear weights of each output voxel sum to 1 (so the bias passes through unchanged), hence they
    commute; ``output_conv_first`` runs the 1x1x1 conv before the last upsampling, so the full-resolution tensors
    have ``out_channels`` channels instead of dim/16 (48x less memory there at the reference's size). Same outputs
    and gradients within float rounding; same modules at the same indices, so checkpoints load either way."""
    if kind == "large_kernel_deconv":
        return nn.ConvTranspose3d(dim, out_channels, kernel_size=32, stride=32)
    if kind == "deconv":
        chans = [dim, dim // 2, dim // 4, dim // 8, dim // 16, out_channels]
        return nn.Sequential(*[nn.ConvTranspose3d(a, b, kernel_size=2, stride=2) for a, b in zip(chans, chans[1:])])
    if kind == "vae":
        chans = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
        layers: list[nn.Module] = []
        for a, b in zip(chans, chans[1:]):
            layers += [
                nn.Conv3d(a, b, kernel_size=3, stride=1, padding=1),
                nn.InstanceNorm3d(b),
                nn.LeakyReLU(),
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            ]
        layers.append(nn.Conv3d(chans[-1], out_channels, kernel_size=1, stride=1))
        order = list(range(len(layers)))
        if output_conv_first:  # [..., Upsample, Conv1x1] runs as [..., Conv1x1, Upsample]
            order[-2:] = order[-1], order[-2]
        return ReorderedSequential(*layers, order=tuple(order))
    raise ValueError(f"model.decoder: got {kind!r}, expected 'vae', 'deconv' or 'large_kernel_deconv'")


class SSLModel(nn.Module):
    """Swin encoder with rotation (token 0), contrastive (token 1) and reconstruction heads."""

    def __init__(self, cfg: ModelConfig, contrastive_dim: int = 512):
        super().__init__()
        dim = cfg.feature_size * 16  # width of the last stage (768 at the reference's 48)
        self.swinViT = build_encoder(cfg)
        self.rotation_head = nn.Linear(dim, 4)
        self.contrastive_head = nn.Linear(dim, contrastive_dim)
        self.conv = build_decoder(cfg.decoder, dim, cfg.in_channels)

    def forward(self, x: torch.Tensor) -> SSLOutput:
        feat = self.swinViT(x.contiguous())[4]  # [N, dim, H/32, W/32, D/32], layer-normed
        tokens = feat.flatten(2).transpose(1, 2)  # [N, tokens, dim]
        return SSLOutput(
            rotation=self.rotation_head(tokens[:, 0]),
            contrastive=self.contrastive_head(tokens[:, 1]),
            reconstruction=self.conv(feat),
        )


def build_model(cfg: ModelConfig, contrastive_dim: int = 512) -> SSLModel:
    return SSLModel(cfg, contrastive_dim)
