"""Reading back what a run logged: the TensorBoard steps each process wrote, the checkpoint a resume started from.

Each process of a run (the first attempt, every resume) writes its own TensorBoard events file in the run folder;
reading the files one by one (not the folder, where TensorBoard merges and purges restarted steps) shows which
steps each process really ran.
"""

from __future__ import annotations

import re
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAG = "train/loss_total"


def steps_per_process(logdir: Path, tag: str = TAG) -> list[list[int]]:
    """The steps logged under ``tag`` by each events file of ``logdir``, oldest file first."""
    runs = []
    for path in Path(logdir).glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0}, purge_orphaned_data=False)
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            events = acc.Scalars(tag)
            runs.append((min(e.wall_time for e in events), [e.step for e in events]))
    return [steps for _, steps in sorted(runs)]


def resumed_from(output: str) -> list[tuple[str, int]]:
    """(checkpoint folder, step) of every ``ssl3d: resumed from ... at step N`` line in a run's output."""
    return [(m[1], int(m[2])) for m in re.finditer(r"ssl3d: resumed from (\S+) at step (\d+)", output)]


def newest_complete_step(logdir: Path) -> int | None:
    """The newest step folder under ``logdir/checkpoints`` marked complete (what ``--resume auto`` must pick)."""
    ckpts = Path(logdir) / "checkpoints"
    steps = [int(p.name[5:]) for p in ckpts.glob("step_*") if (p / "COMPLETE").is_file()]
    return max(steps, default=None)
