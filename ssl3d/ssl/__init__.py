"""Self-supervised tasks: view generation (rotation, cuboid inpainting corruption) and the SSL losses."""

from ssl3d.ssl.augment import (
    MaskingParams,
    MaskingResult,
    SSLViews,
    make_views,
    mask_cuboids,
    mask_cuboids_detailed,
    rotate_random,
)
from ssl3d.ssl.losses import LossWeights, SSLLoss, contrastive_loss
from ssl3d.ssl.queue import NegativeQueue

__all__ = [
    "LossWeights",
    "MaskingParams",
    "MaskingResult",
    "NegativeQueue",
    "SSLLoss",
    "SSLViews",
    "contrastive_loss",
    "make_views",
    "mask_cuboids",
    "mask_cuboids_detailed",
    "rotate_random",
]
