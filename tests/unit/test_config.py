import json

import pytest

from ssl3d.config import ConfigError, load_config, parse_override


def test_defaults_match_the_reference():
    cfg = load_config()
    assert cfg.model.feature_size == 48 and cfg.model.window_size == 7
    assert cfg.model.depths == (2, 2, 2, 2) and cfg.model.num_heads == (3, 6, 12, 24)
    assert cfg.data.roi == (96, 96, 96) and cfg.data.num_samples == 2
    assert cfg.optim.lr == 4e-4 and cfg.optim.weight_decay == 0.1 and cfg.optim.warmup_steps == 500
    assert cfg.ssl.temperature == 0.5 and cfg.ssl.max_drop == 0.3


def test_json_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train": {"num_steps": 10, "batch_size": 3}, "data": {"roi": [64, 64, 64]}}))
    cfg = load_config(path, ["train.num_steps=20", "optim.name=sgd"])
    assert cfg.train.num_steps == 20 and cfg.train.batch_size == 3
    assert cfg.data.roi == (64, 64, 64) and cfg.optim.name == "sgd"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.num_stepz=5", "train.num_stepz"),
        ("data.roi=[60,64,64]", r"data.roi\[0\]"),
        ("data.roi=[64,96,64]", "data.roi"),
        ("data.roi=[32,32,32]", "data.roi"),
        ("optim.name=adamx", "optim.name"),
        ("optim.lr=-1", "optim.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.precision=fp8", "train.precision"),
        ("model.feature_size=50", "model.feature_size"),
        ("model.depths=[2,2]", "model.depths"),
        ('data.datalists=[{"json":"missing.json"}]', r"data.datalists\[0\].json"),
        ("ssl.temperature=0", "ssl.temperature"),
        ('train.num_steps="many"', "train.num_steps"),
        ("modle.feature_size=48", "modle"),
    ],
)
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key) as info:
        load_config(None, [override])
    assert all("\n" not in p for p in info.value.problems)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.batch_size=0", "optim.lr=-1", "data.num_samples=0"])
    assert len(info.value.problems) == 3


def test_bad_json_file_is_one_line(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("{ not json")
    with pytest.raises(ConfigError, match="run.json: invalid JSON at line 1"):
        load_config(path)


def test_parse_override_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=runs/x") == ("a.b", "runs/x")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")
