"""Contrastive gradient caching (Gao et al., 2021): the SSL step in chunks of views, with whole-batch gradients.

The contrastive term couples every view of a step, which would keep every view's activations alive at once.
Instead: (1) embed all views without a graph, chunk by chunk; (2) compute the contrastive loss on those
embeddings and its gradient with respect to them (the "cache"); (3) for each chunk, recompute the forward with a
graph and back-propagate its share of the rotation and reconstruction losses plus ``<embedding, cached grad>``,
whose gradient is exactly the contrastive term's gradient through that chunk. Peak activation memory is that of
one chunk; the summed gradients equal those of the one-pass step up to float summation order. The price is one
extra forward pass without a graph. The model must be deterministic in training mode (the Swin encoder and the
heads are: no dropout, no batch statistics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl3d.ssl.augment import SSLViews
from ssl3d.ssl.losses import SSLLoss, contrastive_loss
from ssl3d.ssl.queue import NegativeQueue

__all__ = ["chunk_slices", "grad_cached_backward"]


def chunk_slices(rows: int, chunk: int) -> list[slice]:
    """Consecutive slices of at most ``chunk`` rows covering ``rows``."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    return [slice(i, min(i + chunk, rows)) for i in range(0, rows, chunk)]


def _identity(t: Tensor) -> Tensor:
    return t


def grad_cached_backward(
    model: Callable[[Tensor], Any],
    views: SSLViews,
    loss_fn: SSLLoss,
    chunk: int,
    backward: Callable[[Tensor, bool], None],
    *,
    context: Callable[[bool], contextlib.AbstractContextManager] = lambda last: contextlib.nullcontext(),
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    gather: Callable[[Tensor], Tensor] = _identity,
    queue: NegativeQueue | None = None,
) -> dict[str, Tensor]:
    """One micro-batch's forward and backward in chunks of ``chunk`` views; returns the detached losses.

    ``backward(loss, last)`` back-propagates one chunk's share of the loss (``last``: the micro-batch's final
    chunk, where a data-parallel backend may reduce gradients); each chunk's forward and backward run inside
    ``context(last)`` (e.g. DDP's ``no_sync`` on all but the last). ``gather`` is the strategy's cross-rank
    embedding gather, so the cached gradient is that of the global contrastive loss when it gathers. ``queue``: its
    embeddings are extra negatives, and the (gathered) rows of this micro-batch join it once the loss is computed.
    The returned losses equal ``loss_fn`` on the whole micro-batch (with the queue's negatives).
    """
    rows = views.corrupted.shape[0]  # both views stacked: [2N, C, H, W, D]
    slices = chunk_slices(rows, chunk)
    # (1) Embeddings of every view, no graph kept.
    with torch.no_grad(), autocast():
        emb = torch.cat([model(views.corrupted[s]).contrastive.float() for s in slices])  # [2N, E]
    # (2) The contrastive loss and its gradient with respect to the embeddings.
    leaf = emb.detach().requires_grad_()
    half = rows // 2
    z = torch.cat([gather(leaf[:half]), gather(leaf[half:])])
    negatives = queue.negatives(z.device) if queue is not None else None  # [K, E]
    contrastive = contrastive_loss(z[: len(z) // 2], z[len(z) // 2 :], loss_fn.temperature, negatives)
    (cached,) = torch.autograd.grad(contrastive, leaf)  # [2N, E]
    if queue is not None:
        queue.enqueue(z.detach())
    del emb, leaf, z
    # (3) Per chunk: recompute with a graph; rotation CE and L1 are per-row means, so a chunk's share is its
    # mean times its fraction of the rows.
    w = loss_fn.weights
    rotation = torch.zeros((), device=views.views.device)
    reconstruction = torch.zeros((), device=views.views.device)
    for i, s in enumerate(slices):
        last = i == len(slices) - 1
        frac = (s.stop - s.start) / rows
        with context(last):
            with autocast():
                out = model(views.corrupted[s])
            rot = F.cross_entropy(out.rotation.float(), views.rot_labels[s].long()) * frac
            rec = F.l1_loss(out.reconstruction.float(), views.views[s].float()) * frac
            surrogate = (out.contrastive.float() * cached[s]).sum()
            backward(w.rotation * rot + w.reconstruction * rec + w.contrastive * surrogate, last)
        rotation = rotation + rot.detach()
        reconstruction = reconstruction + rec.detach()
        del out, rot, rec, surrogate
    contrastive = contrastive.detach()
    total = w.rotation * rotation + w.contrastive * contrastive + w.reconstruction * reconstruction
    return {"total": total, "rotation": rotation, "contrastive": contrastive, "reconstruction": reconstruction}
