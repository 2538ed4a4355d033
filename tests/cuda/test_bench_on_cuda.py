"""The benchmarks' CUDA paths: F7 (inputs drawn by a CUDA generator into CPU tensors) and F9 (the GPU speed check's
"reference" ran in fp32 without cuDNN autotuning, not as the reference trained)."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RANDOM = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "bernoulli"}


def unplaced_draws(path: Path) -> list[str]:
    """``torch.rand(..., generator=g)`` without ``device=``: the tensor lands on the default device (the CPU)
    whatever device ``g`` belongs to, which fails for a CUDA generator ("Expected a 'cpu' device type for generator
    but found 'cuda'")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in RANDOM):
            continue
        keys = {k.arg for k in node.keywords}
        if "generator" in keys and "device" not in keys and not node.func.attr.endswith("_like"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_f7_random_inputs_are_drawn_on_their_generators_device() -> None:
    """Before: bench/model_states.py:371 and :377 drew ``torch.rand(x_shape, generator=gen)`` with
    ``gen = torch.Generator(device=strategy.device)``, so ``--device cuda`` could not run at all."""
    files = sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "ssl3d").rglob("*.py"))
    problems = [hit for f in files for hit in unplaced_draws(f)]
    assert not problems, f"random draws with a generator but no device: {problems}"


@pytest.fixture(scope="module")
def step_module():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module
    spec.loader.exec_module(module)
    return module


def test_f9_the_reference_step_on_a_gpu_runs_as_the_reference_trained(step_module, cuda_sim) -> None:
    """Before: gpu_check ran the reference mode with ``--precision=fp32`` and never set ``cudnn.benchmark``, while
    the reference's main.py trains with fp16 AMP (GradScaler) and ``torch.backends.cudnn.benchmark = True``."""
    cuda_sim("sm70")
    auto = argparse.Namespace(mode="reference", precision="auto", cudnn_benchmark="auto")
    assert step_module.training_settings(auto, torch.device("cuda", 0))[:2] == ("fp16", True)
    assert step_module.training_settings(auto, torch.device("cpu"))[:2] == ("fp32", False)
    ours = argparse.Namespace(mode="ssl3d", precision="auto", cudnn_benchmark="auto")
    precision, benchmark, tf32 = step_module.training_settings(ours, torch.device("cuda", 0))
    assert (precision, benchmark, tf32) == ("fp16", True, True)  # a V100: no native bf16
    gpu_check = (ROOT / "bench" / "gpu_check.py").read_text()
    assert "--precision=fp32" not in gpu_check
