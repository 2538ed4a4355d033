"""The training tasks, by name: what ``ssl3d pretrain``, ``ssl3d finetune`` and ``ssl3d probe`` train.

Each task is one object (``ssl3d.tasks.base.Task``) that the one training loop (``ssl3d.trainer.Trainer``) and the
memory tools ask for what differs between tasks; this registry is the only place that maps a name to a task.
"""

from __future__ import annotations

from ssl3d.config import ConfigError
from ssl3d.tasks.base import Task
from ssl3d.tasks.pretrain import PretrainTask
from ssl3d.tasks.segmentation import SegmentationTask

__all__ = ["FINETUNE", "PRETRAIN", "PROBE", "TASKS", "PretrainTask", "SegmentationTask", "Task", "get_task"]

PRETRAIN = PretrainTask()
FINETUNE = SegmentationTask("finetune")
PROBE = SegmentationTask("probe")
TASKS: dict[str, Task] = {t.name: t for t in (PRETRAIN, FINETUNE, PROBE)}


def get_task(name: str | Task) -> Task:
    """The registered task called ``name`` (a task is returned as it is); ConfigError naming the choices."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ConfigError(f'task: got "{name}", expected {", ".join(TASKS)}')
    return TASKS[name]
