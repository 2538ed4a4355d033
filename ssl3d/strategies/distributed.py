"""Process-group set-up from the environment that torchrun and the deepspeed launcher both provide.

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (the deepspeed launcher also
passes ``--local_rank``, which the CLI accepts and ignores). A plain ``python`` run has none of them: it is one
process, and a group of one is created only when a backend needs one (FSDP2 and DeepSpeed always do).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int


def dist_env() -> DistEnv:
    """This process's place in the job, read from the launcher's variables (one process when unset)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def free_port() -> int:
    """A TCP port nobody listens on right now (for single-process groups and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: torch.device | str) -> str:
    """The collective backend torch pairs with a device type: nccl for CUDA, gloo on the CPU."""
    return dist.Backend.default_device_backend_map[torch.device(device).type]


def group_backend(device: torch.device | str, cpu_collectives: bool = False) -> str:
    """The process group's backend for a run on ``device``; ``cpu_collectives``: the run also reduces CPU tensors.

    NCCL has no CPU part: a collective on a CPU tensor in an NCCL-only group fails ("No backend type associated
    with device type cpu"). FSDP2 with CPU offload keeps its gradient shards on the CPU and all-reduces their norm
    there, so such a run gets gloo for CPU tensors beside NCCL for the GPU's (``"cuda:nccl,cpu:gloo"``).
    """
    backend = backend_for(device)
    if backend == "nccl" and cpu_collectives:
        return "cuda:nccl,cpu:gloo"
    return backend


def init_distributed(backend: str | None = None, timeout_minutes: float | None = None) -> DistEnv:
    """Join the process group described by the environment; a no-op when it already exists.

    Without launcher variables a group of one process is created on a free local port, so FSDP2 and DeepSpeed
    (which always need a group) also run under plain ``python``. ``timeout_minutes``: how long a collective may
    wait for a lagging rank (``train.collective_timeout_minutes``); torch's default is 10 minutes for NCCL, less
    than a rank may spend filling its data cache before the first collective. An NCCL group is bound to this
    rank's GPU (``device_id``), so its barriers know the device and it connects at once.
    """
    env = dist_env()
    if dist.is_initialized():
        return env
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"distributed run (WORLD_SIZE={env.world_size}) without {', '.join(missing)}: "
            "start it with torchrun or the deepspeed launcher, which set them"
        )
    backend = backend or backend_for("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict = {}
    if timeout_minutes is not None:
        kwargs["timeout"] = datetime.timedelta(minutes=timeout_minutes)
    if "nccl" in backend:
        torch.cuda.set_device(env.local_rank)
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    dist.init_process_group(
        backend=backend, rank=env.rank, world_size=env.world_size, store=_attempt_store(env), **kwargs
    )
    return env


def _attempt_store(env: DistEnv) -> dist.Store | None:
    """Under torchrun, the agent's store with keys of this attempt only; None (``env://``) elsewhere.

    torchrun's default rendezvous (``--master-port``, static) keeps ONE store for all attempts of a job, and
    ``env://`` writes every attempt's keys under the same names: after a ``--max-restarts`` restart the new
    workers read the dead attempt's gloo/NCCL addresses and fail to connect ("Connection refused"). Prefixing the
    keys with the attempt number (``TORCHELASTIC_RESTART_COUNT``) gives each attempt its own.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        env.world_size,
        is_master=False,
        timeout=default_pg_timeout,
    )
    return dist.PrefixStore(f"ssl3d/attempt_{attempt}/default_pg", store)


def is_distributed() -> bool:
    """Whether a process group exists (collectives are no-ops without one)."""
    return dist.is_available() and dist.is_initialized()
