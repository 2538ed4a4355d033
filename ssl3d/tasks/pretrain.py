"""Self-supervised pre-training (the reference's three pretext tasks) as a task of the one training loop.

One micro-batch is ``batch_size`` volumes x ``num_samples`` crops, turned into two rotated and corrupted views that
go through ONE batched forward pass (``ssl3d.ssl.task.SSLTask``, with its own gradient caching). Validation reports
the pretext losses and the collapse monitors; the lowest validation reconstruction is "best". The run leaves
``model_swinvit.pt`` (and its metadata) for fine-tuning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssl3d.checkpoint import export_swinvit, load_init_weights
from ssl3d.config import Config, ConfigError, ModelConfig
from ssl3d.logger import foreground_fraction
from ssl3d.model import build_model
from ssl3d.ssl import LossWeights, MaskingParams, SSLLoss, make_views
from ssl3d.ssl.augment import SSLViews
from ssl3d.ssl.monitors import collapse_monitors
from ssl3d.ssl.task import LOSS_KEYS, SSLTask
from ssl3d.tasks.base import Task


def generator_device(state: Tensor, saved: str | None) -> str:
    """The device type a random generator's saved state belongs to: the recorded one, else told by its size (a CUDA
    generator's state is 16 bytes, a CPU one's 5056; checkpoints written before the type was recorded)."""
    if saved:
        return saved
    return "cuda" if state.numel() == 16 else "cpu"


class PretrainTask(Task):
    name = "pretrain"
    title = "pre-training"
    loss_keys = LOSS_KEYS
    views_per_crop = 2
    supports_grad_cache = True
    best_metric = "reconstruction"

    def __init__(self) -> None:
        self.ssl: SSLTask | None = None  # the run's objective (run facet only)
        self.generator: torch.Generator | None = None
        self.seed = 0
        self.rank = 0

    # -- step facet --------------------------------------------------------------------------------------------
    def build_model(self, model: ModelConfig, contrastive_dim: int = 512, num_classes: int = 0) -> nn.Module:
        return build_model(model, contrastive_dim)

    def objective(self, settings: Any, generator: torch.Generator | None = None) -> SSLTask:
        """The memory tools' step; with a queue of negatives the queue starts full (zeros), the steady state a step
        after the first ``negative_queue`` views, so the trace and the profiler meet its buffer and extra logits."""
        task = SSLTask(
            SSLLoss(),
            generator=generator,
            grad_cache_chunk=settings.grad_cache_chunk,
            two_passes=settings.two_passes,
            negative_queue=settings.negative_queue,
        )
        if task.queue is not None:
            task.queue.enqueue(torch.zeros(settings.negative_queue, settings.contrastive_dim))
        return task

    def step_inputs(self, settings: Any, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The crops [N], both views [2N], their corrupted copies [2N] and the rotation labels."""
        n = settings.batch_size * settings.num_samples
        shape = (settings.model.in_channels, *settings.roi)
        return {
            "crops": torch.zeros(n, *shape, device=device),
            "views": torch.zeros(2 * n, *shape, device=device),
            "corrupted": torch.zeros(2 * n, *shape, device=device),
            "rot_labels": torch.zeros(2 * n, dtype=torch.long, device=device),
        }

    def batch_from_inputs(self, inputs: dict[str, Tensor]) -> SSLViews:
        return SSLViews(inputs["views"], inputs["corrupted"], inputs["rot_labels"])

    def randomise_inputs(self, inputs: dict[str, Tensor], settings: Any, generator: torch.Generator) -> None:
        super().randomise_inputs(inputs, settings, generator)
        shape = inputs["rot_labels"].shape
        inputs["rot_labels"].copy_(torch.randint(0, 4, shape, generator=generator, device="cpu"))

    def describe(self, num_classes: int | None) -> str:
        return ""

    # -- run facet ---------------------------------------------------------------------------------------------
    def prepare(self, cfg: Config, strategy: Any) -> None:
        """No datalist configured: rank 0 writes the built-in synthetic CT volumes once, then all ranks use them."""
        from ssl3d.data import resolve_data_config

        if cfg.data.datalists:
            return
        if strategy.is_main:
            resolve_data_config(cfg)
        strategy.barrier()
        cfg.data = resolve_data_config(cfg)

    def run_model(self, cfg: Config, is_main: bool) -> nn.Module:
        # MONAI's own flag stays off: checkpointing is applied from outside, one mechanism for every backend.
        model = build_model(cfg.model.model_copy(update={"use_checkpoint": False}), cfg.ssl.contrastive_dim)
        if cfg.model.init_weights:
            missing = load_init_weights(model, Path(cfg.model.init_weights))
            if is_main:
                print(f"ssl3d: initialised from {cfg.model.init_weights} ({len(missing)} tensors left as built)")
        return model

    def run_objective(self, cfg: Config, device: torch.device, rank: int) -> SSLTask:
        s = cfg.ssl
        loss_fn = SSLLoss(
            LossWeights(s.rotation_weight, s.contrastive_weight, s.reconstruction_weight), temperature=s.temperature
        )
        # Augmentation randomness: one stream per rank, on the model's device, saved in checkpoints.
        self.seed, self.rank = cfg.train.seed, rank
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(cfg.train.seed * 1000 + rank + 1)
        masking = MaskingParams(s.max_drop, s.min_block, s.max_block)
        self.ssl = SSLTask(
            loss_fn, masking, self.generator, grad_cache_chunk=s.grad_cache_chunk, negative_queue=s.negative_queue
        )
        return self.ssl

    def loaders(self, cfg: Config, rank: int, world_size: int, epoch: int) -> tuple[Any, Any]:
        from ssl3d.data import build_loaders

        return build_loaders(cfg, rank, world_size, epoch, 0)

    def train_batch(self, batch: dict[str, Any], device: torch.device) -> Tensor:
        return batch["image"].to(device, non_blocking=True)

    @torch.no_grad()
    def validate(self, trainer: Any) -> dict[str, float]:
        """Mean losses over the whole validation list, spread over all ranks; the same corruption every time."""
        assert self.ssl is not None
        model, strategy, device, cfg = trainer.model, trainer.strategy, trainer.device, trainer.cfg
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.train.seed + 7919 * (strategy.rank + 1))
        totals = torch.zeros(len(LOSS_KEYS) + 1, dtype=torch.float64, device=device)
        masked = torch.zeros(2, dtype=torch.float64, device=device)  # L1 sum and count on corrupted voxels
        embeddings: list[Tensor] = []  # collapse monitors (this rank's validation crops)
        first, best_content = None, 0.0
        for i, batch in enumerate(trainer.val_loader):
            if cfg.train.max_val_batches is not None and i >= cfg.train.max_val_batches:
                break
            x = batch["image"].to(device)
            trainer.note_bad_volumes(batch)
            # Every rank runs the same number of batches (sharded backends need it); crops of volumes repeated
            # to even out the ranks are marked invalid and left out of the mean.
            valid = batch.get("valid", torch.ones(x.shape[0], dtype=torch.bool)).to(device)
            views = make_views(x, gen, self.ssl.masking)
            with strategy.autocast():
                out = model(views.corrupted)
            n = int(valid.sum())
            if not n:
                continue
            keep = torch.cat([valid, valid])  # both views
            losses = self.ssl.loss_fn(
                out.rotation[keep].float(),
                views.rot_labels[keep],
                out.contrastive[keep].float(),
                out.reconstruction[keep].float(),
                views.views[keep],
            )
            row = [float(losses[k]) * n for k in LOSS_KEYS] + [n]
            totals += torch.tensor(row, device=device, dtype=torch.float64)
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
        strategy.all_reduce_sum(totals)
        strategy.all_reduce_sum(masked)
        count = max(float(totals[-1]), 1.0)
        result = {k: float(totals[i]) / count for i, k in enumerate(LOSS_KEYS)}
        self.monitors = collapse_monitors(embeddings, masked)
        trainer.log.scalars(self.monitors, trainer.state.step)
        if first is not None:
            trainer.log.images("Validation", *first, step=trainer.state.step)
        return result

    def validation_scalars(self, metrics: dict[str, float]) -> dict[str, float]:
        return {f"Validation/loss_{k}": v for k, v in metrics.items()}

    def state_dict(self) -> dict[str, Any]:
        assert self.generator is not None and self.ssl is not None
        state = {"generator": self.generator.get_state(), "generator_device": self.generator.device.type}
        return state | self.ssl.state_dict()  # this rank's negative queue, when there is one

    def load_state_dict(self, extra: dict[str, Any], *, same_layout: bool, step: int, is_main: bool) -> None:
        assert self.generator is not None and self.ssl is not None
        self._load_queue(extra, same_layout, is_main)
        here = self.generator.device.type
        saved_device = generator_device(extra["generator"], extra.get("generator_device"))
        if same_layout and saved_device == here:
            self.generator.set_state(extra["generator"])
            return
        # Ranks without a saved stream of their own get a fresh one each, not copies of rank 0's; a stream saved
        # on another device type (a CPU run resumed on a GPU, or back) cannot be loaded: CUDA's generator keeps
        # 16 bytes, the CPU's 5056.
        self.generator.manual_seed(self.seed * 1000 + self.rank + 1 + 7919 * step)
        if saved_device != here and is_main:
            print(
                f"ssl3d: the augmentation stream was saved on the {saved_device}, this run is on the {here}: "
                "re-seeded it (augmentations from here on differ from an uninterrupted run)"
            )

    def _load_queue(self, extra: dict[str, Any], same_layout: bool, is_main: bool) -> None:
        """Each rank's queue of negatives comes back as it was; at another world size the ranks' queues do not map
        onto the new ones, so they start empty (and fill within ``ssl.negative_queue`` views)."""
        assert self.ssl is not None
        if self.ssl.queue is not None and not same_layout:
            if is_main:
                print("ssl3d: another world size: the negative queues start empty")
            return
        try:
            self.ssl.load_state_dict(extra)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def finish(self, trainer: Any, weights: dict[str, Tensor], validation: dict[str, float]) -> dict[str, Any]:
        export = export_swinvit(weights, trainer.logdir / "model_swinvit.pt", trainer.cfg, trainer.state.step)
        hist = trainer.state.history
        return {
            "steps": trainer.state.step,
            "first": hist[0] if hist else None,
            "last": hist[-1] if hist else None,
            "validation": validation,
            "best_val_reconstruction": trainer.state.best,
            "export": str(export),
            "collapse_monitors": getattr(self, "monitors", {}),
        }
