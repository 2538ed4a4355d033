"""Memory scaling: activation checkpointing policies, a FakeTensor estimator, a profiler and a planner."""

from ssl3d.memory.activation_checkpointing import (
    CHECKPOINT_KEYS,
    CheckpointPolicy,
    apply_activation_checkpointing,
    checkpointed_modules,
    remove_activation_checkpointing,
)
from ssl3d.memory.estimate import MemoryEstimate, estimate_memory, format_estimate
from ssl3d.memory.plan import format_plan, plan_memory
from ssl3d.memory.profile import format_profile, profile_in_subprocess, profile_memory

__all__ = [
    "CHECKPOINT_KEYS",
    "CheckpointPolicy",
    "MemoryEstimate",
    "apply_activation_checkpointing",
    "checkpointed_modules",
    "estimate_memory",
    "format_estimate",
    "format_plan",
    "format_profile",
    "plan_memory",
    "profile_in_subprocess",
    "profile_memory",
    "remove_activation_checkpointing",
]
