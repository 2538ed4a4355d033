"""Gradient caching in the estimator, ``fit_memory`` and ``ssl3d pretrain --fit-memory``."""

from __future__ import annotations

import json
import re

import pytest

from ssl3d.cli import main, make_parser
from ssl3d.config import ConfigError, ModelConfig
from ssl3d.memory import apply_activation_checkpointing, checkpointed_modules
from ssl3d.memory.estimate import estimate_memory
from ssl3d.memory.plan import DEFAULT_LADDER, fit_memory
from ssl3d.model import build_model
from ssl3d.run_config import build_config
from ssl3d.tasks import PRETRAIN
from ssl3d.trainer import Trainer

# MONAI's default window 7: with window 4 this tiny model's peak is one block's attention backward, which
# recomputation does not lower, so "full" would not fit where "none" does not.
TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))
ROI = (32, 64, 64)


def _est(num_samples: int, chunk: int, policy: str = "none", model: ModelConfig = TINY):
    return estimate_memory(
        TINY if model is None else model,
        ROI,
        1,
        num_samples,
        "fp32",
        policy,
        device="cpu",
        grad_cache_chunk=chunk,
        contrastive_dim=512,
        task=PRETRAIN,
    )


@pytest.mark.slow
def test_gradient_caching_caps_activations_at_one_chunk() -> None:
    """Without caching, saved activations grow with the crops of a step; with 2 views per chunk they stay those of
    2 views (to 5%) at 4 or 8 views, and below the one-pass step's."""
    plain = {n: _est(n, 0).breakdown["activations_max"] for n in (2, 4)}
    cached = {n: _est(n, 2).breakdown["activations_max"] for n in (2, 4)}
    assert plain[4] > 1.8 * plain[2]
    assert cached[4] == pytest.approx(cached[2], rel=0.05)
    assert cached[2] < 0.6 * plain[2]
    assert _est(4, 2).total < _est(4, 0).total


def _budget_between(a: int, b: int) -> int:
    return (a + b) // 2


def test_fit_picks_the_cheapest_rung_that_fits() -> None:
    ladder = [DEFAULT_LADDER[0], DEFAULT_LADDER[5]]  # none, full
    none, full = _est(2, 0).total, _est(2, 0, "full").total
    budget = _budget_between(none, full)
    fit = fit_memory(budget, TINY, ROI, 1, 2, ladder=ladder, precision="fp32", device="cpu", task=PRETRAIN)
    assert (fit.policy_name, fit.grad_cache_chunk) == ("full", 0)
    assert fit.estimate_bytes == full <= budget
    assert fit.policy["policy"] == "full"
    roomy = fit_memory(none + 1, TINY, ROI, 1, 2, ladder=ladder, precision="fp32", device="cpu", task=PRETRAIN)
    assert (roomy.policy_name, roomy.grad_cache_chunk) == ("none", 0)


@pytest.mark.slow
def test_fit_turns_to_gradient_caching_when_no_policy_is_enough() -> None:
    ladder = [DEFAULT_LADDER[0], DEFAULT_LADDER[5]]
    full, full_cached = _est(4, 0, "full").total, _est(4, 1, "full").total
    assert full_cached < full
    budget = _budget_between(full, full_cached)
    fit = fit_memory(budget, TINY, ROI, 1, 4, ladder=ladder, precision="fp32", device="cpu", task=PRETRAIN)
    assert fit.grad_cache_chunk >= 1 and fit.estimate_bytes <= budget
    assert "gradient caching" in fit.describe(budget)


@pytest.mark.slow
def test_fit_says_what_would_fit_when_nothing_does() -> None:
    with pytest.raises(ConfigError, match=r"--fit-memory: ROI \[32, 64, 64\].*over the budget of 0\.01 GiB"):
        fit_memory(10 * 2**20, TINY, ROI, 1, 2, precision="fp32", device="cpu", task=PRETRAIN)


@pytest.mark.slow
def test_pretrain_fit_memory_applies_the_plan(tmp_path, capsys, monkeypatch, keep_pytest_allocator) -> None:
    run = {
        "model.feature_size": 12,
        "model.depths": [1, 1, 1, 1],
        "model.fused_attention": True,  # (eager attention's temporaries hide what checkpointing saves at this size)
        "data.roi": list(ROI),
        "data.num_samples": 2,
        "data.num_workers": 0,
        "data.demo_volumes": 2,
        "train.batch_size": 1,
        "train.num_steps": 1,
        "train.progress": False,
        "train.device": "cpu",
        "train.precision": "fp32",
        "train.logdir": str(tmp_path / "run"),
    }
    args = ["pretrain", *[f"--set={k}={json.dumps(v)}" for k, v in run.items()]]
    cfg = build_config(make_parser().parse_args(args))  # the demo preset under the overrides, as the run sees it
    kw = {"fused_attention": cfg.model.fused_attention, "device": "cpu", "contrastive_dim": cfg.ssl.contrastive_dim}
    budget = (
        estimate_memory(cfg.model, ROI, 1, 2, "fp32", "none", **kw, task=PRETRAIN).total - 1
    )  # the run as configured: too big
    args.append(f"--fit-memory={budget}")
    applied: dict = {}
    fit = Trainer.fit

    def recording_fit(self):  # what the model the run trains really carries
        applied["modules"] = checkpointed_modules(self.model)
        applied["grad_cache_chunk"] = self.cfg.ssl.grad_cache_chunk
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    assert main(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "--fit-memory" in x)
    assert "estimated peak" in line and "'none', no gradient caching" not in line
    assert (tmp_path / "run" / "model_swinvit.pt").is_file()
    # The chosen rung is what the trained model carries: the same modules checkpointed as that policy gives a
    # fresh model, and the gradient-caching chunk the line names.
    name = re.search(r"activation checkpointing '([^']+)'", line)[1]
    chunk = re.search(r"gradient caching (\d+) views per chunk", line)
    expected = build_model(cfg.model, cfg.ssl.contrastive_dim)
    apply_activation_checkpointing(expected, dict(DEFAULT_LADDER)[name])
    assert applied["modules"] == checkpointed_modules(expected) != {}
    assert applied["grad_cache_chunk"] == (int(chunk[1]) if chunk else 0)


def test_fit_memory_bad_size_is_a_config_error(tmp_path, capsys) -> None:
    assert main(["pretrain", "--fit-memory=lots", f"--set=train.logdir={json.dumps(str(tmp_path / 'r'))}"]) == 2
    assert "--fit-memory: got 'lots'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
