"""The one training step: the trainer's backend (a Strategy) and the estimator's (plain autograd) take the same
step; planted faults and the fp16 loss-scale policy as the loop sees them."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ssl3d.fault_injection import Faults
from ssl3d.model import build_model
from ssl3d.optim import build_optimizer
from ssl3d.ssl import SSLLoss, make_views
from ssl3d.ssl.task import SSLTask
from ssl3d.step import LocalBackend, run_step
from ssl3d.strategies.precision import LossScaleWatch
from ssl3d.strategies.single import SingleStrategy


def _setup(tiny_model_cfg):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg, 32)
    crops = torch.rand(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(1))
    views = make_views(crops, torch.Generator().manual_seed(2))
    return model, views


@pytest.mark.slow
def test_strategy_and_local_backend_take_the_same_step(tiny_model_cfg) -> None:  # noqa: ANN001
    from ssl3d.config import OptimConfig

    model, views = _setup(tiny_model_cfg)
    local_model = copy.deepcopy(model)
    strategy = SingleStrategy(torch.device("cpu"), torch.float32)
    wrapped, _ = strategy.setup(model, lambda params: build_optimizer(OptimConfig(name="sgd", lr=1e-2), params))
    local = LocalBackend(build_optimizer(OptimConfig(name="sgd", lr=1e-2), local_model.parameters()))
    task = SSLTask(SSLLoss())
    before = {k: v.clone() for k, v in local_model.state_dict().items()}
    losses_s, result = run_step(wrapped, task, [views], strategy)
    losses_l, none = run_step(local_model, task, [views], local)
    assert none is None and math.isfinite(result.grad_norm) and result.grad_norm > 0 and not result.overflow
    for k in ("total", "rotation", "contrastive", "reconstruction"):
        assert torch.allclose(losses_s[0][k], losses_l[0][k], rtol=1e-6, atol=0), k
    after_s, after_l = model.state_dict(), local_model.state_dict()
    moved = [k for k in after_l if not torch.equal(after_l[k], before[k])]
    assert len(moved) > 10  # the step really updated the weights
    for k in after_l:
        assert torch.allclose(after_s[k], after_l[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.slow
def test_planted_nan_loss_skips_the_update(tiny_model_cfg) -> None:  # noqa: ANN001
    model, views = _setup(tiny_model_cfg)
    strategy = SingleStrategy(torch.device("cpu"), torch.float32)
    wrapped, _ = strategy.setup(model, lambda params: torch.optim.AdamW(params, lr=1e-2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    faults = Faults(nan_steps=frozenset({2}))
    losses, result = run_step(wrapped, SSLTask(SSLLoss()), [views], strategy, loss_hook=faults.loss_hook(2))
    assert math.isnan(float(losses[0]["total"])) and math.isnan(result.grad_norm) and not result.overflow
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert faults.loss_hook(1)(torch.ones(())) == 1  # other steps untouched


def test_faults_are_read_once_from_the_environment() -> None:
    f = Faults.from_env({"SSL3D_PLANT_NAN": "3, 4", "SSL3D_KILL_AT_STEP": "5:1", "SSL3D_KILL_DURING_SAVE": "6"})
    assert f.nan_steps == {3, 4} and f.kill_at_step == (5, 1) and f.kill_during_save == (6, None)
    restarted = Faults.from_env({"SSL3D_KILL_AT_STEP": "5", "TORCHELASTIC_RESTART_COUNT": "1"})
    assert restarted.kill_at_step is None  # an elastic restart runs through
    assert Faults.from_env({}) == Faults()


def test_loss_scale_watch_counts_overflows_and_stops_below_the_minimum() -> None:
    watch = LossScaleWatch(min_scale=1.0)
    first = watch.result(math.inf, 8.0, 4.0)
    assert first.overflow and first.stop is None and first.scalars == {"train/loss_scale": 4.0}
    assert watch.result(math.inf, 4.0, 2.0).stop is None
    assert not watch.result(0.5, 2.0, 2.0).overflow and watch.overflows_in_row == 0  # a good step resets
    watch.result(math.inf, 2.0, 1.0)
    last = watch.result(math.inf, 1.0, 0.5)
    assert last.overflow and last.stop is not None
    assert last.stop.startswith("fp16 loss scale underflow: after 2 gradient overflows in a row the scale is 0.5")
    assert "below fp16.min_loss_scale (1)" in last.stop
    assert LossScaleWatch().result(1.0, None, None).scalars == {}  # no scaler: nothing to log
