"""The training loop. It talks only to a ``Strategy`` and never asks which backend runs it.

One optimizer step = ``grad_accum`` micro-batches; each micro-batch is ``batch_size`` volumes x ``num_samples``
crops, turned into two rotated and corrupted views that go through ONE batched forward pass.
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

from ssl3d.checkpoint import CheckpointManager, export_swinvit, load_init_weights
from ssl3d.config import Config
from ssl3d.data import build_loaders, resolve_data_config
from ssl3d.data.faults import BAD, BadVolumeError
from ssl3d.errors import Preempted, TrainingStopped, is_out_of_memory
from ssl3d.fault_injection import Faults
from ssl3d.logger import RunLogger, foreground_fraction
from ssl3d.memory import apply_activation_checkpointing
from ssl3d.model import build_model
from ssl3d.model.attention import apply_fused_attention
from ssl3d.optim import build_optimizer, lr_at
from ssl3d.preemption import PreemptionFlag, StepBoundary
from ssl3d.ssl import LossWeights, MaskingParams, SSLLoss, make_views
from ssl3d.ssl.monitors import collapse_monitors
from ssl3d.ssl.task import LOSS_KEYS, SSLTask
from ssl3d.step import run_step
from ssl3d.strategies import Strategy, read_checkpoint_weights
from ssl3d.strategies.precision import StepResult

MAX_LOADER_RESTARTS = 3


@dataclass
class LoopState:
    """Everything besides model/optimizer that an exact resume needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed
    best_val: float = math.inf
    bad_steps_in_row: int = 0
    skipped_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # first/last losses for the summary


def prepare_demo_data(cfg: Config, strategy: Strategy) -> None:
    """No datalist configured: rank 0 writes the built-in synthetic CT volumes once, then all ranks use them."""
    if cfg.data.datalists:
        return
    if strategy.is_main:
        resolve_data_config(cfg)
    strategy.barrier()
    cfg.data = resolve_data_config(cfg)


def generator_device(state: torch.Tensor, saved: str | None) -> str:
    """The device type a random generator's saved state belongs to: the recorded one, else told by its size (a CUDA
    generator's state is 16 bytes, a CPU one's 5056; checkpoints written before the type was recorded)."""
    if saved:
        return saved
    return "cuda" if state.numel() == 16 else "cpu"


class Trainer:
    def __init__(self, cfg: Config, strategy: Strategy, faults: Faults | None = None):
        self.cfg = cfg
        self.strategy = strategy
        self.faults = faults if faults is not None else Faults.from_env()  # tests' planted faults; none in a run
        self.device = strategy.device
        self.logdir = Path(cfg.train.logdir)
        prepare_demo_data(cfg, strategy)

        # Same initial weights on every rank (sharded backends rely on it).
        torch.manual_seed(cfg.train.seed)
        policy = strategy.ds_config.activation_checkpointing if strategy.ds_config else None
        if not policy and cfg.model.use_checkpoint:
            policy = {"policy": "full"}
        # MONAI's own flag stays off: checkpointing is applied from outside, one mechanism for every backend.
        model = build_model(dataclasses.replace(cfg.model, use_checkpoint=False), cfg.ssl.contrastive_dim)
        if cfg.model.init_weights:
            missing = load_init_weights(model, Path(cfg.model.init_weights))
            if strategy.is_main:
                print(f"ssl3d: initialised from {cfg.model.init_weights} ({len(missing)} tensors left as built)")
        # Memory tools, applied from outside the model before the strategy wraps it:
        # fused attention -> activation checkpointing -> (strategy) wrap / shard -> optimizer.
        if cfg.model.fused_attention:
            apply_fused_attention(model)
        if policy:
            apply_activation_checkpointing(model, policy)
        self.model, self.optimizer = strategy.setup(model, lambda params: build_optimizer(cfg.optim, params))
        self.loss_fn = SSLLoss(
            LossWeights(cfg.ssl.rotation_weight, cfg.ssl.contrastive_weight, cfg.ssl.reconstruction_weight),
            temperature=cfg.ssl.temperature,
        )
        self.masking = MaskingParams(cfg.ssl.max_drop, cfg.ssl.min_block, cfg.ssl.max_block)
        # Augmentation randomness: one stream per rank, on the model's device, saved in checkpoints.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.train.seed * 1000 + strategy.rank + 1)
        self.task = SSLTask(self.loss_fn, self.masking, self.generator, grad_cache_chunk=cfg.ssl.grad_cache_chunk)

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
        self.train_loader, self.val_loader = build_loaders(cfg, strategy.rank, strategy.world_size, s.epoch, 0)
        if s.batch_in_epoch > self.train_loader.batches_per_epoch:
            # Only after a resume with another world size or batch size (_data_position): the volumes consumed
            # include the old partition's padding, more than this epoch holds: the epoch is done.
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
        self.train_loader.set_epoch(s.epoch, s.batch_in_epoch)
        self.log = RunLogger(self.logdir, enabled=strategy.is_main)
        self.preemption = PreemptionFlag(cfg.train.preempt_signals, strategy.rank)
        self.boundary = StepBoundary(strategy, self.preemption, cfg.train.checkpoint_every_minutes, self.save)

    # -- one step ------------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[dict[str, float], StepResult]:
        """One optimizer step over ``grad_accum`` micro-batches; returns mean losses and what the strategy did."""
        lr = lr_at(self.cfg.optim, self.state.step, self.cfg.train.num_steps)
        self.strategy.set_lr(lr)
        per_micro, result = run_step(
            self.model,
            self.task,
            micro_batches,
            self.strategy,
            max_grad_norm=self.cfg.train.grad_clip,
            loss_hook=self.faults.loss_hook(self.state.step + 1),
        )
        sums = dict.fromkeys(LOSS_KEYS, 0.0)
        for losses in per_micro:
            for k in LOSS_KEYS:
                sums[k] += float(losses[k]) / len(per_micro)
        return {**sums, "lr": lr}, result

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
                    self._note_bad_volumes(batch)
                    yield batch["image"].to(self.device, non_blocking=True)
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

    def _note_bad_volumes(self, batch: dict[str, Any]) -> None:
        for line in batch.get(BAD, []):
            if line:
                if line not in self.bad_volumes:
                    warnings.warn(f"skipping unusable volume {line}")
                self.bad_volumes[line] = self.bad_volumes.get(line, 0) + 1

    # -- validation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean losses over the whole validation list, spread over all ranks; the same corruption every time."""
        self.model.eval()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.cfg.train.seed + 7919 * (self.strategy.rank + 1))
        totals = torch.zeros(len(LOSS_KEYS) + 1, dtype=torch.float64, device=self.device)
        masked = torch.zeros(2, dtype=torch.float64, device=self.device)  # L1 sum and count on corrupted voxels
        embeddings: list[torch.Tensor] = []  # collapse monitors (this rank's validation crops)
        first, best_content = None, 0.0
        for i, batch in enumerate(self.val_loader):
            if self.cfg.train.max_val_batches is not None and i >= self.cfg.train.max_val_batches:
                break
            x = batch["image"].to(self.device)
            self._note_bad_volumes(batch)
            # Every rank runs the same number of batches (sharded backends need it); crops of volumes repeated
            # to even out the ranks are marked invalid and left out of the mean.
            valid = batch.get("valid", torch.ones(x.shape[0], dtype=torch.bool)).to(self.device)
            views = make_views(x, gen, self.masking)
            with self.strategy.autocast():
                out = self.model(views.corrupted)
            n = int(valid.sum())
            if n:
                keep = torch.cat([valid, valid])  # both views
                losses = self.loss_fn(
                    out.rotation[keep].float(),
                    views.rot_labels[keep],
                    out.contrastive[keep].float(),
                    out.reconstruction[keep].float(),
                    views.views[keep],
                )
                row = [float(losses[k]) * n for k in LOSS_KEYS] + [n]
                totals += torch.tensor(row, device=self.device, dtype=torch.float64)
                changed = views.corrupted[keep] != views.views[keep]
                err = (out.reconstruction[keep].float() - views.views[keep].float()).abs()
                masked += torch.stack([(err * changed).sum(), changed.sum()]).to(torch.float64)
                embeddings.append(out.contrastive[keep].float())
                # The image shows the crop with the most content (the first one is often air at a body's edge).
                for j in valid.nonzero().flatten().tolist():
                    content = foreground_fraction(views.views[j])
                    if first is None or content > best_content:
                        best_content = content
                        first = (views.views[j].cpu(), views.corrupted[j].cpu(), out.reconstruction[j].float().cpu())
        self.strategy.all_reduce_sum(totals)
        self.strategy.all_reduce_sum(masked)
        self.model.train()
        count = max(float(totals[-1]), 1.0)
        result = {k: float(totals[i]) / count for i, k in enumerate(LOSS_KEYS)}
        self.monitors = collapse_monitors(embeddings, masked)
        self.log.scalars(self.monitors, self.state.step)
        if first is not None:
            self.log.images("Validation", *first, step=self.state.step)
        return result

    # -- state ---------------------------------------------------------------------------------------------
    def _extra(self) -> dict[str, Any]:
        extra = {
            **dataclasses.asdict(self.state),
            "generator": self.generator.get_state(),
            "generator_device": self.device.type,
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
        self.state = s = LoopState(**{f.name: extra[f.name] for f in dataclasses.fields(LoopState) if f.name in extra})
        if isinstance(s.history, str):  # checkpoints written before the loop state was saved as it is
            s.history = json.loads(s.history)
        s.batch_in_epoch = self._data_position(extra, saved_world)
        saved_device = generator_device(extra["generator"], extra.get("generator_device"))
        if saved_world == self.strategy.world_size and saved_device == self.device.type:
            self.generator.set_state(extra["generator"])
        else:
            # Ranks without a saved stream of their own get a fresh one each, not copies of rank 0's; a stream saved
            # on another device type (a CPU run resumed on a GPU, or back) cannot be loaded: CUDA's generator keeps
            # 16 bytes, the CPU's 5056.
            self.generator.manual_seed(self.cfg.train.seed * 1000 + self.strategy.rank + 1 + 7919 * s.step)
            if saved_device != self.device.type and self.strategy.is_main:
                print(
                    f"ssl3d: the augmentation stream was saved on the {saved_device}, this run is on the "
                    f"{self.device.type}: re-seeded it (augmentations from here on differ from an uninterrupted run)"
                )
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
        advice = out_of_memory_help(self.cfg, self.strategy)
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
        volumes_per_step = cfg.train.batch_size * cfg.data.num_samples * 2 * cfg.train.grad_accum * strategy.world_size
        bar = tqdm(
            total=cfg.train.num_steps,
            initial=s.step,
            desc="pre-training",
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
            record = {"step": s.step, **{k: losses[k] for k in LOSS_KEYS}}
            s.history = (s.history[:1] + [record])[-2:] if s.history else [record]
            if s.step % cfg.train.log_every == 0 or s.step == cfg.train.num_steps:
                scalars = {f"train/loss_{k}": losses[k] for k in LOSS_KEYS}
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
                self.log.scalars({f"Validation/loss_{k}": v for k, v in last_val.items()}, s.step)
                improved = last_val["reconstruction"] < s.best_val
                s.best_val = min(s.best_val, last_val["reconstruction"])
                self.save()
                saved = True
                if improved:
                    self.checkpoints.save_best(self._extra())
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
        """Export the encoder for fine-tuning and write a summary next to the logs."""
        weights = self.strategy.full_state_dict()
        bad = self.strategy.sum_counts(self.bad_volumes)
        summary: dict[str, Any] = {}
        if self.strategy.is_main:
            export_path = export_swinvit(weights, self.logdir / "model_swinvit.pt", self.cfg, self.state.step)
            hist = self.state.history
            summary = {
                "steps": self.state.step,
                "first": hist[0] if hist else None,
                "last": hist[-1] if hist else None,
                "validation": last_val,
                "best_val_reconstruction": self.state.best_val,
                "skipped_steps": self.state.skipped_steps,
                "bad_volumes": bad,
                "export": str(export_path),
                "memory": self.strategy.memory_report(),
                "collapse_monitors": getattr(self, "monitors", {}),
            }
            (self.logdir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.log.close()
        self.strategy.barrier()
        return summary
