"""Data parallelism with DistributedDataParallel: every rank holds the whole model and optimizer.

The checkpoint layout is SingleStrategy's (one full ``state.pt`` written by rank 0), so a DDP run resumes on one
process and vice versa; only the loop's per-rank RNG state differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl3d.strategies.single import SingleStrategy


class DDPStrategy(SingleStrategy):
    name = "ddp"

    def wrap(self, module: nn.Module) -> nn.Module:
        # Gradients are averaged over ranks during backward; the caller divides by the accumulation steps.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on all but the last micro-batch of a step (``no_sync``)."""
        if sync:
            yield
        else:
            with self.model.no_sync():
                yield
