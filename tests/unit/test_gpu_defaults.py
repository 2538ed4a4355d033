"""What a GPU user expects by default, checked where the CPU can check it: the collective timeout, the speed
switches (set only for a CUDA device), loader workers divided by the deepspeed launcher's ranks, fp16 overflows as
DeepSpeed's scaler reports them, out-of-memory errors under cuDNN's names, and FSDP2's fp16 loss scaler."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ssl3d.config import DataConfig
from ssl3d.data.datasets import num_workers
from ssl3d.errors import is_out_of_memory
from ssl3d.strategies.base import configure_cuda
from ssl3d.strategies.precision import LossScaleWatch

ROOT = Path(__file__).resolve().parents[2]


def python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_collective_timeout_reaches_the_process_group() -> None:
    out = python(
        """
        import torch, torch.distributed as dist
        from ssl3d.config import Config
        from ssl3d.strategies import strategy_from_ds_config
        from ssl3d.strategies.ds_config import resolve_ds_config
        cfg = Config()
        cfg.train.collective_timeout_minutes = 45
        ds = resolve_ds_config({"strategy": "ddp"}, cfg, world_size=1)
        strategy_from_ds_config(ds, torch.device("cpu"), cfg.train)
        print(dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout)
        dist.destroy_process_group()  # gloo's threads left running at exit can abort the interpreter
        """
    )
    assert out.strip() == "0:45:00"


@pytest.fixture
def cuda_flags():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_speed_switches_only_for_a_cuda_device(cuda_flags) -> None:
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    configure_cuda(torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
    configure_cuda(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    configure_cuda(torch.device("cuda", 0), cudnn_benchmark=False, allow_tf32=False)
    assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("variable", ["LOCAL_WORLD_SIZE", "LOCAL_SIZE"])
def test_loader_workers_are_shared_by_the_node_ranks(monkeypatch, variable: str) -> None:
    """torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE: either divides the node's CPUs."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert num_workers(DataConfig(num_workers=64)) == 16
    monkeypatch.setenv(variable, "8")
    assert num_workers(DataConfig(num_workers=64)) == 2


def test_an_overflow_deepspeed_skips_without_lowering_the_scale_is_an_overflow() -> None:
    """DeepSpeed's hysteresis (2) keeps the scale on the first overflow and reports an infinite norm."""
    watch = LossScaleWatch()
    result = watch.result(float("inf"), 65536.0, 65536.0)
    assert result.overflow and result.stop is None
    assert not watch.result(float("inf"), None, None).overflow  # bf16/fp32: a bad step, for the loop to count
    assert not watch.result(1.0, 65536.0, 65536.0).overflow


def test_out_of_memory_under_other_names() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"))
    assert is_out_of_memory(
        RuntimeError("NCCL error: unhandled cuda error, NCCL version 2.21: Cuda failure 'out of memory'")
    )
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.slow
def test_fsdp2_scales_an_fp16_loss_and_skips_an_overflow() -> None:
    """What "auto" means for FSDP2 on a V100: fp16 with torch's sharded gradient scaler (fp16 on the CPU here)."""
    out = python(
        """
        import torch
        from ssl3d.strategies.distributed import init_distributed
        from ssl3d.strategies.fsdp import FSDPStrategy
        from ssl3d.config import ModelConfig
        from ssl3d.model.ssl_model import build_model
        init_distributed("gloo")
        torch.manual_seed(0)
        model = build_model(ModelConfig(feature_size=12, depths=(1, 1, 1, 1), window_size=4, decoder="deconv"), 32)
        s = FSDPStrategy(torch.device("cpu"), torch.float16)
        model, _ = s.setup(model, lambda p: torch.optim.AdamW(p, lr=1e-3))
        x = torch.rand(2, 1, 64, 64, 32)
        def step(factor):
            out = model(x)
            loss = (out.reconstruction.float().mean() + out.contrastive.float().pow(2).mean()) * factor
            s.backward(loss)
            return s.step(None)
        def weights():
            return next(model.parameters()).full_tensor().clone()
        scales = [s.loss_scale()]
        for _ in range(12):  # the scaler settles: each overflow halves the scale and leaves the weights
            before = weights()
            r = step(1.0)
            scales.append(s.loss_scale())
            if not r.overflow:
                break
            assert torch.equal(before, weights())
        print("ok", r.overflow, r.grad_norm > 0, not torch.equal(before, weights()), scales[-1] == scales[-2])
        print("halved", all(b == a / 2 for a, b in zip(scales[:-2], scales[1:-1])))
        before = weights()
        bad = step(float("inf"))
        print("bad", bad.overflow, s.loss_scale() == scales[-1] / 2, torch.equal(before, weights()), flush=True)
        torch.distributed.destroy_process_group()  # gloo's threads left running at exit can abort the interpreter
        """
    )
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["ok"] == "False True True True"
    assert lines["halved"] == "True"
    assert lines["bad"] == "True True True"
