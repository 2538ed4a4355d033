"""Exceptions the command line turns into one-line messages; here, without heavy imports, so ``ssl3d --help``
and argument errors do not wait for torch and MONAI."""

from __future__ import annotations


class BadVolumeError(RuntimeError):
    """A volume that cannot be used; the message is one line: ``<path>: <reason>``."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says where to resume."""


class CheckpointWriteError(TrainingStopped):
    """A checkpoint could not be written (e.g. the disk is full); the message names the path, the space needed and
    free, and the checkpoint to resume from."""


class Preempted(RuntimeError):
    """A preemption signal stopped the run after a complete checkpoint; the message names the step and the folder."""
