"""Fine-tuning and probing: the segmentation task on the pre-training's machinery.

The model is built, initialised and given the memory tools exactly as in pre-training (fused attention ->
activation checkpointing -> strategy wrap/shard -> optimizer), and one step is forward + Dice/CE loss ->
``Strategy.backward`` -> ``Strategy.step``: the loop never asks which backend it has, so every preset in
``ds_configs/`` and ``--fit-memory`` serve fine-tuning too. Validation is MONAI's ``sliding_window_inference`` with
``DiceMetric`` per class; the best mean Dice is kept in ``checkpoints/best`` and ``model_best.pt``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from tqdm import tqdm

from ssl3d.checkpoint import CheckpointManager, atomic_torch_save, resolve_resume
from ssl3d.config import Config
from ssl3d.downstream.data import build_labelled_loaders
from ssl3d.downstream.datalist import LabelledData
from ssl3d.downstream.model import InitSource, build_downstream_model, load_encoder
from ssl3d.downstream.task import SegmentationTask
from ssl3d.errors import Preempted, TrainingStopped
from ssl3d.fault_injection import Faults
from ssl3d.logger import RunLogger
from ssl3d.memory import apply_activation_checkpointing
from ssl3d.model.attention import apply_fused_attention
from ssl3d.optim import build_optimizer, lr_at
from ssl3d.preemption import PreemptionFlag, StepBoundary
from ssl3d.step import run_step
from ssl3d.strategies import Strategy


@dataclasses.dataclass
class FinetuneState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_dice: float = -1.0
    best_step: int = 0
    bad_steps_in_row: int = 0
    first_loss: float | None = None
    last_loss: float | None = None


class SegmentationTrainer:
    def __init__(
        self, cfg: Config, strategy: Strategy, data: LabelledData, init: InitSource | None, faults: Faults | None = None
    ):
        self.cfg, self.strategy, self.data = cfg, strategy, data
        self.faults = faults if faults is not None else Faults.from_env()  # tests' planted faults; none in a run
        self.device = strategy.device
        self.logdir = Path(cfg.train.logdir)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = build_downstream_model(cfg.finetune.task, cfg.model, data.num_classes)
        self.init_tensors = load_encoder(model, init) if init is not None else 0
        if cfg.model.fused_attention:
            apply_fused_attention(model)
        policy = strategy.ds_config.activation_checkpointing if strategy.ds_config else None
        if not policy and cfg.model.use_checkpoint:
            policy = {"policy": "full"}
        if policy:
            apply_activation_checkpointing(model, policy)
        self.model, self.optimizer = strategy.setup(model, lambda params: build_optimizer(cfg.optim, params))
        f = cfg.finetune
        self.task = SegmentationTask(f.dice_weight, f.ce_weight, device=self.device)
        self.state = FinetuneState()
        self.checkpoints = CheckpointManager(self.logdir / "checkpoints", strategy, keep=cfg.train.keep_checkpoints)
        resume = resolve_resume(cfg.train.resume, self.logdir / "checkpoints")
        if resume is not None:
            self._resume(resume)
        s = self.state
        self.train_loader, self.val_loader = build_labelled_loaders(
            cfg, data, strategy.rank, strategy.world_size, s.epoch, s.batch_in_epoch
        )
        self.log = RunLogger(self.logdir, enabled=strategy.is_main)
        # Preemption signals and train.checkpoint_every_minutes, at step boundaries as in pre-training.
        self.preemption = PreemptionFlag(cfg.train.preempt_signals, strategy.rank)
        self.boundary = StepBoundary(
            strategy,
            self.preemption,
            cfg.train.checkpoint_every_minutes,
            lambda: self.checkpoints.save(self.state.step, self._extra()),
        )

    # -- one step ------------------------------------------------------------------------------------------
    def train_step(self, micro: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches: (mean loss, gradient norm)."""
        self.strategy.set_lr(lr_at(self.cfg.optim, self.state.step, self.cfg.train.num_steps))
        per_micro, result = run_step(
            self.model, self.task, micro, self.strategy, max_grad_norm=self.cfg.train.grad_clip
        )
        total = 0.0
        for losses in per_micro:
            total += float(losses["total"]) / len(per_micro)
        return total, result.grad_norm

    def _batches(self):
        while True:
            self.train_loader.set_epoch(self.state.epoch, self.state.batch_in_epoch)
            for batch in self.train_loader:
                self.state.batch_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # -- validation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Per-class and mean Dice (background excluded) over every validation volume, whole-volume inference."""
        self.model.eval()
        f, n = self.cfg.finetune, self.data.num_classes
        metric = DiceMetric(include_background=False, reduction="mean_batch", get_not_nans=False)
        shown = None
        for batch in self.val_loader:
            x, y = batch["image"].to(self.device), batch["label"].to(self.device)
            with self.strategy.autocast():
                logits = sliding_window_inference(
                    x, list(self.cfg.data.roi), f.sw_batch_size, self.model, overlap=f.sw_overlap
                )
            pred = logits.float().argmax(1, keepdim=True)  # [1, 1, H, W, D]
            onehot = torch.nn.functional.one_hot(pred[:, 0].long(), n).permute(0, 4, 1, 2, 3)
            truth = torch.nn.functional.one_hot(y[:, 0].long(), n).permute(0, 4, 1, 2, 3)
            metric(onehot, truth)
            if shown is None:
                shown = (x[0], y[0], pred[0])
        per_class = metric.aggregate()  # [classes - 1], NaN for a class absent from every volume
        self.model.train()
        out = {name: float(v) for name, v in zip(self.data.class_names[1:], per_class.cpu())}
        finite = [v for v in out.values() if math.isfinite(v)]
        out["mean_dice"] = sum(finite) / len(finite) if finite else float("nan")
        if shown is not None:
            self.log.overlay("Validation", *shown, num_classes=n, step=self.state.step)
        return out

    # -- state ---------------------------------------------------------------------------------------------
    def _extra(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.state),
            "torch_rng": torch.get_rng_state(),
            "config": json.dumps(self.cfg.to_dict()),
            "strategy": self.strategy.name,
            "world_size": self.strategy.world_size,
        }

    def _resume(self, directory: Path) -> None:
        saved = self.strategy.load_extra(directory)
        if saved.get("strategy") != self.strategy.name or int(saved.get("world_size", 0)) != self.strategy.world_size:
            raise TrainingStopped(
                f"{directory} was written by {saved.get('strategy')} on {saved.get('world_size')} ranks; fine-tuning "
                f"resumes with the same strategy and world size (this run: {self.strategy.name} on "
                f"{self.strategy.world_size}); start a new run with --set finetune.init={directory} instead"
            )
        extra = self.strategy.load(directory)
        names = {f.name for f in dataclasses.fields(FinetuneState)}
        self.state = FinetuneState(**{k: extra[k] for k in names if k in extra})
        torch.set_rng_state(extra["torch_rng"])
        if self.strategy.is_main:
            print(f"ssl3d: resumed from {directory} at step {self.state.step}")

    def _save_weights(self, name: str) -> Path:
        weights = self.strategy.full_state_dict()  # collective
        path = self.logdir / name
        if self.strategy.is_main:
            atomic_torch_save({"state_dict": weights, "num_classes": self.data.num_classes}, path)
        return path

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, s, strategy = self.cfg, self.state, self.strategy
        if strategy.is_main:
            self.logdir.mkdir(parents=True, exist_ok=True)
            (self.logdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        batches = self._batches()
        bar = tqdm(
            total=cfg.train.num_steps,
            initial=s.step,
            desc=cfg.finetune.task,
            unit="step",
            disable=not (strategy.is_main and cfg.train.progress),
            dynamic_ncols=True,
        )
        self.model.train()
        self.boundary.start()
        with self.preemption:
            last_val = self._loop(batches, bar)
        bar.close()
        return self._finish(last_val)

    def _loop(self, batches: Any, bar: Any) -> dict[str, float]:
        cfg, s, strategy = self.cfg, self.state, self.strategy
        last_val: dict[str, float] = {}
        while s.step < cfg.train.num_steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]
            loss, norm = self.train_step(micro)
            dt = time.perf_counter() - t0
            s.step += 1
            self.faults.after_step(s.step, strategy.rank)
            if math.isfinite(loss) and math.isfinite(norm):
                s.bad_steps_in_row = 0
            else:
                s.bad_steps_in_row += 1
                warnings.warn(f"step {s.step}: non-finite loss or gradient norm; update skipped")
                if s.bad_steps_in_row >= cfg.train.max_bad_steps:
                    bar.close()
                    raise TrainingStopped(f"step {s.step}: {s.bad_steps_in_row} non-finite steps in a row")
            s.first_loss = loss if s.first_loss is None else s.first_loss
            s.last_loss = loss
            if s.step % cfg.train.log_every == 0:
                lr = lr_at(cfg.optim, s.step - 1, cfg.train.num_steps)
                scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": norm, "perf/step_time_s": dt}
                self.log.scalars(scalars | {f"memory/{k}": v for k, v in strategy.memory_report().items()}, s.step)
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
            saved = s.step % cfg.train.eval_num == 0 or s.step == cfg.train.num_steps
            if saved:
                last_val = self.validate()
                self.log.scalars({f"Validation/dice_{k}": v for k, v in last_val.items() if k != "mean_dice"}, s.step)
                self.log.scalars({"Validation/mean_dice": last_val["mean_dice"]}, s.step)
                improved = last_val["mean_dice"] > s.best_dice
                if improved:
                    s.best_dice, s.best_step = last_val["mean_dice"], s.step
                self.checkpoints.save(s.step, self._extra())
                if improved:
                    self.checkpoints.save_best(self._extra())
                    self._save_weights("model_best.pt")
                self.log.flush()
            if self.boundary(s.step, saved) and s.step < cfg.train.num_steps:
                bar.close()
                self.log.flush()
                raise Preempted(
                    f"{self.preemption.describe()}: every rank stopped after step {s.step} of {cfg.train.num_steps}; "
                    f"checkpoint {self.checkpoints.latest()}; run the same command with --resume auto to continue"
                )
        return last_val

    def _finish(self, last_val: dict[str, float]) -> dict[str, Any]:
        cfg, s, strategy = self.cfg, self.state, self.strategy
        self._save_weights("model_final.pt")
        summary: dict[str, Any] = {}
        if strategy.is_main:
            summary = {
                "task": cfg.finetune.task,
                "init": cfg.finetune.init,
                "init_tensors": self.init_tensors,
                "labelled": len(self.data.training),
                "labelled_cases": [e["image"] for e in self.data.training],
                "validation_cases": len(self.data.validation),
                "steps": s.step,
                "seed": cfg.train.seed,
                "first_loss": s.first_loss,
                "last_loss": s.last_loss,
                "validation": last_val,
                "best_mean_dice": s.best_dice,
                "best_step": s.best_step,
                "memory": strategy.memory_report(),
            }
            (self.logdir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.log.close()
        strategy.barrier()
        return summary
