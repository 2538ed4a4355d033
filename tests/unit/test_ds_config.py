"""ds_config presets: DeepSpeed's vocabulary, checked against an allowlist and the run config for every backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl3d.config import Config, ConfigError, load_config
from ssl3d.strategies.ds_config import load_ds_config, resolve_ds_config

PRESETS = sorted((Path(__file__).resolve().parents[2] / "ds_configs").glob("*.json"))


def run_cfg(**train) -> Config:
    cfg = Config()
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def problems(raw: dict, cfg: Config | None = None, **kw) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        resolve_ds_config(raw, cfg or run_cfg(), **kw)
    return exc.value.problems


def test_presets_exist() -> None:
    names = {p.stem for p in PRESETS}
    expected = {"single", "ddp", "fsdp", "fsdp_offload", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"}
    assert expected | {"zero3_nvme", "fairscale"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_resolves(path: Path) -> None:
    world = 1 if path.stem == "single" else 2
    ds = load_ds_config(path, run_cfg(batch_size=3, grad_accum=2, grad_clip=0.5), world_size=world)
    assert ds.strategy == json.loads(path.read_text())["strategy"]
    assert (ds.micro_batch_size, ds.grad_accum, ds.train_batch_size) == (3, 2, 3 * 2 * world)
    assert ds.gradient_clipping == 0.5 and ds.precision == "fp32"
    text = json.dumps(ds.deepspeed)
    assert '"auto"' not in text and "_comment" not in text and '"strategy"' not in text


def test_auto_values_come_from_the_run_config() -> None:
    raw = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    raw |= {"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}
    ds = resolve_ds_config(raw, run_cfg(batch_size=4, grad_accum=3, grad_clip=1.0, precision="bf16"), world_size=2)
    assert ds.strategy == "deepspeed"
    d = ds.deepspeed
    assert (d["train_micro_batch_size_per_gpu"], d["gradient_accumulation_steps"], d["train_batch_size"]) == (4, 3, 24)
    assert d["gradient_clipping"] == 1.0 and d["bf16"]["enabled"] is True and d["fp16"]["enabled"] is False
    assert d["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 19_099_648}  # "auto" bucket: the model size
    assert ds.precision == "bf16"


def test_missing_values_are_auto_and_precision_auto_follows_the_device() -> None:
    ds = resolve_ds_config({}, run_cfg(grad_clip=None), world_size=1, auto_precision="bf16")
    assert ds.strategy == "single" and ds.precision == "bf16" and ds.gradient_clipping is None
    assert ds.deepspeed["gradient_clipping"] == 0.0
    assert resolve_ds_config({}, run_cfg(), world_size=4).strategy == "ddp"


def test_misspelled_section_is_an_error_with_did_you_mean() -> None:
    (msg,) = problems({"zero_optimisation": {"stage": 3}})
    assert msg.startswith("ds_config <dict>: zero_optimisation: unknown section")
    assert "did you mean 'zero_optimization'?" in msg and "silently ignore" in msg


def test_unknown_keys_inside_zero_optimization() -> None:
    found = problems({"zero_optimization": {"stage": 2, "overlap_com": True, "offload_optimizer": {"devic": "cpu"}}})
    assert any("zero_optimization.overlap_com: unknown key; did you mean 'overlap_comm'?" in p for p in found)
    assert any("zero_optimization.offload_optimizer.devic: unknown key; did you mean 'device'?" in p for p in found)


def test_batch_arithmetic_shows_the_numbers() -> None:
    (msg,) = problems({"train_batch_size": 16}, run_cfg(batch_size=2, grad_accum=1), world_size=2)
    assert "train_batch_size: got 16" in msg and "2 x 1 x 2 = 4" in msg


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"train_micro_batch_size_per_gpu": 8}, "train.batch_size is 2"),
        ({"gradient_accumulation_steps": 4}, "train.grad_accum is 1"),
        ({"gradient_clipping": 1.0}, "train.grad_clip is null"),
        ({"bf16": {"enabled": True}}, 'train.precision is "fp32"'),
        ({"bf16": {"enabled": False}}, None),
    ],
)
def test_explicit_value_contradicting_the_run_config(raw: dict, needle: str | None) -> None:
    cfg = run_cfg(precision="fp32")
    if needle is None:
        resolve_ds_config(raw, cfg)  # agrees with the run config: fine
        return
    (msg,) = problems(raw, cfg)
    assert needle in msg and '"auto"' in msg


def test_explicit_value_that_agrees_is_fine() -> None:
    raw = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 8}
    ds = resolve_ds_config(raw | {"gradient_clipping": 1.0}, run_cfg(grad_accum=2, grad_clip=1.0), world_size=2)
    assert ds.train_batch_size == 8


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_sections_are_refused(section: str) -> None:
    (msg,) = problems({section: {"type": "AdamW", "params": {"lr": 1e-4}}})
    assert f"{section}: not allowed" in msg and "optim section" in msg


def test_all_problems_are_reported_at_once() -> None:
    raw = {"zero_optimisation": {}, "optimizer": {}, "train_batch_size": 7, "fsdp": {"shard": "blocks"}}
    found = problems(raw, world_size=2)
    assert len(found) >= 4
    assert all(p.startswith("ds_config <dict>: ") and "\n" not in p for p in found)


@pytest.mark.parametrize(
    ("raw", "world", "device", "needle"),
    [
        ({"strategy": "ddp", "zero_optimization": {"stage": 2}}, 2, "cpu", '"strategy": "deepspeed"'),
        ({"strategy": "fsdp", "zero_optimization": {"stage": 3}}, 2, "cpu", "FSDP2 already shards"),
        (
            {"strategy": "single", "zero_optimization": {"offload_optimizer": {"device": "cpu"}, "stage": 2}},
            1,
            "cpu",
            '"fsdp": {"cpu_offload": true}',
        ),
        ({"strategy": "single"}, 2, "cpu", 'use "ddp"'),
        ({"fp16": {"enabled": True}}, 1, "cpu", "use bf16"),
        ({"strategy": "fairscale", "fp16": {"enabled": True}}, 2, "cuda", "no tested fp16 loss scaler"),
        ({"strategy": "ddp", "torch_autocast": {"enabled": True}}, 2, "cpu", "only DeepSpeed reads it"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, 2, "cpu", "needs stage 3"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, 2, "cpu", "nvme_path"),
        ({"strategy": "ddp", "fsdp": {"cpu_offload": True}}, 2, "cpu", 'options for strategy "fsdp"'),
        ({"strategy": "deepspeeed"}, 2, "cpu", "did you mean 'deepspeed'?"),
        ({"zero_optimization": {"stage": "auto"}}, 2, "cpu", "expected 0, 1, 2 or 3"),
        ({"bf16": {"enabled": "auto", "check_grad_overflow": False}}, 2, "cpu", "not finite"),
        ({"strategy": "ddp", "data_types": {"grad_accum_dtype": "fp32"}}, 2, "cpu", "only DeepSpeed reads it"),
        (
            {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
            2,
            "cpu",
            "needs ZeRO stage 1",
        ),
    ],
)
def test_requests_a_backend_cannot_honour_name_the_alternative(raw: dict, world: int, device: str, needle: str) -> None:
    found = problems(raw, world_size=world, device_type=device)
    assert any(needle in p for p in found), found


def test_ssl3d_extensions_are_parsed_and_kept_from_deepspeed() -> None:
    raw = {"strategy": "fsdp", "fsdp": {"shard": "stage", "cpu_offload": True}, "gather_contrastive": True}
    ds = resolve_ds_config(raw | {"_comment": "x"}, run_cfg(), world_size=2)
    assert (ds.fsdp.shard, ds.fsdp.cpu_offload, ds.fsdp.reshard_after_forward) == ("stage", True, True)
    assert ds.gather_contrastive
    assert not {"strategy", "fsdp", "gather_contrastive", "_comment"} & set(ds.deepspeed)


def test_activation_checkpointing_is_stored_not_passed_to_deepspeed() -> None:
    ds = resolve_ds_config({"activation_checkpointing": {"partition_activations": False}}, run_cfg())
    assert ds.activation_checkpointing == {"partition_activations": False}
    assert "activation_checkpointing" not in ds.deepspeed
    found = problems({"activation_checkpointing": {"partition_activation": True}})
    assert any("partition_activation" in p for p in found)


def test_file_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_ds_config("/nonexistent/ds.json", run_cfg())


def test_invalid_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 8,}')
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        load_ds_config(bad, run_cfg())


def test_sections_follow_deepspeeds_own_models() -> None:
    """ZeRO, offload, bf16 and fp16 keys and values are checked by DeepSpeed's pydantic models: every field of the
    installed DeepSpeed is accepted (an accepted key never silently does nothing), deprecated fields point to
    their replacement, and DeepSpeed's value checks come back as one line naming the key."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from ssl3d.strategies import deepspeed_schema as schema

    def spellings(model) -> set[str]:
        return {f.alias or n for n, f in model.model_fields.items()}

    zero_keys = set(schema.accepted_keys("zero_optimization"))
    assert zero_keys <= spellings(DeepSpeedZeroConfig)
    assert {"stage", "overlap_comm", "stage3_prefetch_bucket_size", "compute_grad_norm"} <= zero_keys
    assert "cpu_offload" not in zero_keys  # deprecated in DeepSpeed
    assert set(schema.accepted_keys("bf16")) == spellings(DeepSpeedBF16Config)

    # Keys the old hand-kept lists did not know (newer DeepSpeed fields) now pass.
    newer = {"zero_optimization": {"stage": 2, "compute_grad_norm": True}, "bf16": {"bf16_optimizer_states": True}}
    ds = resolve_ds_config(newer, run_cfg(), world_size=2)
    assert ds.deepspeed["zero_optimization"]["compute_grad_norm"] is True
    assert ds.deepspeed["bf16"]["bf16_optimizer_states"] is True

    bad = {
        "zero_optimization": {
            "stage": 2,
            "cpu_offload": True,
            "stage3_max_live_parameters": -5,
            "sub_group_size": 1.5,
            "overlap_comm": "yes",
            "offload_optimizer": {"device": "cpu", "buffer_count": "four"},
        },
        "fp16": {"enabled": "auto", "initial_scale_power": "x"},
    }
    found = problems(bad, world_size=2)
    assert any("zero_optimization.cpu_offload: deprecated by DeepSpeed; use 'offload_optimizer'" in p for p in found)
    assert any("zero_optimization.stage3_max_live_parameters: got -5, expected a non-negative" in p for p in found)
    assert any("zero_optimization.sub_group_size: got 1.5; DeepSpeed says" in p for p in found)
    assert any('zero_optimization.overlap_comm: got "yes", expected true/false' in p for p in found)
    assert any('zero_optimization.offload_optimizer.buffer_count: got "four"; DeepSpeed says' in p for p in found)
    assert any('fp16.initial_scale_power: got "x"; DeepSpeed says' in p for p in found)
    assert len(found) == 6, found  # one line per problem, none reported twice


def test_build_strategy_without_a_preset_is_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl3d.strategies import SingleStrategy, build_strategy

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = run_cfg(device="cpu")
    assert type(build_strategy(cfg)) is SingleStrategy
    cfg.ds_config = str(Path(__file__).resolve().parents[2] / "ds_configs" / "single.json")
    strategy = build_strategy(cfg)
    assert type(strategy) is SingleStrategy and strategy.ds_config is not None


def test_auto_bucket_sizes_are_the_model_size() -> None:
    """DeepSpeed's default buckets (5e8 elements, 1.9 GiB fp32 each) dwarf a 19 M-parameter model: "auto" sizes
    them to the model's parameter count (19,097,191, rounded up to a multiple of 4096 as DeepSpeed's alignment
    asserts need); explicit values are kept."""
    cfg = load_config(None, {})
    zero3 = Path(__file__).resolve().parents[2] / "ds_configs" / "zero3.json"
    ds = load_ds_config(zero3, cfg, world_size=2, device_type="cpu", auto_precision="fp32")
    zero = ds.deepspeed["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == 19_099_648
    raw = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 123456, "allgather_bucket_size": "auto"}}
    ds = resolve_ds_config(raw, cfg, world_size=1, device_type="cpu")
    assert ds.deepspeed["zero_optimization"]["reduce_bucket_size"] == 123456
    assert ds.deepspeed["zero_optimization"]["allgather_bucket_size"] == 19_099_648


def test_ssl3d_sections_are_checked_by_the_preset_model() -> None:
    """Types, limits and names of ssl3d's own keys come from ``Preset``; each problem is one line naming the key,
    the value and what would work, in the order the preset has them; comments are allowed at any level."""
    raw = {
        "train_batch_size": 0,
        "gradient_clipping": "high",
        "fsdp": {"_why": "comment", "shard": "blocks", "cpu_offlaod": True},
        "gather_contrastive": "yes",
        "steps_per_print": 2.5,
    }
    found = problems(raw | {"strategy": "fsdp"}, world_size=2)
    assert found == [
        'ds_config <dict>: train_batch_size: got 0, expected a positive integer or "auto"',
        'ds_config <dict>: gradient_clipping: got "high", expected a number or "auto"',
        'ds_config <dict>: fsdp.shard: got "blocks", expected "block" | "stage" (did you mean \'block\'?)',
        "ds_config <dict>: fsdp.cpu_offlaod: unknown key; did you mean 'cpu_offload'? valid keys: "
        "reshard_after_forward, cpu_offload, shard",
        'ds_config <dict>: gather_contrastive: got "yes", expected true/false',
        "ds_config <dict>: steps_per_print: got 2.5, expected an integer or null",
    ], found


@pytest.mark.parametrize(("stage", "refused"), [(2, False), (3, True)])
def test_compile_with_zero3_is_refused_up_front(stage: int, refused: bool) -> None:
    """model.compile with ZeRO-3 stops before any engine exists (DeepSpeed's per-layer gathering hooks cut every
    compiled block apart); ZeRO-2 resolves."""
    cfg = run_cfg()
    cfg.model.compile = True
    raw = {"zero_optimization": {"stage": stage}}
    if not refused:
        assert resolve_ds_config(raw, cfg, world_size=2).zero_stage == stage
        return
    (msg,) = problems(raw, cfg, world_size=2)
    assert "model.compile" in msg and "zero_optimization.stage 3" in msg and '"fsdp"' in msg
