"""A MoCo-style queue of negatives (He et al., 2020): embeddings of earlier views, kept detached, used as extra
negatives in the contrastive loss.

One process with 2 crops a step gives each row of the reference's loss 2 negatives; the head then learns to map
every view to the same point (the loss sits at ln 3) before it learns anything. A queue of the last ``size`` views'
embeddings gives every row ``size`` more negatives at the memory of ``size x E`` floats and no extra forward pass.

What it holds: exactly the rows the loss saw in each micro-batch, both views, L2-normalised, in fp32. Under a
data-parallel strategy with ``"gather_contrastive": true`` those are every rank's rows, so every rank's queue is the
same and every rank still computes the same global loss, the property the gathered loss's gradient relies on
(``Strategy.gather_embeddings``); a run on one process with the global batch sees the very same negatives. Without
the gather each rank queues its own views: no communication, and each rank's loss sees its own past. Either way the
state is per rank (saved with each rank's augmentation stream), never sharded: it is not a parameter.

Unlike MoCo there is no momentum encoder: the queued embeddings come from the model of earlier steps (a memory bank,
Wu et al., 2018). On the benchmark that was not enough (BENCHMARKS.md, the single-device recipe): a queue of 16 steps
of views collapsed the head, one of 2 steps did not beat no queue; it is off by default and in the recipe.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NegativeQueue"]


class NegativeQueue:
    """A ring buffer of the last ``size`` embeddings ``[size, E]``; the buffer is allocated at the first ``enqueue``
    on the embeddings' device, so the embedding width and device need not be known up front."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"negative queue size: got {size}, expected at least 1")
        self.size = size
        self.buffer: Tensor | None = None  # [size, E] fp32, L2-normalised rows
        self.ptr = 0  # the row the next enqueue writes first
        self.filled = 0  # rows holding an embedding (grows to size, then stays)

    def __len__(self) -> int:
        return self.filled

    def nbytes(self, dim: int) -> int:
        """Bytes the queue holds once full at embedding width ``dim`` (fp32)."""
        return self.size * dim * 4

    def negatives(self, device: torch.device | str | None = None) -> Tensor | None:
        """The queued embeddings ``[filled, E]`` (detached), or None while empty; ``device``: where the loss runs
        (a queue restored on the CPU moves there once). Their order does not matter to the loss; it is the
        buffer's, so a resumed run sums in the same order."""
        if self.buffer is None or self.filled == 0:
            return None
        if device is not None and self.buffer.device != torch.device(device):
            self.buffer = self.buffer.to(device)
        return self.buffer[: self.filled]

    @torch.no_grad()
    def enqueue(self, emb: Tensor) -> None:
        """Add the rows of ``emb`` ``[M, E]``, overwriting the oldest; of more than ``size`` rows the last are kept."""
        if emb.dim() != 2:
            raise ValueError(f"expected [M, E] embeddings, got {tuple(emb.shape)}")
        z = F.normalize(emb.detach().float(), dim=1)[-self.size :]  # [m, E], m <= size
        if self.buffer is None:
            self.buffer = torch.zeros(self.size, z.shape[1], dtype=torch.float32, device=z.device)
        elif z.shape[1] != self.buffer.shape[1]:
            raise ValueError(f"embedding width {z.shape[1]} differs from the queue's {self.buffer.shape[1]}")
        elif self.buffer.device != z.device:
            self.buffer = self.buffer.to(z.device)
        m = z.shape[0]
        first = min(m, self.size - self.ptr)  # rows up to the buffer's end, the rest wrap to its start
        self.buffer[self.ptr : self.ptr + first] = z[:first]
        self.buffer[: m - first] = z[first:]
        self.ptr = (self.ptr + m) % self.size
        self.filled = min(self.size, self.filled + m)

    def state_dict(self) -> dict[str, Any]:
        buffer = None if self.buffer is None else self.buffer.detach().cpu().clone()
        return {"size": self.size, "ptr": self.ptr, "filled": self.filled, "buffer": buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved queue (kept on the device it was loaded to; it follows the embeddings at the next
        ``negatives`` or ``enqueue``). A queue of another size is refused: its ring order would differ."""
        if int(state["size"]) != self.size:
            raise ValueError(
                f"ssl.negative_queue: the checkpoint's queue holds {state['size']} embeddings, this run's "
                f"{self.size}; resume with ssl.negative_queue={state['size']}"
            )
        buffer = state["buffer"]
        self.buffer = None if buffer is None else buffer.detach().to(torch.float32).clone()
        self.ptr = int(state["ptr"])
        self.filled = int(state["filled"])
