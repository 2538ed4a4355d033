"""The memory estimator and planner on the downstream steps: SwinUNETR fine-tuning and the frozen-encoder probe.

The fake trace is checked against the real networks (parameter bytes exactly; the same step on real tensors under
the same storage counter to 2 %), and the policies against what they must change (checkpointing SwinUNETR lowers
saved activations; nothing changes the probe, whose encoder is frozen).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ssl3d.cli import main
from ssl3d.config import ConfigError, ModelConfig, OptimConfig
from ssl3d.memory.activation_checkpointing import apply_activation_checkpointing
from ssl3d.memory.estimate import (
    CATEGORIES,
    StorageTracker,
    estimate_memory,
    make_step_inputs,
    trace_step,
    training_step,
)
from ssl3d.memory.plan import DEFAULT_LADDER, fit_memory, format_plan, plan_memory, task_ladder
from ssl3d.model.attention import apply_fused_attention
from ssl3d.optim import build_optimizer
from ssl3d.step import StepSettings
from ssl3d.tasks import FINETUNE, PROBE, get_task

TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24), window_size=4)
ROI = (32, 64, 64)
CLASSES = 5


def _trace(task: str, policy: str = "none"):
    return trace_step(TINY, ROI, 1, 1, policy=policy, device="cpu", task=get_task(task), num_classes=CLASSES)


def _setup_bytes(trace, category: str) -> int:
    return int(trace.column(category)[0])  # the first event: before the step's first operator


def _real(task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_task(task).build_model(TINY, num_classes=CLASSES)


@pytest.mark.slow
def test_finetune_trace_is_swinunetrs_step() -> None:
    trace = _trace("finetune")
    real = _real("finetune")
    assert type(real).__name__ == "SwinUNETR"
    param_bytes = sum(p.numel() * p.element_size() for p in real.parameters())
    assert _setup_bytes(trace, "parameters") == param_bytes
    assert trace.units["total"] == trace.units["trainable"] == sum(p.numel() for p in real.parameters())
    # AdamW keeps two moments per parameter (plus a scalar step each): at least twice the parameters' bytes.
    assert (
        2 * param_bytes <= _setup_bytes(trace, "optimizer_states") <= 2 * param_bytes + 8 * len(list(real.parameters()))
    )
    assert int(trace.column("gradients").max()) == param_bytes  # every SwinUNETR parameter trains
    # Image and label crops, float32 as the labelled loader delivers them.
    assert _setup_bytes(trace, "inputs") == 2 * 4 * ROI[0] * ROI[1] * ROI[2]


@pytest.mark.slow
def test_checkpointing_swinunetr_lowers_saved_activations() -> None:
    saved = {p: int(_trace("finetune", p).column("activations").max()) for p in ("none", "full")}
    decoder = int(_trace("finetune", dict(DEFAULT_LADDER)["decoder"]).column("activations").max())
    assert saved["full"] < 0.5 * saved["none"], saved
    # The "decoder" rung is SwinUNETR's convolutional encoder/decoder blocks here: it acts on its own.
    assert saved["full"] < decoder < saved["none"], (saved, decoder)


def test_probe_has_no_encoder_gradients_or_optimizer_states() -> None:
    trace = _trace("probe")
    real = _real("probe")
    heads = [p for p in real.parameters() if p.requires_grad]
    head_bytes = sum(p.numel() * p.element_size() for p in heads)
    all_bytes = sum(p.numel() * p.element_size() for p in real.parameters())
    assert 0 < head_bytes < 0.1 * all_bytes
    assert _setup_bytes(trace, "parameters") == all_bytes  # the frozen encoder still takes its memory
    assert int(trace.column("gradients").max()) == head_bytes
    assert 2 * head_bytes <= _setup_bytes(trace, "optimizer_states") <= 2 * head_bytes + 8 * len(heads)
    assert trace.units["trainable"] == sum(p.numel() for p in heads)
    # DDP's gradient buckets hold the trained parameters only.
    ddp = estimate_memory(TINY, ROI, 1, 1, policy="none", device="cpu", task=PROBE, num_classes=CLASSES,
                          strategy="ddp", world_size=2)  # fmt: skip
    assert ddp.breakdown["gradients"] == pytest.approx(head_bytes, abs=1)
    # The encoder runs under no_grad: no policy changes anything, and the ladder is one rung.
    full = _trace("probe", "full")
    assert (full.events[:, 1:].max(0) == trace.events[:, 1:].max(0)).all()
    step = StepSettings(TINY, ROI, task=PROBE, num_classes=CLASSES)
    assert [n for n, _ in task_ladder(DEFAULT_LADDER, step)] == ["none"]
    finetune = StepSettings(TINY, ROI, task=FINETUNE, num_classes=CLASSES)
    assert len(task_ladder(DEFAULT_LADDER, finetune)) == len(DEFAULT_LADDER)


def _real_tracked_peak(task: str, policy: str) -> int:
    """The same step on real CPU tensors under the same storage counter (steady state: the second step)."""
    model = _real(task)
    apply_fused_attention(model)
    apply_activation_checkpointing(model, policy)
    model.train()
    opt = build_optimizer(OptimConfig(), [p for p in model.parameters() if p.requires_grad], foreach=False)
    step = StepSettings(TINY, ROI, 1, 1, task=get_task(task), num_classes=CLASSES)
    inputs = make_step_inputs(step)
    inputs["image"].uniform_()
    inputs["label"].copy_(torch.randint(0, CLASSES, inputs["label"].shape))
    training_step(model, opt, inputs, step)
    tracker = StorageTracker()
    tracker.register_step_state(model, opt, inputs)
    with tracker:
        training_step(model, opt, inputs, step, phase=tracker.set_phase)
    tracker.remove_hooks()
    return max(sum(e[1:-1]) for e in tracker.events)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "full"])
def test_fake_finetune_trace_matches_real_tensors(policy: str) -> None:
    trace = _trace("finetune", policy)
    fake = int(sum(trace.column(c) for c in CATEGORIES if c not in ("workspace", "host")).max())
    real = _real_tracked_peak("finetune", policy)
    assert abs(fake - real) <= 0.02 * real, (fake, real)


def test_bad_downstream_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match='task: got "segment"'):
        estimate_memory(TINY, ROI, task=get_task("segment"))
    with pytest.raises(ConfigError, match="num_classes: got 1"):
        estimate_memory(TINY, ROI, task=FINETUNE, num_classes=1)
    with pytest.raises(ConfigError, match="grad_cache_chunk/two_passes"):
        estimate_memory(TINY, ROI, task=FINETUNE, grad_cache_chunk=2)


@pytest.mark.slow
def test_fit_memory_for_finetuning_picks_a_rung_that_fits() -> None:
    step = StepSettings(TINY, ROI, precision="fp32", task=FINETUNE, num_classes=CLASSES)
    none = estimate_memory(step, device="cpu").total
    fit = fit_memory(none - 1, step, device="cpu")
    assert fit.policy_name != "none" and fit.grad_cache_chunk == 0 and fit.estimate_bytes <= none - 1
    with pytest.raises(ConfigError, match=r"^--fit-memory: ROI \[32, 64, 64\].*every checkpointing policy\)"):
        fit_memory(2**20, step, device="cpu")


@pytest.mark.slow
def test_memory_commands_read_a_finetuning_config(tmp_path, capsys) -> None:
    """A config with a finetune section is a fine-tuning config: ``ssl3d memory estimate`` traces SwinUNETR's step
    (its classes from the config) and ``ssl3d memory plan`` prints a plan for it (``--task probe``: the probe's, one
    policy column since no rung changes it; the plan's cheapest GiB is the estimator's)."""
    config = tmp_path / "finetune.json"
    config.write_text(
        '{"model": {"feature_size": 12, "depths": [1, 1, 1, 1]}, "data": {"roi": [32, 64, 64], "num_samples": 1},'
        ' "train": {"precision": "fp32", "batch_size": 1}, "finetune": {"num_classes": 5}}'
    )
    model = ModelConfig(feature_size=12, depths=(1, 1, 1, 1))
    assert main(["memory", "estimate", f"--config={config}", "--device=cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["task"] == "finetune" and out["config"]["num_classes"] == 5
    swinunetr = get_task("finetune").build_model(model, num_classes=5)
    assert out["config"]["parameters_count"] == sum(p.numel() for p in swinunetr.parameters())
    step = StepSettings(model, ROI, 1, 1, "fp32", task=FINETUNE, num_classes=5)
    assert out["bytes"]["total"] == estimate_memory(step, device="cpu").total

    budget = 2**30
    assert main(["memory", "plan", f"--config={config}", f"--budget={budget}", "--device=cpu", "--task=probe"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("probe (5 classes), budget 1.0 GiB")
    assert "max roi none" in lines[1] and "max roi full" not in lines[1]
    rows = {(p[0], int(p[1])): p[2:] for p in (line.split() for line in lines[2:])}
    assert len(rows) == 21
    probe = dataclasses.replace(step, task=PROBE)
    cheapest, gib = rows[("single", 1)][-2:]
    assert cheapest == "none" and float(gib) == round(estimate_memory(probe, device="cpu").total / 2**30, 1)


@pytest.mark.slow
def test_plan_for_finetuning_agrees_with_the_estimator() -> None:
    step = StepSettings(TINY, ROI, 1, 1, "fp32", task=FINETUNE, num_classes=CLASSES)
    none = estimate_memory(step, device="cpu").total
    plan = plan_memory(
        none - 1, step, strategies=("single",), world_sizes=(1,), device="cpu", limit_policies=("full",), max_roi=128
    )
    row = plan["rows"][0]
    assert plan["task"] == "finetune" and row["cheapest_policy"] not in (None, "none")
    rung = dataclasses.replace(step, policy=dict(DEFAULT_LADDER)[row["cheapest_policy"]])
    assert row["cheapest_policy_total"] == estimate_memory(rung, device="cpu").total <= none - 1
    assert format_plan(plan).startswith("finetune (5 classes), budget")


def test_memory_estimate_downstream_needs_classes(capsys) -> None:
    assert main(["memory", "estimate", "--task=finetune", "--device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssl3d: error: --num-classes: needed for --task finetune")


def test_finetune_fit_memory_bad_size_is_one_line_and_nothing_starts(tmp_path, capsys) -> None:
    logdir = tmp_path / "r"
    assert main(["finetune", "--fit-memory=lots", f"--set=train.logdir={json.dumps(str(logdir))}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ssl3d: error: --fit-memory: got 'lots', expected a size such as 32GiB, 80GB or 500MiB"]
    assert not logdir.exists() and not (tmp_path / "demo_data").exists()
