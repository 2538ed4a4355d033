"""``ssl3d finetune`` / ``ssl3d probe`` end to end on the demo's label maps: bad input refused before anything
starts, a run that writes Dice, overlays and checkpoints, an exact resume, and a comparison table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import TINY_RUN

from ssl3d.checkpoint import export_swinvit
from ssl3d.cli import main
from ssl3d.config import Config, ModelConfig
from ssl3d.data.demo import write_demo_dataset
from ssl3d.model import build_model
from ssl3d.tasks import FINETUNE, get_task

RUN = {**TINY_RUN, "train.eval_num": 2, "optim.warmup_steps": 1, "optim.lr": 1e-3, "finetune.sw_batch_size": 4}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_volumes=4, shape=(64, 64, 48))


def flags(logdir: Path, steps: int, **extra) -> list[str]:
    return [f"--set={k}={json.dumps(v)}" for k, v in {**RUN, "train.num_steps": steps, **extra}.items()] + [
        f"--set=train.logdir={logdir}"
    ]


def export(tmp_path: Path, feature_size: int = 12) -> Path:
    torch.manual_seed(0)
    m = ModelConfig(feature_size=feature_size, depths=(1, 1, 1, 1))
    return export_swinvit(build_model(m, 16).state_dict(), tmp_path / "pre" / "model_swinvit.pt", Config(model=m), 5)


def write_list(path: Path, entries: list[dict], labels: dict | None = None) -> Path:
    doc = {"training": entries, "validation": entries[:1]}
    if labels is not None:
        doc["labels"] = labels
    path.write_text(json.dumps(doc))
    return path


def refused(capsys, args: list[str], logdir: Path) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssl3d: error: "), err
    assert not logdir.exists()  # nothing started
    return err[0]


def test_bad_input_is_one_line_exit_2_and_nothing_starts(demo, tmp_path, capsys) -> None:
    root = demo.parent
    doc = json.loads(demo.read_text())
    run = tmp_path / "run"
    # 1. A pre-training list: images only.
    images_only = write_list(tmp_path / "images.json", [{"image": str(root / e["image"])} for e in doc["training"]])
    line = refused(capsys, ["finetune", "--datalist", str(images_only), *flags(run, 2)], run)
    assert "images.json" in line and 'has no "label"' in line
    # 2. A label map on another grid than its image.
    img = nib.load(root / doc["training"][0]["image"])
    small = tmp_path / "small_label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), img.affine), small)
    entries = [{"image": str(root / doc["training"][0]["image"]), "label": str(small)}]
    line = refused(
        capsys,
        [
            "finetune",
            "--datalist",
            str(write_list(tmp_path / "s.json", entries, {"0": "bg", "1": "a"})),
            *flags(run, 2),
        ],
        run,
    )
    assert "small_label.nii.gz" in line and "shape [10, 10, 10]" in line
    # 3. A label value the network has no output for (the demo has 5 classes: 0-4).
    seven = tmp_path / "seven.nii.gz"
    lab = np.asarray(nib.load(root / doc["training"][0]["label"]).dataobj).copy()
    lab[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(lab, img.affine), seven)
    entries = [{"image": str(root / doc["training"][0]["image"]), "label": str(seven)}]
    line = refused(
        capsys,
        ["probe", "--datalist", str(write_list(tmp_path / "v.json", entries, doc["labels"])), *flags(run, 2)],
        run,
    )
    assert "seven.nii.gz" in line and "value 7 outside the classes 0..4" in line
    # 4. An export whose feature size differs from the one asked for.
    weights = export(tmp_path, feature_size=24)
    line = refused(capsys, ["finetune", "--datalist", str(demo), "--init", str(weights), *flags(run, 2)], run)
    assert "model_swinvit.pt: feature_size 24" in line and "model.feature_size is 12" in line


def tags(logdir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    out = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    out |= {t: [] for t in acc.Tags()["images"]}
    return out


def test_finetune_from_an_export_logs_dice_and_overlays_and_resumes_exactly(demo, tmp_path, capsys) -> None:
    weights = export(tmp_path)
    common = ["finetune", "--datalist", str(demo), "--init", str(weights)]
    # A constant rate: the same learning rates whether a run is planned for 2 or 4 steps. SGD with momentum (its
    # buffer must survive the resume): Adam turns rounding noise in near-zero gradients (the decoder block on the
    # one-token bottleneck) into lr-sized steps, which would hide a real difference behind a loose tolerance.
    extra = {"optim.schedule": "constant", "optim.name": "sgd", "optim.lr": 0.05}
    whole = tmp_path / "whole"
    assert main([*common, *flags(whole, 4, **extra)]) == 0
    out = capsys.readouterr().out
    assert f"encoder from {weights} (" in out and "validation mean Dice" in out
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["init_tensors"] > 0 and summary["labelled"] == 3 and summary["steps"] == 4
    assert 0.0 <= summary["validation"]["mean_dice"] <= 1.0 and set(summary["validation"]) >= {"liver", "spine"}
    logged = tags(whole)
    assert len(logged["Validation/mean_dice"]) == 2 and len(logged["train/loss_total"]) == 4
    assert {"Validation/image", "Validation/label", "Validation/prediction"} <= set(logged)
    png = Image.open(whole / "images" / "validation_overlay_step_00000004.png")
    assert png.mode == "RGB" and png.width > 2 * png.height  # image | label | prediction
    assert (whole / "checkpoints" / "best").is_dir() and (whole / "model_best.pt").is_file()

    split = tmp_path / "split"
    assert main([*common, *flags(split, 2, **extra)]) == 0
    assert main([*common, *flags(split, 4, **extra), "--resume", "auto"]) == 0
    assert "resumed from" in capsys.readouterr().out
    a = torch.load(whole / "model_final.pt", weights_only=True)["state_dict"]
    b = torch.load(split / "model_final.pt", weights_only=True)["state_dict"]
    # The same losses; weights equal up to the summation order of multi-threaded CPU kernels in a fresh process.
    assert tags(split)["train/loss_total"] == pytest.approx(logged["train/loss_total"], rel=1e-6)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=k)

    # Preempted (a real SIGTERM to this process after step 1, between validations): a checkpoint at step 1, exit 4;
    # the same command with --resume auto continues from it to the same losses.
    preempted = tmp_path / "preempted"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL3D_SIGTERM_AT_STEP", "1")
        assert main([*common, *flags(preempted, 4, **extra)]) == 4
    err = capsys.readouterr().err
    assert "preempted by SIGTERM (this rank): every rank stopped after step 1 of 4" in err, err
    assert sorted(p.name for p in (preempted / "checkpoints").iterdir() if p.name.startswith("step")) == [
        "step_00000001"
    ]
    assert main([*common, *flags(preempted, 4, **extra), "--resume", "auto"]) == 0
    assert "step_00000001 at step 1" in capsys.readouterr().out  # resumed from the preemption's checkpoint
    assert tags(preempted)["train/loss_total"] == pytest.approx(logged["train/loss_total"], rel=1e-6)
    c = torch.load(preempted / "model_final.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=0, atol=2e-5, msg=k)


def test_comparison_over_inits_and_seeds_writes_one_table(demo, tmp_path, capsys) -> None:
    weights = export(tmp_path)
    root = tmp_path / "cmp"
    args = ["probe", "--datalist", str(demo), "--init", str(weights), "--init", "none", "--seeds", "0,1"]
    args += ["--labelled", "2", *flags(root, 1, **{"train.eval_num": 1})]
    assert main(args) == 0
    doc = json.loads((root / "comparison.json").read_text())
    assert len(doc["runs"]) == 4 and len(doc["table"]) == 2
    assert {(t["init"], t["labelled"]) for t in doc["table"]} == {("pre", 2), ("none", 2)}
    row = next(t for t in doc["table"] if (t["init"], t["labelled"]) == ("none", 2))
    runs = [r["final_dice"] for r in doc["runs"] if (r["init"], r["labelled"]) == ("none", 2)]
    assert row["final_dice_mean"] == pytest.approx(np.mean(runs)) and row["seeds"] == [0, 1]
    assert "| none | 2 | 2 |" in (root / "comparison.md").read_text()
    assert Image.open(root / "comparison.png").size == (760, 480)


def test_finetune_fit_memory_applies_the_chosen_policy(
    demo, tmp_path, capsys, monkeypatch, keep_pytest_allocator
) -> None:
    """``ssl3d finetune --fit-memory``: a budget one byte under the run as configured (no checkpointing) makes the
    planner choose a rung, and the SwinUNETR that trains carries exactly that rung's checkpointed modules."""
    from ssl3d.memory import apply_activation_checkpointing, checkpointed_modules
    from ssl3d.memory.estimate import estimate_memory
    from ssl3d.memory.plan import DEFAULT_LADDER
    from ssl3d.step import StepSettings
    from ssl3d.trainer import Trainer

    classes = len(json.loads(Path(demo).read_text())["labels"])
    model = ModelConfig(feature_size=12, depths=(1, 1, 1, 1))
    step = StepSettings(model, tuple(RUN["data.roi"]), 1, 1, "fp32", task=FINETUNE, num_classes=classes)
    budget = estimate_memory(step, device="cpu").total - 1
    applied: dict = {}
    fit = Trainer.fit

    def recording_fit(self):  # what the model the run trains really carries
        applied["modules"] = checkpointed_modules(self.model)
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    logdir = tmp_path / "fit"
    args = ["finetune", "--datalist", str(demo), f"--fit-memory={budget}", *flags(logdir, 1)]
    assert main([*args, '--set=train.precision="fp32"', '--set=train.device="cpu"']) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "--fit-memory" in x)
    name = re.search(r"activation checkpointing '([^']+)'", line)[1]
    assert name != "none" and "no gradient caching" in line
    expected = get_task("finetune").build_model(model, num_classes=classes)
    apply_activation_checkpointing(expected, dict(DEFAULT_LADDER)[name])
    assert applied["modules"] == checkpointed_modules(expected) != {}
    assert (logdir / "model_final.pt").is_file()
