"""Collapse monitors for pre-training: is the representation still alive, without a downstream run?

A contrastive head that maps every view to the same point has a loss of exactly ln(2N - 1) for 2N views (ln 3 at 4
views) and says nothing more; the rotation head at chance sits at ln 4. These numbers make it visible directly:

- per-dimension standard deviation of the L2-normalised embeddings (VICReg's collapse signal): 0 when every view
  maps to the same vector, about 1/sqrt(E) when they spread over the sphere;
- effective rank (Roy and Vetterli, 2007): exp of the entropy of the normalised singular values of the embedding
  matrix; 1 when all rows are parallel, up to min(rows, E) when they use every direction;
- reconstruction loss on the corrupted voxels alone: the whole-crop L1 is dominated by voxels that were never
  masked (copying the input is enough there), so the inpainting signal shows only on the masked region.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["collapse_monitors", "effective_rank", "embedding_std"]


def embedding_std(emb: Tensor) -> Tensor:
    """Mean over dimensions of the per-dimension std of L2-normalised rows; emb: [N, E], N >= 2."""
    z = F.normalize(emb.detach().float(), dim=1)
    return z.std(dim=0).mean()


def effective_rank(emb: Tensor, eps: float = 1e-12) -> Tensor:
    """exp(entropy of the singular values normalised to sum 1) of the L2-normalised rows; emb: [N, E]."""
    z = F.normalize(emb.detach().float(), dim=1)
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(eps)
    return torch.exp(-(p * torch.log(p.clamp_min(eps))).sum())


def collapse_monitors(embeddings: list[Tensor], masked: Tensor) -> dict[str, float]:
    """TensorBoard scalars of a validation pass: the contrastive embeddings' (``[n_i, E]`` per batch) per-dimension
    std and effective rank, and the reconstruction L1 on the corrupted voxels (``masked``: [L1 sum, voxel count],
    summed over batches and ranks)."""
    out = {"Validation/loss_reconstruction_masked": float(masked[0] / masked[1]) if masked[1] else float("nan")}
    if embeddings and sum(e.shape[0] for e in embeddings) >= 2:
        emb = torch.cat(embeddings)
        out["Validation/collapse_embedding_std"] = float(embedding_std(emb))
        out["Validation/collapse_effective_rank"] = float(effective_rank(emb))
    return out
