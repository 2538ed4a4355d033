"""The FakeTensor memory estimator, its sharding arithmetic, the CPU measurement and the planner.

Tolerances: the fake trace against the same step on real tensors (same storage counter): 1 %; the estimate
against the peak RSS growth of a fresh process: 15 %.
"""

from __future__ import annotations

import pytest
import torch

from ssl3d.config import ConfigError, ModelConfig
from ssl3d.memory.activation_checkpointing import apply_activation_checkpointing
from ssl3d.memory.estimate import (
    CATEGORIES,
    GIB,
    StorageTracker,
    estimate_memory,
    format_estimate,
    make_step_inputs,
    trace_step,
    training_step,
)
from ssl3d.memory.plan import DEFAULT_LADDER, format_plan, plan_memory
from ssl3d.memory.profile import profile_in_subprocess
from ssl3d.model import build_model
from ssl3d.model.attention import apply_fused_attention
from ssl3d.step import StepSettings
from ssl3d.tasks import PRETRAIN

TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24), window_size=4)
ROI = (32, 64, 64)


def _real_tracked_peak(policy: str, num_samples: int) -> int:
    """The same step on real CPU tensors under the same storage counter (steady state: second step)."""
    torch.manual_seed(0)
    model = build_model(TINY)
    apply_fused_attention(model)
    apply_activation_checkpointing(model, policy)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    step = StepSettings(TINY, ROI, 1, num_samples, task=PRETRAIN)
    inputs = make_step_inputs(step)
    for v in inputs.values():
        if v.is_floating_point():
            v.uniform_()
    training_step(model, opt, inputs, step)
    tracker = StorageTracker()
    tracker.register_step_state(model, opt, inputs)
    with tracker:
        training_step(model, opt, inputs, step, phase=tracker.set_phase)
    tracker.remove_hooks()
    return max(sum(e[1:-1]) for e in tracker.events)


@pytest.mark.slow
def test_fake_trace_matches_real_tensors():
    """Checkpointing + fused attention: recomputation and the chunked backward are where fake and real could part."""
    policy = "full"
    trace = trace_step(TINY, ROI, 1, 1, policy=policy, device="cpu", task=PRETRAIN)
    # Tensor bytes only: the estimate's modelled oneDNN workspace is invisible to the counter on real tensors.
    fake = int(sum(trace.column(c) for c in CATEGORIES if c not in ("workspace", "host")).max())
    real = _real_tracked_peak(policy, 1)
    assert abs(fake - real) <= 0.01 * real, (fake, real)


@pytest.mark.slow
def test_estimate_within_15_percent_of_measured_rss():
    """Eager attention (the reference's path): a config whose peak (~0.7 GB) stands well above RSS noise."""
    model = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))
    # RSS only ever gains from outside noise (allocator caching, other load): the smaller of two fresh-process
    # measurements is the better one. A wrong estimate still fails both.
    runs = [
        profile_in_subprocess(
            model=model,
            roi=list(ROI),
            batch_size=1,
            num_samples=1,
            fused_attention=False,
            steps=1,
            threads=2,
            device="cpu",  # a CPU estimate against a CPU measurement, also on a GPU machine
            module_peaks=False,
            breakdown=False,
            timeout=300,
            task=PRETRAIN,
        )
        for _ in range(2)
    ]
    measured = min(r["measured"]["rss_peak_over_baseline"] for r in runs)
    estimated = runs[0]["estimate"]["bytes"]["total"]
    assert abs(estimated - measured) <= 0.15 * measured, (estimated / GIB, measured / GIB)
    # What top shows: the libraries' baseline (measured once per environment) + the step, against the peak RSS.
    whole = min(r["measured"]["rss_peak"] for r in runs)
    whole_estimated = runs[0]["estimate"]["bytes"]["process_peak"]
    assert whole_estimated == estimated + runs[0]["estimate"]["bytes"]["process_baseline"]
    assert abs(whole_estimated - whole) <= 0.10 * whole, (whole_estimated / GIB, whole / GIB)


def test_breakdown_and_table():
    est = estimate_memory(TINY, ROI, 1, 2, policy="selective", task=PRETRAIN)
    b = est.breakdown
    parts = sum(b[k] for k in CATEGORIES if k not in ("host",) and k in b) + b["sharding_buffers"]
    assert b["allocated_peak"] == pytest.approx(parts, abs=8)
    assert b["total"] == b["reserved"] + b["runtime"] and b["reserved"] >= b["allocated_peak"]
    assert b["reserved"] % (2 * 2**20) == 0
    assert b["parameters"] > 0 and b["optimizer_states"] == pytest.approx(2 * b["parameters"], rel=0.01)
    text = format_estimate(est)
    assert "optimizer states" in text and "total per rank" in text
    assert '"gib"' in est.to_json()


@pytest.mark.slow
def test_policies_and_fused_attention_reduce_memory():
    def peak(**kw):
        return estimate_memory(TINY, ROI, 1, 2, device="cpu", **kw, task=PRETRAIN).breakdown

    none, full = peak(policy="none"), peak(policy="full")
    assert full["activations_max"] < 0.5 * none["activations_max"]
    # With the decoder's output conv before the last upsampling, this tiny model's peak is one stage-0 block's
    # attention backward, which recomputation does not lower (checkpoint inputs add a little).
    assert full["allocated_peak"] < 1.01 * none["allocated_peak"]
    assert peak(fused_attention=True)["allocated_peak"] < peak(fused_attention=False)["allocated_peak"]


def test_sharding_arithmetic():
    def total(strategy, n, **kw):
        return estimate_memory(TINY, ROI, 1, 2, strategy=strategy, world_size=n, **kw, task=PRETRAIN).breakdown

    single = total("single", 1)
    z1, z3, fsdp = total("zero1", 8, reduce_bucket_size=0), total("zero3", 8), total("fsdp", 8)
    # DeepSpeed (fp32): Adam's 8P and the fp32 master copy's 4P, partitioned (bench/model_states.py measures this).
    assert z1["optimizer_states"] == pytest.approx(single["optimizer_states"] * 1.5 / 8, rel=0.01)
    assert z1["gradients"] <= single["gradients"] / 8 * 1.01  # stage 1 partitions gradients too (DeepSpeed 0.19)
    # World size 8: an eighth of every state; ZeRO-3 keeps parameters under stage3_param_persistence_threshold
    # (1e5 elements, DeepSpeed's default) whole on every rank.
    small = 4 * sum(p.numel() for p in build_model(TINY).parameters() if p.numel() < 100_000)
    assert z3["parameters"] == pytest.approx(single["parameters"] / 8 + small * 7 / 8, rel=0.01)
    assert z3["gradients"] == pytest.approx(single["gradients"] / 8, rel=0.01)
    assert z3["optimizer_states"] == pytest.approx(single["optimizer_states"] * 1.5 / 8, rel=0.01)
    for key in ("parameters", "gradients", "optimizer_states"):
        assert fsdp[key] == pytest.approx(single[key] / 8, rel=0.01), key
    ddp = total("ddp", 2)
    assert ddp["gradients"] == ddp["parameters"] and ddp["sharding_buffers"] == 0  # gradients are DDP's buckets
    # DeepSpeed's default bucket (5e8 elements, fp32) when asked; by default the presets' "auto": the model's size.
    assert total("zero2", 2, reduce_bucket_size=500_000_000)["sharding_buffers"] >= 500_000_000 * 4
    assert total("zero2", 2)["sharding_buffers"] <= 2 * 4 * (single["parameters"] // 4 + 4096)
    assert total("single", 1, offload_optimizer=True)["optimizer_states"] == 0
    with pytest.raises(ConfigError, match="offload_params: needs strategy zero3 or fsdp"):
        total("ddp", 2, offload_params=True)
    with pytest.raises(ConfigError, match='strategy: got "zero4"'):
        total("zero4", 2)


def test_bad_roi_is_a_config_error():
    with pytest.raises(ConfigError, match=r"roi\[0\]: got 48, expected a positive multiple of 32"):
        estimate_memory(TINY, 48, task=PRETRAIN)
    with pytest.raises(ConfigError, match=r"roi: got \[32, 32, 32\], expected at least 2 tokens at the last stage"):
        estimate_memory(TINY, 32, task=PRETRAIN)
    with pytest.raises(ConfigError, match=r"expected roi\[1\] == roi\[2\]"):
        estimate_memory(TINY, (64, 64, 96), task=PRETRAIN)


@pytest.mark.slow
def test_full_size_256_traces_without_allocating():
    # The trace runs on fake tensors: a 256^3 full-size step (tens of GiB for real) traces on a 24 GiB host.
    trace = trace_step(ModelConfig(), 256, 1, 2, policy="full", task=PRETRAIN)
    assert trace.events[:, 1:].sum(axis=1).max() > 4 * 2**30


@pytest.mark.slow
def test_planner_choice_fits_budget(tmp_path):
    ladder = DEFAULT_LADDER[:1] + DEFAULT_LADDER[5:6]  # none, full
    none = estimate_memory(TINY, 64, 1, 2, "fp32", "none", task=PRETRAIN).total
    full = estimate_memory(TINY, 64, 1, 2, "fp32", "full", task=PRETRAIN).total
    assert full < none
    budget = (none + full) // 2  # only checkpointing makes roi 64 fit
    plan = plan_memory(
        budget,
        TINY,
        roi=64,
        precision="fp32",
        strategies=("single", "zero3"),
        world_sizes=(2,),
        ladder=ladder,
        limit_policies=("none", "full"),
        max_roi=96,
        max_batch=2,
        plot_path=tmp_path / "mem.png",
        plot_rois=(64, 96),
        task=PRETRAIN,
    )
    single = plan["rows"][0]
    assert single["strategy"] == "single" and single["cheapest_policy"] == "full"
    assert single["cheapest_policy_total"] <= budget
    assert estimate_memory(TINY, 64, 1, 2, "fp32", "full", task=PRETRAIN).total <= budget
    roi_full = single["largest_roi"]["full"]
    assert roi_full is not None and estimate_memory(TINY, roi_full, 1, 2, "fp32", "full", task=PRETRAIN).total <= budget
    if roi_full + 32 <= 96:
        assert estimate_memory(TINY, roi_full + 32, 1, 2, "fp32", "full", task=PRETRAIN).total > budget
    assert single["largest_roi"]["none"] is None or single["largest_roi"]["none"] < 64
    assert (tmp_path / "mem.png").stat().st_size > 1000
    assert "cheapest policy" in format_plan(plan)
