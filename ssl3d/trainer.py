"""The one training loop, for every task (pre-training, fine-tuning, probing). It talks only to a ``Strategy``,
never asks which backend runs it, and asks its ``Task`` (``ssl3d.tasks``) for everything that differs between tasks.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` volumes x ``num_samples`` crops; the task's
objective turns each into losses and gradients (pre-training: two corrupted, rotated views in ONE batched pass).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ssl3d.checkpoint import CheckpointManager
from ssl3d.config import Config
from ssl3d.data.faults import BAD, BadVolumeError
from ssl3d.errors import Preempted, TrainingStopped, is_out_of_memory
from ssl3d.fault_injection import Faults
from ssl3d.logger import RunLogger
from ssl3d.memory import apply_activation_checkpointing
from ssl3d.model.attention import apply_fused_attention
from ssl3d.model.compile import compile_regions
from ssl3d.optim import build_optimizer, lr_at
from ssl3d.preemption import PreemptionFlag, StepBoundary
from ssl3d.step import run_step
from ssl3d.strategies import Strategy, read_checkpoint_weights
from ssl3d.strategies.precision import StepResult
from ssl3d.tasks import PretrainTask, Task
from ssl3d.tasks.base import mean_losses

MAX_LOADER_RESTARTS = 3


@dataclass
class LoopState:
    """Everything besides model, optimizer and the task's own state that an exact resume needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed
    best: float | None = None  # the best validation value of the task's best_metric so far
    best_step: int = 0
    bad_steps_in_row: int = 0
    skipped_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # first/last losses for the summary


def _loop_state(extra: dict[str, Any]) -> LoopState:
    """The loop state saved in a checkpoint (also those written before the best value had one name)."""
    known = {f.name: extra[f.name] for f in dataclasses.fields(LoopState) if f.name in extra}
    if "best" not in known:
        old = extra.get("best_val", extra.get("best_dice"))
        known["best"] = None if old is None or old in (math.inf, -1.0) else float(old)
    if isinstance(known.get("history"), str):  # checkpoints written before the loop state was saved as it is
        known["history"] = json.loads(known["history"])
    return LoopState(**known)


class Trainer:
    """``Trainer(cfg, strategy, task).fit()``: one run of ``task`` (pre-training when not given)."""

    def __init__(self, cfg: Config, strategy: Strategy, task: Task | None = None, faults: Faults | None = None):
        self.cfg = cfg
        self.strategy = strategy
        self.task = task = task if task is not None else PretrainTask()
        self.faults = faults if faults is not None else Faults.from_env()  # tests' planted faults; none in a run
        self.device = strategy.device
        self.logdir = Path(cfg.train.logdir)
        task.prepare(cfg, strategy)

        # Same initial weights on every rank (sharded backends rely on it).
        torch.manual_seed(cfg.train.seed)
        policy = strategy.ds_config.activation_checkpointing if strategy.ds_config else None
        if not policy and cfg.model.use_checkpoint:
            policy = {"policy": "full"}
        model = task.run_model(cfg, strategy.is_main)
        # Memory tools, applied from outside the model before the strategy wraps it:
        # fused attention -> activation checkpointing -> regional compile -> (strategy) wrap / shard -> optimizer.
        if cfg.model.fused_attention:
            apply_fused_attention(model)
        if policy:
            apply_activation_checkpointing(model, policy)
        if cfg.model.compile:
            compile_regions(model)
        self.model, self.optimizer = strategy.setup(model, lambda params: build_optimizer(cfg.optim, params))
        self.objective = task.run_objective(cfg, self.device, strategy.rank)

        self.state = LoopState()
        self.checkpoints = CheckpointManager(
            self.logdir / "checkpoints",
            strategy,
            keep=cfg.train.keep_checkpoints,
            on_shard_saved=self.faults.after_shard_saved,
        )
        self.bad_volumes: dict[str, int] = {}  # "<path>: <reason>" -> times replaced (this rank)
        resume = self.checkpoints.resume_point(cfg.train.resume)  # verified: a damaged one is never trusted
        if resume is not None:
            self._resume(resume)
        s = self.state
        self.train_loader, self.val_loader = task.loaders(cfg, strategy.rank, strategy.world_size, s.epoch)
        if s.batch_in_epoch > self.train_loader.batches_per_epoch:
            # Only after a resume with another world size or batch size (_data_position): the volumes consumed
            # include the old partition's padding, more than this epoch holds: the epoch is done.
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
        self.train_loader.set_epoch(s.epoch, s.batch_in_epoch)
        self.log = RunLogger(self.logdir, enabled=strategy.is_main)
        self.preemption = PreemptionFlag(cfg.train.preempt_signals, strategy.rank)
        self.boundary = StepBoundary(strategy, self.preemption, cfg.train.checkpoint_every_minutes, self.save)

    # -- one step ------------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[Any]) -> tuple[dict[str, float], StepResult]:
        """One optimizer step over ``grad_accum`` micro-batches; returns mean losses and what the strategy did."""
        lr = lr_at(self.cfg.optim, self.state.step, self.cfg.train.num_steps)
        self.strategy.set_lr(lr)
        per_micro, result = run_step(
            self.model,
            self.objective,
            micro_batches,
            self.strategy,
            max_grad_norm=self.cfg.train.grad_clip,
            loss_hook=self.faults.loss_hook(self.state.step + 1),
        )
        return {**mean_losses(per_micro, self.task.loss_keys), "lr": lr}, result

    # -- data ----------------------------------------------------------------------------------------------
    def _batches(self):
        """Endless batches; the (epoch, batch) position is tracked so a resume continues the data order.

        A loader worker that dies (out of host memory, a crashing reader) does not end the run: the loader is
        restarted at the same position, up to ``MAX_LOADER_RESTARTS`` times in a row."""
        restarts = 0
        while True:
            self.train_loader.set_epoch(self.state.epoch, self.state.batch_in_epoch)
            try:
                for batch in self.train_loader:
                    self.state.batch_in_epoch += 1
                    restarts = 0
                    self.note_bad_volumes(batch)
                    yield self.task.train_batch(batch, self.device)
            except BadVolumeError:
                raise
            except RuntimeError as exc:
                if "DataLoader worker" not in str(exc) or restarts >= MAX_LOADER_RESTARTS:
                    raise
                restarts += 1
                warnings.warn(f"a data loader worker died ({str(exc).splitlines()[0]}); restarting the loader")
                self.train_loader.restart_workers()
                continue
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def note_bad_volumes(self, batch: dict[str, Any]) -> None:
        """Count the unusable volumes a batch stands in for (named once, counted over the run)."""
        lines = batch.get(BAD, [])
        for line in [lines] if isinstance(lines, str) else lines:
            if line:
                if line not in self.bad_volumes:
                    warnings.warn(f"skipping unusable volume {line}")
                self.bad_volumes[line] = self.bad_volumes.get(line, 0) + 1

    # -- validation ----------------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """The task's validation metrics, every rank its share; the model is back in training mode after."""
        self.model.eval()
        try:
            return self.task.validate(self)
        finally:
            self.model.train()

    # -- state ---------------------------------------------------------------------------------------------
    def _extra(self) -> dict[str, Any]:
        extra = {
            **dataclasses.asdict(self.state),
            **self.task.state_dict(),
            "task": self.task.name,
            "torch_rng": torch.get_rng_state(),
            "config": json.dumps(self.cfg.to_dict()),
            "strategy": self.strategy.name,
            "world_size": self.strategy.world_size,
        }
        if torch.cuda.is_available():
            extra["cuda_rng"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return extra

    def _resume(self, directory: Path) -> None:
        """Exact resume by the backend that wrote the checkpoint, at any world size it can reshard to (FSDP's DCP,
        DeepSpeed ZeRO-1/2/3 through the universal checkpoint); otherwise its weights only.

        Switching backend (or what the backend cannot reshard, ``Strategy.resume_problem``) restarts the optimizer
        from the consolidated weights, with a warning; the step, data position and random streams carry over."""
        saved = self.strategy.load_extra(directory)
        if saved.get("task", self.task.name) != self.task.name:
            raise TrainingStopped(
                f"{directory} is a {saved.get('task')} checkpoint and this run is {self.task.name}; resume a "
                f"{self.task.name} run, or start one from its weights (finetune.init or model.init_weights)"
            )
        same_backend = saved.get("strategy", self.strategy.name) == self.strategy.name
        saved_world = int(saved.get("world_size", self.strategy.world_size))
        if same_backend:
            problem = self.strategy.resume_problem(directory, saved_world)
        else:
            problem = f"another backend ({saved.get('strategy')})"
        if problem is None:
            extra = self.strategy.load(directory)
        else:
            if self.strategy.is_main:
                warnings.warn(
                    f"{directory} was written by {saved.get('strategy')} at world size {saved.get('world_size')}; "
                    f"this run is {self.strategy.name} at world size {self.strategy.world_size} and cannot load its "
                    f"optimizer state ({problem}): loading its weights with a FRESH optimizer (moments restart; the "
                    "loss curve will not match an uninterrupted run)"
                )
            self.strategy.load_model_weights(read_checkpoint_weights(directory))
            extra = saved
        self.state = s = _loop_state(extra)
        s.batch_in_epoch = self._data_position(extra, saved_world)
        same_layout = saved_world == self.strategy.world_size
        self.task.load_state_dict(extra, same_layout=same_layout, step=s.step, is_main=self.strategy.is_main)
        torch.set_rng_state(extra["torch_rng"])
        if extra.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(extra["cuda_rng"], self.device)
        if self.strategy.is_main:
            print(f"ssl3d: resumed from {directory} at step {s.step} (epoch {s.epoch}, batch {s.batch_in_epoch})")

    def _data_position(self, extra: dict[str, Any], saved_world: int) -> int:
        """The batch to continue from in this epoch. The saved position counts one rank's batches; with another
        world size or batch size, the volumes the whole run consumed map to this run's batches (rounded down,
        so no volume of the epoch is skipped; the order within the epoch follows the new partition)."""
        old_batch = json.loads(extra.get("config", "{}")).get("train", {}).get("batch_size", self.cfg.train.batch_size)
        position = int(extra["batch_in_epoch"])
        if (old_batch, saved_world) == (self.cfg.train.batch_size, self.strategy.world_size):
            return position
        consumed = position * int(old_batch) * saved_world  # volumes of this epoch, all ranks
        new = consumed // (self.cfg.train.batch_size * self.strategy.world_size)
        if self.strategy.is_main:
            print(
                f"ssl3d: data position: batch {position} of {old_batch} volumes x {saved_world} ranks -> batch {new} "
                f"of {self.cfg.train.batch_size} x {self.strategy.world_size}"
            )
        return new

    def _last_checkpoint_text(self) -> str:
        last = self.checkpoints.latest()
        return f"last good checkpoint: {last}" if last else "no checkpoint written yet"

    def _out_of_memory_help(self, exc: BaseException) -> str:
        """What ran out, what the estimator expected, and what the planner suggests (one message, no traceback)."""
        from ssl3d.memory.plan import out_of_memory_help

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        advice = out_of_memory_help(self.cfg, self.strategy, self.task)
        return f"step {self.state.step + 1}: out of memory ({first}); {advice}; {self._last_checkpoint_text()}"

    def save(self) -> Path:
        return self.checkpoints.save(self.state.step, self._extra())

    # -- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, s, strategy = self.cfg, self.state, self.strategy
        if strategy.is_main:
            self.logdir.mkdir(parents=True, exist_ok=True)
            (self.logdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        batches = self._batches()
        crops = cfg.train.batch_size * cfg.data.num_samples * cfg.train.grad_accum * strategy.world_size
        volumes_per_step = crops * self.task.views_per_crop
        bar = tqdm(
            total=cfg.train.num_steps,
            initial=s.step,
            desc=self.task.title,
            unit="step",
            disable=not (strategy.is_main and cfg.train.progress),
            dynamic_ncols=True,
        )
        self.model.train()
        last_val: dict[str, float] = {}
        self.boundary.start()
        with self.preemption:
            return self._loop(batches, bar, volumes_per_step, last_val)

    def _loop(self, batches: Any, bar: Any, volumes_per_step: int, last_val: dict[str, float]) -> dict[str, Any]:
        cfg, s, strategy = self.cfg, self.state, self.strategy
        while s.step < cfg.train.num_steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]
            try:
                losses, result = self.train_step(micro)
            except RuntimeError as exc:  # torch.OutOfMemoryError, or cuDNN/cuBLAS/NCCL running out under their names
                if not is_out_of_memory(exc):
                    raise
                bar.close()
                del micro
                raise TrainingStopped(self._out_of_memory_help(exc)) from None
            strategy.synchronize()  # the step's time is its device's time
            dt = time.perf_counter() - t0
            s.step += 1
            self.faults.after_step(s.step, strategy.rank)
            norm = result.grad_norm
            if math.isfinite(norm) and math.isfinite(losses["total"]):
                s.bad_steps_in_row = 0
            elif math.isfinite(losses["total"]) and result.overflow:
                # An overflow the strategy expects (it skipped the update and adapted:
                # normal while it settles); only a strategy that says it cannot go on ends the run.
                s.skipped_steps += 1
                if result.stop:
                    bar.close()
                    raise TrainingStopped(f"step {s.step}: {result.stop}; {self._last_checkpoint_text()}")
            else:
                s.bad_steps_in_row += 1
                s.skipped_steps += 1
                warnings.warn(f"step {s.step}: non-finite loss or gradient norm; update skipped")
                if s.bad_steps_in_row >= cfg.train.max_bad_steps:
                    bar.close()
                    raise TrainingStopped(
                        f"step {s.step}: {s.bad_steps_in_row} non-finite steps in a row (train.max_bad_steps); "
                        f"{self._last_checkpoint_text()}; lower optim.lr or set train.grad_clip, then resume with "
                        "--resume auto"
                    )
            keys = self.task.loss_keys
            record = {"step": s.step, **{k: losses[k] for k in keys}}
            s.history = (s.history[:1] + [record])[-2:] if s.history else [record]
            if s.step % cfg.train.log_every == 0 or s.step == cfg.train.num_steps:
                scalars = {f"train/loss_{k}": losses[k] for k in keys}
                scalars |= {"train/lr": losses["lr"], "train/grad_norm": norm, "perf/step_time_s": dt}
                scalars["train/skipped_steps"] = s.skipped_steps
                scalars |= result.scalars
                scalars["perf/volumes_per_s"] = volumes_per_step / dt
                scalars |= {f"memory/{k}": v for k, v in strategy.memory_report().items()}
                self.log.scalars(scalars, s.step)
            bar.set_postfix(loss=f"{losses['total']:.4f}", lr=f"{losses['lr']:.2e}")
            bar.update(1)
            saved = False
            if s.step % cfg.train.eval_num == 0 or s.step == cfg.train.num_steps:
                last_val = self.validate()
                self.log.scalars(self.task.validation_scalars(last_val), s.step)
                value = last_val[self.task.best_metric]
                better = (lambda a, b: a > b) if self.task.higher_is_better else (lambda a, b: a < b)
                improved = math.isfinite(value) and (s.best is None or better(value, s.best))
                if improved:
                    s.best, s.best_step = value, s.step
                self.save()
                saved = True
                if improved:
                    self.checkpoints.save_best(self._extra())
                    self.task.on_best(self)
                self.log.flush()
            if self.boundary(s.step, saved) and s.step < cfg.train.num_steps:  # (done anyway at the last step)
                bar.close()
                self.log.flush()
                raise Preempted(
                    f"{self.preemption.describe()}: every rank stopped after step {s.step} of {cfg.train.num_steps}; "
                    f"checkpoint {self.checkpoints.latest()}; run the same command with --resume auto to continue"
                )
        bar.close()
        return self.finish(last_val)

    def finish(self, last_val: dict[str, float]) -> dict[str, Any]:
        """The task's files (e.g. the encoder for fine-tuning, the final network) and a summary next to the logs."""
        weights = self.strategy.full_state_dict()  # collective
        bad = self.strategy.sum_counts(self.bad_volumes)
        summary: dict[str, Any] = {}
        if self.strategy.is_main:
            summary = self.task.finish(self, weights, last_val)
            summary |= {
                "skipped_steps": self.state.skipped_steps,
                "bad_volumes": bad,
                "memory": self.strategy.memory_report(),
            }
            (self.logdir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.log.close()
        self.strategy.barrier()
        return summary
