"""Memory scaling: activation checkpointing policies, a FakeTensor estimator, a profiler and a planner."""

from ssl3d.memory.checkpointing import (
    CHECKPOINT_KEYS,
    CheckpointPolicy,
    apply_activation_checkpointing,
    checkpointed_modules,
    remove_activation_checkpointing,
)

__all__ = [
    "CHECKPOINT_KEYS",
    "CheckpointPolicy",
    "apply_activation_checkpointing",
    "checkpointed_modules",
    "remove_activation_checkpointing",
]
