"""The Swin UNETR encoder: MONAI's ``SwinTransformer`` with the reference's hyper-parameters.

One addition: ``LegacyPatchMerging`` reproduces the 3D patch-merging order of MONAI before 1.5, which the
released ``model_swinvit.pt`` weights were trained with (MONAI PR #8285 fixed the order; with the fixed order
those weights compute a different network).
"""

from __future__ import annotations

import torch
from monai.networks.nets.swin_unetr import PatchMerging, SwinTransformer
from torch import nn

from ssl3d.config import ModelConfig


class LegacyPatchMerging(PatchMerging):
    """Patch merging with the sub-grid order of MONAI < 1.5: offsets (1,0,1), (0,1,0), (0,0,1) appear twice
    and (1,1,0), (1,0,1), (0,1,1) are missing. Same parameters as ``PatchMerging``, so weights load unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = nn.functional.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        parts = [
            x[:, 0::2, 0::2, 0::2, :],
            x[:, 1::2, 0::2, 0::2, :],
            x[:, 0::2, 1::2, 0::2, :],
            x[:, 0::2, 0::2, 1::2, :],
            x[:, 1::2, 0::2, 1::2, :],
            x[:, 0::2, 1::2, 0::2, :],
            x[:, 0::2, 0::2, 1::2, :],
            x[:, 1::2, 1::2, 1::2, :],
        ]
        return self.reduction(self.norm(torch.cat(parts, -1)))


def build_encoder(cfg: ModelConfig) -> SwinTransformer:
    """The encoder exactly as the reference builds it (attribute ``swinViT`` of the SSL model)."""
    return SwinTransformer(
        in_chans=cfg.in_channels,
        embed_dim=cfg.feature_size,
        window_size=(cfg.window_size,) * 3,
        patch_size=(cfg.patch_size,) * 3,
        depths=list(cfg.depths),
        num_heads=list(cfg.num_heads),
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=cfg.drop_path_rate,
        norm_layer=nn.LayerNorm,
        use_checkpoint=cfg.use_checkpoint,
        spatial_dims=3,
        downsample=LegacyPatchMerging if cfg.legacy_patch_merging else "merging",
    )
