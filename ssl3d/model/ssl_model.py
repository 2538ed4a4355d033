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


def build_decoder(kind: str, dim: int, out_channels: int) -> nn.Module:
    """Reconstruction decoder from the (N, dim, H/32, W/32, D/32) map back to the input size."""
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
        return nn.Sequential(*layers)
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
