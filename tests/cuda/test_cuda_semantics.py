"""The GPU audit's certain findings, each reproduced by a piece of CUDA behaviour simulated on the CPU
(tests/cuda/cudasim.py): every test here failed on the code before its fix, for the reason its docstring gives."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cudasim
import pytest
import torch
from tiny_run import TINY_RUN

from ssl3d.checkpoint import COMPLETE, checkpoint_problem
from ssl3d.config import Config, ConfigError
from ssl3d.strategies.base import emulated_bf16_warning, native_bf16, resolve_precision
from ssl3d.strategies.ds_config import load_ds_config, resolve_ds_config

ROOT = Path(__file__).resolve().parents[2]
RUN = {
    **TINY_RUN,
    "data.demo_volumes": 4,
    "train.eval_num": 2,
    "train.max_val_batches": 1,
    "train.device": "cpu",
    "optim.warmup_steps": 1,
}
CUDA0 = torch.device("cuda", 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], *pieces: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # DeepSpeed's accelerator is ssl3d's choice here (the suite pins it to the CPU for its own process).
    base = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env = cudasim.sim_env(*pieces, base={**base, "OMP_NUM_THREADS": "1"})
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(ROOT)])
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def flags(logdir: Path, steps: int, **extra: object) -> list[str]:
    settings = {**RUN, "train.num_steps": steps, "train.logdir": str(logdir), **extra}
    return [f"--set={k}={json.dumps(v)}" for k, v in settings.items()]


def logged_losses(logdir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss_total")]


def newest_checkpoint(logdir: Path) -> Path:
    steps = sorted((logdir / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    assert steps, f"no checkpoint under {logdir}"
    return steps[-1]


def assert_trained(logdir: Path, steps: int) -> None:
    losses = logged_losses(logdir)
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses))), losses
    assert checkpoint_problem(newest_checkpoint(logdir)) is None


# -- F1: DeepSpeed's engine switches an outer autocast off --------------------------------------------------------
def test_f1_deepspeed_bf16_forward_under_cuda_autocast_semantics(tmp_path: Path) -> None:
    """Before: ``RuntimeError: Input type (float) and bias type (c10::BFloat16) should be the same`` in the patch
    embedding: with the query reporting the run device, DeepSpeed's ``engine.forward`` ran the bf16 model on the fp32
    crops under ``autocast(enabled=False)``."""
    logdir = tmp_path / "zero2"
    cmd = [sys.executable, "launch/pretrain.py", "--ds_config", "ds_configs/zero2.json", *flags(logdir, 2)]
    ok(run([*cmd, '--set=train.precision="bf16"'], "autocast-query"))
    assert_trained(logdir, 2)


def test_f1_torch_autocast_section_is_accepted_and_reaches_deepspeed() -> None:
    """Before: ``torch_autocast: unknown section``. A preset may choose DeepSpeed's own autocast (fp32 weights)."""
    cfg = Config()
    cfg.train.precision = "bf16"
    raw = {"zero_optimization": {"stage": 2}, "torch_autocast": {"enabled": True}}
    ds = resolve_ds_config(raw, cfg, world_size=2, device_type="cuda", auto_precision="bf16")
    assert ds.torch_autocast and ds.precision == "bf16"
    assert ds.deepspeed["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert ds.deepspeed["bf16"]["enabled"] is False  # fp32 weights: the engine autocasts
    with pytest.raises(ConfigError, match="torch_autocast.dtype"):
        resolve_ds_config({**raw, "torch_autocast": {"enabled": True, "dtype": "fp16"}}, cfg, world_size=2)


def test_f1_torch_autocast_preset_trains_under_cuda_autocast_semantics(tmp_path: Path) -> None:
    """DeepSpeed's ``torch_autocast`` route: fp32 weights, the engine's forward autocast to bf16 (on the CPU
    accelerator DeepSpeed autocasts the ``cpu`` device type)."""
    preset = tmp_path / "zero2_autocast.json"
    preset.write_text(json.dumps({"zero_optimization": {"stage": 2}, "torch_autocast": {"enabled": True}}))
    logdir = tmp_path / "run"
    cmd = [sys.executable, "launch/pretrain.py", "--ds_config", str(preset), *flags(logdir, 2)]
    ok(run([*cmd, '--set=train.precision="bf16"'], "autocast-query"))
    assert_trained(logdir, 2)


# -- F2: NCCL has no CPU backend; FSDP2's offloaded gradient norm is reduced on the CPU ------------------------------
def test_f2_fsdp_offload_group_reduces_cpu_tensors_without_a_cpu_backend_in_nccl() -> None:
    """Before: ``CPU all-reduce failed: RuntimeError: No backend type associated with device type cpu``: ssl3d
    joined an NCCL-only group, in which FSDP2's offload step (``norm.full_tensor()`` on CPU shards) cannot run."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(Path(__file__).with_name("fsdp_offload_group.py")),
    ]
    proc = ok(run(cmd, "nccl-group", timeout=300))
    assert proc.stdout.count("CPU all-reduce: 3") == 2, proc.stdout + proc.stderr[-2000:]


# -- F3: "auto" on a V100 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("strategy", "expected", "note"),
    [("ddp", "fp16", None), ("fsdp", "fp16", None), ("deepspeed", "fp16", None), ("fairscale", "fp32", "fp32")],
)
def test_f3_auto_precision_on_a_v100_is_fp16_with_loss_scaling(cuda_sim, strategy, expected, note) -> None:
    """Before: "auto" resolved to bf16 on compute capability 7.0 (torch's ``is_bf16_supported()`` counts emulation)."""
    cuda_sim("sm70")
    assert not native_bf16(CUDA0)
    auto = {torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_precision("auto", CUDA0)]
    assert auto == "fp16"
    raw = {"strategy": strategy}
    if strategy == "deepspeed":
        raw["zero_optimization"] = {"stage": 2}
    ds = resolve_ds_config(raw, Config(), world_size=2, device_type="cuda", auto_precision=auto)
    assert ds.precision == expected
    assert bool(ds.notes) == bool(note)
    if note:
        assert "fp32" in ds.notes[0] and "no native bf16" in ds.notes[0]


def test_f3_explicit_bf16_on_a_v100_names_the_cost(cuda_sim) -> None:
    cuda_sim("sm70")
    line = emulated_bf16_warning(CUDA0)
    assert "V100" in line and "7.0" in line and "emulated" in line and "fp16" in line
    assert "\n" not in line


# -- F4: a GPU machine, a run on the CPU, DeepSpeed -------------------------------------------------------------
def test_f4_deepspeed_on_a_gpu_machine_honours_train_device_cpu(tmp_path: Path) -> None:
    """Before: DeepSpeed chose its CUDA accelerator because the machine has a GPU (``DS_ACCELERATOR`` was set only
    without CUDA) and failed in its ``set_device`` (here: ``module 'torch._C' has no attribute '_cuda_setDevice'``;
    on a real 1-GPU machine rank 1's "invalid device ordinal", or CPU tensors fed to a model on the GPU)."""
    logdir = tmp_path / "run"
    cmd = [sys.executable, "launch/pretrain.py", "--ds_config", "ds_configs/zero1.json", *flags(logdir, 1)]
    env_proc = run(cmd, "gpu-machine")
    ok(env_proc)
    assert_trained(logdir, 1)


# -- F6: a checkpoint written on another device type ----------------------------------------------------------------
def test_f6_resume_a_checkpoint_whose_generator_state_came_from_a_gpu(tmp_path: Path) -> None:
    """Before: ``RuntimeError: Expected a CPUGeneratorImplState of size 5056 but found the input RNG state size to be
    16`` (CUDA's generator says "RNG state is wrong size" the other way round): the augmentation generator's saved
    state was loaded into a generator of another device type."""
    logdir = tmp_path / "run"
    cmd = [sys.executable, "launch/pretrain.py", *flags(logdir, 2, **{"train.eval_num": 1})]
    ok(run(cmd))
    step = newest_checkpoint(logdir)
    extra_path = step / "extra_rank0.pt"
    extra = torch.load(extra_path, weights_only=True)
    extra["generator"] = cudasim.foreign_generator_state()  # as a CUDA generator writes it
    extra.pop("generator_device", None)  # as checkpoints written before the device type was recorded
    torch.save(extra, extra_path)
    marker = json.loads((step / COMPLETE).read_text())
    from ssl3d.checkpoint import _manifest

    marker["files"] = _manifest(step)
    (step / COMPLETE).write_text(json.dumps(marker))
    proc = ok(run([sys.executable, "launch/pretrain.py", *flags(logdir, 3, **{"train.eval_num": 1}), "--resume=auto"]))
    assert "augmentation stream was saved on the cuda, this run is on the cpu: re-seeded" in proc.stdout
    assert len(logged_losses(logdir)) >= 3


# -- F10: NVMe offload on a GPU builds a CUDA extension ---------------------------------------------------------------
def test_f10_nvme_offload_on_a_gpu_without_a_cuda_toolkit_is_refused_up_front(monkeypatch, tmp_path) -> None:
    """Before: the preset was accepted, and DeepSpeed's async_io JIT build failed on the first step
    (``os.path.join(None, ...)`` for CUDA_HOME) after the model and process group were built."""
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(
        Path, "is_file", lambda self: False if str(self).startswith("/usr/local/cuda") else _is_file(self)
    )
    cfg = Config()
    with pytest.raises(Exception, match="CUDA toolkit") as err:
        load_ds_config(
            ROOT / "ds_configs/zero3_nvme.json", cfg, world_size=1, device_type="cuda", auto_precision="bf16"
        )
    assert "CUDA_HOME" in str(err.value)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    load_ds_config(ROOT / "ds_configs/zero3_nvme.json", cfg, world_size=1, device_type="cuda", auto_precision="bf16")


_is_file = Path.is_file


# -- the acceptance runs: the headline commands on 2 CPU ranks under CUDA's autocast semantics ---------------------
def _deepspeed_launcher() -> str:
    return shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"


HEADLINE = {
    "deepspeed-zero2-bf16": ("deepspeed", "ds_configs/zero2.json", "pretrain"),
    "deepspeed-zero3-bf16": ("deepspeed", "ds_configs/zero3.json", "pretrain"),
    "finetune-zero2-bf16": ("torchrun", "ds_configs/zero2.json", "finetune"),
    "fsdp-offload-bf16": ("torchrun", "ds_configs/fsdp_offload.json", "pretrain"),
}


@pytest.mark.parametrize("name", list(HEADLINE))
def test_headline_commands_on_two_ranks_under_cuda_semantics(tmp_path: Path, name: str) -> None:
    """The issue's acceptance: finite losses and a checkpoint that verifies, with the autocast query reporting the
    run device and NCCL-like groups (on the CPU the run device's collectives themselves go through gloo)."""
    launcher, preset, task = HEADLINE[name]
    logdir = tmp_path / name
    steps = 2
    if launcher == "deepspeed":
        head = [_deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py"]
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
        head += ["launch/pretrain.py"] if task == "pretrain" else ["-m", "ssl3d.cli", "finetune"]
    extra: dict[str, object] = {"train.precision": "bf16"}
    if task == "finetune":
        extra.update({"finetune.labelled": 4, "train.eval_num": steps, "data.demo_volumes": 6})
    ok(run([*head, "--ds_config", preset, *flags(logdir, steps, **extra)], "autocast-query", "nccl-group"))
    if task == "finetune":
        assert (logdir / "model_final.pt").is_file()
        assert checkpoint_problem(newest_checkpoint(logdir)) is None
        return
    assert_trained(logdir, steps)


def test_the_simulation_is_what_it_says(cuda_sim) -> None:
    """The autocast piece makes the no-argument query report the CPU's autocast, as CUDA's does for a GPU run."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.is_autocast_enabled()  # the CPU build: the query reports CUDA, never on
        cuda_sim("autocast-query")
        assert torch.is_autocast_enabled()
