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


# How device memory running out reads when it is not torch's own OutOfMemoryError: cuDNN's and cuBLAS's workspace
# allocations and NCCL's buffers fail with a RuntimeError (or DistBackendError) whose text says so.
OUT_OF_MEMORY_MARKERS = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means the device ran out of memory, under any of the names CUDA's libraries give it."""
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(m.lower() in text.lower() for m in OUT_OF_MEMORY_MARKERS)
