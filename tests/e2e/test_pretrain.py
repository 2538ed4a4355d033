"""End-to-end runs of the trainer on real NIfTI files (tiny model, small crops)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from run_logs import resumed_from, steps_per_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import TINY_RUN

from ssl3d.cli import main
from ssl3d.config import load_config
from ssl3d.strategies import build_strategy
from ssl3d.trainer import Trainer

TINY = {
    **TINY_RUN,
    "data.demo_volumes": 3,
    "optim.warmup_steps": 2,
    "optim.lr": 1e-3,
}


def run(logdir: Path, **overrides) -> dict:
    cfg = load_config(None, {**TINY, "train.logdir": str(logdir), **overrides})
    return Trainer(cfg, build_strategy(cfg)).fit()


def scalars(logdir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_demo_run_writes_logs_images_checkpoints_and_export(tmp_path):
    logdir = tmp_path / "run"
    summary = run(logdir, **{"train.num_steps": 4, "train.eval_num": 2})
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in [
        "train/loss_total",
        "train/loss_rotation",
        "train/loss_contrastive",
        "train/loss_reconstruction",
        "train/lr",
        "train/grad_norm",
        "perf/step_time_s",
        "perf/volumes_per_s",
        "Validation/loss_reconstruction",
        "Validation/loss_reconstruction_masked",
        "Validation/collapse_embedding_std",
        "Validation/collapse_effective_rank",
    ]:
        assert tag in tags["scalars"], tag
    masked = scalars(logdir, "Validation/loss_reconstruction_masked")
    rank = scalars(logdir, "Validation/collapse_effective_rank")
    assert sorted(masked) == sorted(rank) == [2, 4] and all(v > 0 for v in masked.values())
    assert all(1.0 <= v <= 2.0 for v in rank.values())  # one validation crop, two views: at most 2 directions
    assert {"Validation/ground_truth", "Validation/corrupted", "Validation/reconstruction"} <= set(tags["images"])
    assert len(list((logdir / "images").glob("validation_step_*.png"))) == 2
    ckpts = logdir / "checkpoints"
    assert (ckpts / "best" / "COMPLETE").is_file()
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004"]
    exported = torch.load(summary["export"], weights_only=True)["state_dict"]
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in exported
    assert json.loads((logdir / "summary.json").read_text())["steps"] == 4
    # model_swinvit.json beside it: what fine-tuning must repeat, and each tensor's fingerprint.
    meta = json.loads(Path(summary["export"]).with_suffix(".json").read_text())
    assert meta["model"]["feature_size"] == 12 and meta["steps"] == 4 and meta["roi"] == list(TINY["data.roi"])
    assert meta["preprocessing"]["a_min"] == -1000.0 and meta["datalists"][0]["training"] >= 1
    assert set(meta["tensors"]) == set(exported)


def test_resume_continues_the_same_loss_curve(tmp_path, capsys):
    straight = tmp_path / "straight"
    run(straight, **{"train.num_steps": 4, "train.eval_num": 2})
    # Interrupted after step 2 (its checkpoint), then resumed with the same command plus --resume auto.
    resumed = tmp_path / "resumed"
    run(resumed, **{"train.num_steps": 2, "train.eval_num": 2})
    capsys.readouterr()
    run(resumed, **{"train.num_steps": 4, "train.eval_num": 2, "train.resume": "auto"})
    # From the newest complete step folder, running (and logging) only the steps after it: a resume that silently
    # started over would reproduce the same deterministic losses.
    assert resumed_from(capsys.readouterr().out) == [(str(resumed / "checkpoints" / "step_00000002"), 2)]
    assert steps_per_process(resumed) == [[1, 2], [3, 4]]
    a = scalars(straight, "train/loss_total")
    b = scalars(resumed, "train/loss_total")
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    assert a[3] != pytest.approx(a[2])


def test_volumes_of_mixed_shapes_including_thinner_than_the_roi(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    shapes = [(70, 80, 90), (50, 40, 100), (80, 80, 20), (64, 96, 64)]  # one is 20 slices: thinner than 32
    for i, shape in enumerate(shapes):
        vol = rng.normal(0, 300, size=shape).astype(np.int16)
        nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.5, 2.0, 1.0])), images / f"v{i}.nii.gz")
    datalist = {"training": [{"image": f"images/v{i}.nii.gz"} for i in range(3)], "validation": ["images/v3.nii.gz"]}
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    summary = run(
        tmp_path / "run",
        **{"train.num_steps": 3, "train.eval_num": 3, "data.datalists": [{"json": str(tmp_path / "list.json")}]},
    )
    assert summary["steps"] == 3 and np.isfinite(summary["last"]["total"])


def test_cli_demo_run_and_export_command(tmp_path, capsys):
    logdir = tmp_path / "cli"
    args = ["pretrain"] + [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    args += ["--set", f"train.logdir={logdir}", "--set", "train.num_steps=2", "--set", "train.eval_num=2"]
    assert main(args) == 0
    assert "ssl3d: done: 2 steps" in capsys.readouterr().out
    out = tmp_path / "exported.pt"
    assert main(["export", str(logdir), str(out)]) == 0
    a = torch.load(out, weights_only=True)["state_dict"]
    b = torch.load(logdir / "model_swinvit.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_planted_nan_step_is_skipped_without_changing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL3D_PLANT_NAN", "2")
    logdir = tmp_path / "nan"
    summary = run(logdir, **{"train.num_steps": 3, "train.eval_num": 1, "train.keep_checkpoints": 3})
    assert summary["skipped_steps"] == 1
    ckpt = logdir / "checkpoints"
    s1 = torch.load(ckpt / "step_00000001" / "state.pt", weights_only=True)
    s2 = torch.load(ckpt / "step_00000002" / "state.pt", weights_only=True)
    s3 = torch.load(ckpt / "step_00000003" / "state.pt", weights_only=True)
    assert all(torch.equal(s1["model"][k], s2["model"][k]) for k in s1["model"])
    exp_avg = [v["exp_avg"] for v in s1["optimizer"]["state"].values()]
    assert len(exp_avg) == len(s1["model"]) - sum(1 for k in s1["model"] if "relative_position_index" in k)
    assert all(torch.equal(a, v["exp_avg"]) for a, v in zip(exp_avg, s2["optimizer"]["state"].values(), strict=True))
    assert not all(torch.equal(s2["model"][k], s3["model"][k]) for k in s2["model"])  # step 3 trains again
    assert scalars(logdir, "train/skipped_steps")[3] == 1


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSL3D_PLANT_NAN", "2,3")
    logdir = tmp_path / "stop"
    args = ["pretrain"] + [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    args += [f"--set=train.logdir={logdir}", "--set=train.num_steps=5", "--set=train.eval_num=1"]
    assert main(args + ["--set=train.max_bad_steps=2"]) == 3
    err = capsys.readouterr().err
    assert (
        "step 3: 2 non-finite steps in a row" in err and "step_00000002" in err
    )  # skipped steps leave the weights as they were


def test_resume_with_another_batch_size_continues_the_epoch(tmp_path, capsys):
    """The saved data position counts one rank's batches: after 2 of 2 batches of 1 volume, a resume with batches of
    2 volumes continues at batch 1 of 1 (the same volumes consumed) instead of failing on position 2."""
    logdir = tmp_path / "run"
    common = {"train.eval_num": 2, "data.demo_volumes": 3}
    run(logdir, **common, **{"train.num_steps": 2})
    summary = run(logdir, **common, **{"train.num_steps": 3, "train.batch_size": 2, "train.resume": "auto"})
    assert summary["steps"] == 3
    assert "data position: batch 2 of 1 volumes x 1 ranks -> batch 1 of 2 x 1" in capsys.readouterr().out


def _record_training_forwards(monkeypatch) -> list[int]:
    """Batch sizes of the model's forward calls in training mode (validation runs in eval mode)."""
    sizes: list[int] = []
    fit = Trainer.fit

    def recording_fit(self):
        self.model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]) if m.training else None)
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    return sizes


def test_trainer_gradient_caching_matches_one_pass(tmp_path, monkeypatch):
    """The Trainer's own gradient-caching path (ssl.grad_cache_chunk): one view per chunk, so each step runs 2
    no-grad and 2 grad forwards of one view where the one-pass step runs one forward of both views, with the same
    losses and weights (float summation order aside)."""
    common = {"train.num_steps": 2, "train.eval_num": 2}
    sizes = _record_training_forwards(monkeypatch)
    run(tmp_path / "one_pass", **common)
    assert sizes == [2, 2]
    sizes.clear()
    run(tmp_path / "cached", **common, **{"ssl.grad_cache_chunk": 1})
    assert sizes == [1] * 8
    a, b = scalars(tmp_path / "one_pass", "train/loss_total"), scalars(tmp_path / "cached", "train/loss_total")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    # The same gradients: step 1's norm to float summation order; step 2's after weights that Adam moved by up to
    # ~1e-4 where a gradient is pure rounding noise (its eps 1e-8 turns that into O(lr) steps).
    na, nb = scalars(tmp_path / "one_pass", "train/grad_norm"), scalars(tmp_path / "cached", "train/grad_norm")
    assert nb[1] == pytest.approx(na[1], rel=1e-6) and nb[2] == pytest.approx(na[2], rel=1e-4), (na, nb)
    wa = torch.load(tmp_path / "one_pass" / "model_swinvit.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "cached" / "model_swinvit.pt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"gradient caching vs one pass after 2 steps: max |weight difference| {worst:.2e} (lr 1e-3)")
    assert worst < 3e-4


def test_old_checkpoints_are_pruned_and_last_points_at_the_newest(tmp_path):
    """train.keep_checkpoints step folders are kept (older ones deleted as new ones complete), plus best/;
    checkpoints/last is a relative link to the newest, and --resume auto picks that one."""
    from ssl3d.checkpoint import resolve_resume

    logdir = tmp_path / "run"
    run(logdir, **{"train.num_steps": 3, "train.eval_num": 1, "train.keep_checkpoints": 2})
    ckpts = logdir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == [
        "best",
        "last",
        "step_00000002",
        "step_00000003",
    ]
    assert not list(ckpts.glob(".*"))  # no temporary folder or link left behind
    assert (ckpts / "last").is_symlink() and os.readlink(ckpts / "last") == "step_00000003"
    assert (ckpts / "last" / "COMPLETE").is_file()
    assert resolve_resume("auto", ckpts) == ckpts / "step_00000003"
