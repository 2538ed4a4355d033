"""The SSL pre-training task for ``ssl3d.step.run_step``: two corrupted, rotated views, one batched forward pass,
rotation + contrastive + reconstruction losses; optionally in chunks with contrastive gradient caching."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ssl3d.ssl.augment import MaskingParams, SSLViews, make_views
from ssl3d.ssl.grad_cache import grad_cached_backward
from ssl3d.ssl.losses import SSLLoss
from ssl3d.ssl.queue import NegativeQueue

__all__ = ["LOSS_KEYS", "SSLTask"]

LOSS_KEYS = ("total", "rotation", "contrastive", "reconstruction")


def _identity(t: Tensor) -> Tensor:
    return t


def _no_phase(name: str) -> None:
    pass


class SSLTask:
    """Turns a micro-batch of crops ``[N, C, H, W, D]`` (or ready-made ``SSLViews``) into losses and gradients.

    ``generator`` draws the views' rotations and masks (the trainer's per-rank stream, saved in checkpoints);
    ``grad_cache_chunk`` > 0 runs that many views per forward/backward with the whole micro-batch's gradients;
    ``two_passes`` runs one forward per view as the reference did (for benchmarks); ``negative_queue`` > 0 keeps
    that many embeddings of earlier views as extra contrastive negatives (``ssl3d.ssl.queue``), 0 the reference's
    loss. The queue is state a resumed run needs: ``state_dict()`` / ``load_state_dict()``, per rank."""

    loss_keys = LOSS_KEYS

    def __init__(
        self,
        loss_fn: SSLLoss,
        masking: MaskingParams | None = None,
        generator: torch.Generator | None = None,
        *,
        grad_cache_chunk: int = 0,
        two_passes: bool = False,
        negative_queue: int = 0,
    ):
        if negative_queue < 0:
            raise ValueError(f"negative_queue: got {negative_queue}, expected 0 (off) or the queued embeddings")
        self.loss_fn = loss_fn
        self.masking = masking or MaskingParams()
        self.generator = generator
        self.grad_cache_chunk = grad_cache_chunk
        self.two_passes = two_passes
        self.queue = NegativeQueue(negative_queue) if negative_queue else None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the model, the optimizer and the generator: the negative queue (this
        rank's; ``{}`` without one). Tensors are on the CPU."""
        return {"negative_queue": self.queue.state_dict()} if self.queue is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; a checkpoint with a queue into a run without one (or the reverse) is
        refused, since the losses would not continue where they stopped."""
        saved = state.get("negative_queue")
        if (saved is None) != (self.queue is None):
            have = self.queue.size if self.queue is not None else 0
            want = saved["size"] if saved is not None else 0
            raise ValueError(
                f"ssl.negative_queue: the checkpoint was written with {want}, this run has {have}; "
                f"resume with ssl.negative_queue={want}"
            )
        if self.queue is not None and saved is not None:
            self.queue.load_state_dict(saved)

    def state_tensors(self) -> list[Tensor]:
        """The tensors this task keeps from step to step (the queue's buffer, once allocated): the memory tools
        count them as per-rank state."""
        return [self.queue.buffer] if self.queue is not None and self.queue.buffer is not None else []

    def views(self, batch: Tensor | SSLViews) -> SSLViews:
        if isinstance(batch, SSLViews):
            return batch
        return make_views(batch, self.generator, self.masking)  # both views stacked: [2N, C, H, W, D]

    def losses(self, model: nn.Module, views: SSLViews, backend: Any) -> dict[str, Tensor]:
        """Forward and losses; the model's outputs are released on return, before any backward. With a negative
        queue, the loss uses its embeddings and this micro-batch's (gathered) rows join it afterwards."""
        with backend.autocast():
            x = views.corrupted
            if self.two_passes:
                half = x.shape[0] // 2
                o1, o2 = model(x[:half]), model(x[half:])
                rot = torch.cat([o1.rotation, o2.rotation])
                emb = torch.cat([o1.contrastive, o2.contrastive])
                rec = torch.cat([o1.reconstruction, o2.reconstruction])
                del o1, o2
            else:
                out = model(x)
                rot, emb, rec = out.rotation, out.contrastive, out.reconstruction
                del out
        # With "gather_contrastive" in the preset, negatives come from every rank's batch (a no-op otherwise).
        emb = emb.float()
        n = emb.shape[0] // 2
        emb = torch.cat([backend.gather_embeddings(emb[:n]), backend.gather_embeddings(emb[n:])])
        if self.queue is None:
            return self.loss_fn(rot.float(), views.rot_labels, emb, rec.float(), views.views)
        negatives = self.queue.negatives(emb.device)
        losses = self.loss_fn(rot.float(), views.rot_labels, emb, rec.float(), views.views, negatives)
        self.queue.enqueue(emb.detach())
        return losses

    def forward_backward(
        self,
        model: nn.Module,
        batch: Tensor | SSLViews,
        backend: Any,
        *,
        sync: bool,
        loss_hook: Callable[[Tensor], Tensor] = _identity,
        phase: Callable[[str], None] = _no_phase,
    ) -> dict[str, Tensor]:
        if self.grad_cache_chunk:
            return self._cached(model, self.views(batch), backend, sync, loss_hook, phase)
        with backend.accumulate(sync):
            views = self.views(batch)
            phase("forward")
            losses = {k: loss_hook(v) for k, v in self.losses(model, views, backend).items()}
            phase("backward")
            backend.backward(losses["total"])
        return {k: v.detach() for k, v in losses.items()}

    def _cached(
        self,
        model: nn.Module,
        views: SSLViews,
        backend: Any,
        sync: bool,
        loss_hook: Callable[[Tensor], Tensor],
        phase: Callable[[str], None],
    ) -> dict[str, Tensor]:
        """Gradient caching; only the micro-batch's last chunk may reduce gradients across ranks (``sync``)."""

        def backward(loss: Tensor, last: bool) -> None:
            phase("backward")
            backend.backward(loss_hook(loss))
            phase("forward")

        phase("forward")
        losses = grad_cached_backward(
            model,
            views,
            self.loss_fn,
            self.grad_cache_chunk,
            backward,
            context=lambda last: backend.accumulate(sync and last),
            autocast=backend.autocast,
            gather=backend.gather_embeddings,
            queue=self.queue,
        )
        return {k: loss_hook(v) for k, v in losses.items()}
