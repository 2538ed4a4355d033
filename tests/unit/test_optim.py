import math

import pytest
import torch

from ssl3d.config import OptimConfig
from ssl3d.optim import build_optimizer, lr_at


def test_warmup_cosine():
    cfg = OptimConfig(lr=1.0, schedule="warmup_cosine", warmup_steps=10)
    assert lr_at(cfg, 0, 110) == 0.0
    assert lr_at(cfg, 5, 110) == pytest.approx(0.5)
    assert lr_at(cfg, 10, 110) == pytest.approx(1.0)
    assert lr_at(cfg, 60, 110) == pytest.approx(0.5)
    assert lr_at(cfg, 110, 110) == pytest.approx(0.0, abs=1e-12)


def test_poly_runs_past_100_steps():
    # The reference divided by an epoch count and broke after 100 steps.
    cfg = OptimConfig(lr=2.0, schedule="poly", poly_power=0.9)
    assert lr_at(cfg, 500, 1000) == pytest.approx(2.0 * 0.5**0.9)
    assert lr_at(cfg, 1000, 1000) == 0.0


def test_constant():
    assert lr_at(OptimConfig(lr=3e-4, schedule="constant"), 12345, 100) == 3e-4


@pytest.mark.parametrize(
    "name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]
)
def test_optimizers(name, cls):
    opt = build_optimizer(OptimConfig(name=name, lr=0.1, weight_decay=0.01), [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, cls)
    assert opt.param_groups[0]["lr"] == 0.1 and math.isclose(opt.param_groups[0]["weight_decay"], 0.01)
