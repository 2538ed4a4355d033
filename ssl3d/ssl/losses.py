"""SSL losses of the Swin UNETR pre-training reference: rotation CE, NT-Xent-style contrastive, L1 inpainting.

All terms are computed in fp32 whatever the input dtype, so bf16/fp16 training gets the same loss arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LossWeights", "SSLLoss", "contrastive_loss"]


@dataclass
class LossWeights:
    """Weights of the three terms in the total loss (the reference uses 1.0 each)."""

    rotation: float = 1.0
    contrastive: float = 1.0
    reconstruction: float = 1.0


def contrastive_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5, negatives: Tensor | None = None) -> Tensor:
    """Reference contrastive loss between two views' embeddings z1, z2: [N, E].

    Rows of z = [z1; z2] are L2-normalised; row i's positive is its other view (i +- N); its denominator sums
    exp(sim / T) over every column but itself, the positive included. Mean over the 2N rows of
    -log(exp(pos / T) / denominator), done as logsumexp with a -inf diagonal (stable; only sim is O(N^2)).

    ``negatives`` [K, E] (a ``NegativeQueue``'s earlier views, no gradient) add K columns to every row's
    denominator: InfoNCE with 2N - 1 + K candidates, whose collapsed value is ln(2N - 1 + K). None or K = 0
    computes exactly the reference's loss.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"expected two [N, E] embeddings of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if negatives is not None and (negatives.dim() != 2 or negatives.shape[1] != z1.shape[1]):
        raise ValueError(f"expected negatives [K, {z1.shape[1]}], got {tuple(negatives.shape)}")
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    z = torch.cat([z1, z2])
    logits = (z @ z.T) / temperature
    logits.fill_diagonal_(float("-inf"))
    if negatives is not None and negatives.shape[0]:
        q = F.normalize(negatives.detach().float(), dim=1)
        logits = torch.cat([logits, (z @ q.T) / temperature], dim=1)  # [2N, 2N + K]
    pos = (z1 * z2).sum(1) / temperature  # sim[i, i+N] == sim[i+N, i]
    return (torch.logsumexp(logits, dim=1) - torch.cat([pos, pos])).mean()


class SSLLoss(nn.Module):
    """Weighted sum of rotation CE, contrastive and L1 reconstruction, returning each term for logging."""

    def __init__(self, weights: LossWeights = LossWeights(), temperature: float = 0.5):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.weights = weights
        self.temperature = temperature

    def forward(
        self,
        rot_logits: Tensor,
        rot_labels: Tensor,
        embeddings: Tensor,
        recon: Tensor,
        target: Tensor,
        negatives: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """rot_logits [2N,4], rot_labels [2N], embeddings [2N,E] (view1 rows then view2), recon/target [2N,C,H,W,D];
        ``negatives`` [K,E]: extra contrastive negatives (a negative queue), None for the reference's loss."""
        if embeddings.shape[0] % 2:
            raise ValueError(f"embeddings must stack two views (even row count), got {tuple(embeddings.shape)}")
        if recon.shape != target.shape:
            raise ValueError(f"recon {tuple(recon.shape)} and target {tuple(target.shape)} shapes differ")
        n = embeddings.shape[0] // 2
        rotation = F.cross_entropy(rot_logits.float(), rot_labels.long())
        contrastive = contrastive_loss(embeddings[:n], embeddings[n:], self.temperature, negatives)
        reconstruction = F.l1_loss(recon.float(), target.float())
        w = self.weights
        total = w.rotation * rotation + w.contrastive * contrastive + w.reconstruction * reconstruction
        return {"total": total, "rotation": rotation, "contrastive": contrastive, "reconstruction": reconstruction}
