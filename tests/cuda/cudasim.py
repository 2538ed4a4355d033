"""Pieces of CUDA behaviour, simulated on the CPU, for the tests that stand in for a GPU machine.

No GPU is available to this project, yet CUDA differs from the CPU in ways that crash real runs (see
docs/gpus.md). Each piece below reproduces ONE such difference on the CPU, as small as it can be, so a test
can show the failure and its fix. A piece changes torch's behaviour only, never ssl3d's code.

In this process: ``apply("autocast-query")`` (tests use the ``cuda_sim`` fixture, which undoes it afterwards).
In child processes (launchers, ranks): ``sim_env("autocast-query", "nccl-group")`` gives the environment that
makes every Python process started with it apply those pieces at start-up (``tests/cuda/site/sitecustomize.py``).

Pieces:

- ``autocast-query``: ``torch.is_autocast_enabled()`` with no argument reports the CPU's autocast state. On a GPU
  the no-argument query reports CUDA's state, which is the run device's; on the CPU it reports CUDA's too, which is
  never on. DeepSpeed's ``engine.forward`` asks exactly this question.
- ``nccl-group``: a process-group backend with no CPU part, like NCCL. ``init_process_group("nccl")`` gets gloo
  bound to the ``cuda`` device type only, so a collective on a CPU tensor fails as it does under NCCL ("No backend
  type associated with device type cpu"); ``"cuda:nccl,cpu:gloo"`` gets gloo for both. ``torch.cuda.set_device``
  (called before joining an NCCL group) does nothing. The CPU run device's own collectives also need a CPU
  backend, so a whole run shows the difference only through its CPU-side collectives; tests check the group.
- ``gpu-machine``: a machine with one GPU: ``torch.cuda.is_available()`` is True and ``device_count()`` is 1
  (``SSL3D_SIM_GPUS`` changes the count), while every real use of CUDA still fails. A run that asked for the CPU
  must never touch CUDA there.
- ``sm70``: a V100 (compute capability 7.0, 32 GB): ``torch.cuda.is_bf16_supported()`` says True, as torch's
  does there by counting emulation, and False with ``including_emulation=False``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

ENV = "SSL3D_CUDA_SIM"
SITE = Path(__file__).resolve().parent / "site"
V100_TOTAL_MEMORY = 34_089_730_048  # bytes a 32 GB V100 reports (32,510 MiB)
CUDA_GENERATOR_STATE_BYTES = 16  # a CUDA (Philox) generator's state: seed and offset; a CPU one has 5056

_undo: list[Callable[[], None]] = []


def _patch(owner: Any, name: str, value: Any) -> None:
    old = getattr(owner, name)
    setattr(owner, name, value)
    _undo.append(lambda: setattr(owner, name, old))


def _autocast_query() -> None:
    real = torch.is_autocast_enabled

    def is_autocast_enabled(device_type: str | None = None) -> bool:
        return real("cpu" if device_type is None else device_type)

    _patch(torch, "is_autocast_enabled", is_autocast_enabled)


def _nccl_group() -> None:
    real = dist.init_process_group

    def init_process_group(backend: str | None = None, *args: Any, **kwargs: Any) -> Any:
        if backend and "nccl" in backend:
            kwargs.pop("device_id", None)  # the GPU it would bind to does not exist
            if ":" in backend:  # "cuda:nccl,cpu:gloo": each named device type gets gloo
                types = [part.split(":")[0] for part in backend.split(",")]
            else:
                types = ["cuda"]
            backend = ",".join(f"{t}:gloo" for t in types)
        return real(backend, *args, **kwargs)

    _patch(dist, "init_process_group", init_process_group)
    import torch.distributed.distributed_c10d as c10d

    _patch(c10d, "init_process_group", init_process_group)
    _patch(torch.cuda, "set_device", lambda device: None)  # what ssl3d does before joining an NCCL group


def _gpu_machine() -> None:
    count = int(os.environ.get("SSL3D_SIM_GPUS", "1"))
    _patch(torch.cuda, "is_available", lambda: True)
    _patch(torch.cuda, "device_count", lambda: count)


def _sm70() -> None:
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation

    props = SimpleNamespace(name="Tesla V100-SXM2-32GB", major=7, minor=0, total_memory=V100_TOTAL_MEMORY)
    _patch(torch.cuda, "is_bf16_supported", is_bf16_supported)
    _patch(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    _patch(torch.cuda, "get_device_properties", lambda device=None: props)
    _patch(torch.cuda, "get_device_name", lambda device=None: props.name)


PIECES: dict[str, Callable[[], None]] = {
    "autocast-query": _autocast_query,
    "nccl-group": _nccl_group,
    "gpu-machine": _gpu_machine,
    "sm70": _sm70,
}


def apply(*names: str) -> None:
    for name in names:
        if name not in PIECES:
            raise KeyError(f"{ENV}: unknown piece {name!r}; known: {', '.join(PIECES)}")
        PIECES[name]()


def undo() -> None:
    while _undo:
        _undo.pop()()


@contextlib.contextmanager
def simulated(*names: str) -> Iterator[None]:
    apply(*names)
    try:
        yield
    finally:
        undo()


def sim_env(*names: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose Python processes (and their children) start with the pieces ``names`` applied."""
    env = dict(os.environ if base is None else base)
    env[ENV] = ",".join(names)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), env.get("PYTHONPATH", "")) if p)
    return env


def foreign_generator_state() -> torch.Tensor:
    """A random-generator state as a CUDA generator writes it (16 bytes), for a checkpoint made on a GPU."""
    return torch.arange(CUDA_GENERATOR_STATE_BYTES, dtype=torch.uint8)
