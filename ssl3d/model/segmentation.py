"""The downstream networks: MONAI's own ``SwinUNETR`` (the network users fine-tune) and the probe, the same
``SwinTransformer`` frozen with one 1x1x1 convolution per stage output, upsampled to the input and summed. Both keep
the encoder at ``swinViT``. Pure model code: how they are initialised from pre-trained weights is
``ssl3d.downstream.model``'s business, and the memory tools build them on the meta device from here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from torch import nn

from ssl3d.config import ModelConfig
from ssl3d.model.encoder import LegacyPatchMerging, build_encoder

__all__ = ["ProbeModel", "build_segmentation_model"]


def build_segmentation_model(m: ModelConfig, num_classes: int) -> SwinUNETR:
    return SwinUNETR(
        in_channels=m.in_channels,
        out_channels=num_classes,
        patch_size=m.patch_size,
        depths=tuple(m.depths),
        num_heads=tuple(m.num_heads),
        window_size=m.window_size,
        feature_size=m.feature_size,
        dropout_path_rate=m.drop_path_rate,
        use_checkpoint=False,  # checkpointing is applied from outside (ssl3d.memory), as in pre-training
        spatial_dims=3,
        downsample=LegacyPatchMerging if m.legacy_patch_merging else "merging",
    )


class ProbeModel(nn.Module):
    """Frozen encoder + a linear read-out of every stage: what the representation holds, without fine-tuning it."""

    def __init__(self, m: ModelConfig, num_classes: int):
        super().__init__()
        self.swinViT = build_encoder(m.model_copy(update={"use_checkpoint": False}))
        self.swinViT.requires_grad_(False)
        widths = [m.feature_size * 2**i for i in range(5)]  # patch embedding + four stages
        self.heads = nn.ModuleList(nn.Conv3d(w, num_classes, kernel_size=1) for w in widths)

    def train(self, mode: bool = True) -> ProbeModel:
        super().train(mode)
        self.swinViT.eval()  # frozen: no drop-path noise either
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.swinViT(x.contiguous(), normalize=True)  # 5 maps, [N, F * 2^i, roi / 2^(i+1)]
        out = None
        for f, head in zip(feats, self.heads):
            y = F.interpolate(head(f), size=x.shape[2:], mode="trilinear", align_corners=False)
            out = y if out is None else out + y
        return out  # [N, classes, *roi] logits

    load_from = SwinUNETR.load_from  # reads self.swinViT only
