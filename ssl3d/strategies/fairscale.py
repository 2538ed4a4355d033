"""Legacy: fairscale's OSS (optimizer-state sharding) + ShardedDataParallel, roughly ZeRO-2.

fairscale has been unmaintained since 2022 and its FullyShardedDataParallel needs CUDA; this backend exists so
runs set up with the reference's tooling keep working. New runs should use ``"strategy": "fsdp"`` (FSDP2, in
PyTorch) or DeepSpeed ZeRO (``zero1.json``/``zero2.json``). fairscale is an optional extra
(``pip install ssl3d[fairscale]``) and is imported only when this backend is chosen.

Checkpoints consolidate the sharded optimizer state on rank 0 and use SingleStrategy's ``state.pt`` layout, so
a fairscale run resumes on one process, with DDP, or with fairscale at another world size.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl3d.strategies.base import OptimizerFactory
from ssl3d.strategies.ddp import DDPStrategy
from ssl3d.strategies.single import SingleStrategy


def import_fairscale() -> Any:
    try:
        import fairscale  # noqa: F401
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim import OSS
    except ImportError as exc:
        raise ImportError(
            f'strategy "fairscale": fairscale is not installed ({exc}); pip install "ssl3d[fairscale]", '
            'or use "strategy": "fsdp" / a DeepSpeed ZeRO preset, which need no extra package'
        ) from None
    return OSS, ShardedDataParallel


class FairscaleStrategy(SingleStrategy):
    name = "fairscale"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        oss_cls, sharded_ddp = import_fairscale()
        self.module = model.to(self.device)
        # ssl3d's optimizer tells which torch class and hyper-parameters OSS should shard.
        probe = make_optimizer(self.module.parameters())
        accepted = inspect.signature(type(probe).__init__).parameters
        defaults = {k: v for k, v in probe.defaults.items() if k in accepted and k != "params"}
        groups = [dict(g) for g in probe.param_groups]
        self.optimizer = oss_cls(groups, optim=type(probe), **defaults)
        self.model = sharded_ddp(self.module, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # fp16 is refused for fairscale
        return self.model, self.optimizer

    accumulate = DDPStrategy.accumulate  # ShardedDataParallel has DDP's no_sync

    def clip_and_step(self, max_grad_norm: float | None) -> torch.Tensor:
        # Each rank holds the reduced gradients of its own shard only; OSS sums the shards' norms over ranks.
        norm = self.optimizer.clip_grad_norm(max_grad_norm if max_grad_norm is not None else math.inf)
        if bool(torch.isfinite(norm)):
            self.optimizer.step()  # steps this rank's shard, then broadcasts the updated parameters
        # OSS.zero_grad clears only this rank's shard; the other gradients would leak into the next step.
        self.model.zero_grad(set_to_none=True)
        return norm.detach()

    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        self.optimizer.consolidate_state_dict(recipient_rank=0)  # collective: the full state on rank 0
        super().save(directory, extra)
