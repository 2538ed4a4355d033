"""Fine-tuning and probing: supervised segmentation as a task of the one training loop.

The network is MONAI's ``SwinUNETR`` (fine-tuning) or the frozen encoder with per-stage 1x1x1 heads (the probe),
initialised from any weights ssl3d reads. One micro-batch is ``batch_size`` volumes x ``num_samples`` labelled crops
through Dice + cross-entropy. Validation is MONAI's ``sliding_window_inference`` with per-class Dice over this rank's
share of the validation volumes; the highest mean Dice is "best" and kept as ``model_best.pt``; the run leaves
``model_final.pt``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from torch import Tensor, nn

from ssl3d.config import Config, ModelConfig
from ssl3d.fileio import atomic_torch_save
from ssl3d.model.segmentation import ProbeModel, build_segmentation_model
from ssl3d.tasks.base import Task

LOSS_KEYS = ("total",)


def _identity(t: Tensor) -> Tensor:
    return t


def _no_phase(name: str) -> None:
    pass


class SegmentationStep:
    """Dice + cross-entropy on ``{"image": [N, C, *roi], "label": [N, 1, *roi]}`` micro-batches (per-sample mean, so
    a data-parallel average over ranks equals the loss of the global batch)."""

    loss_keys = LOSS_KEYS

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0):
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=dice_weight, lambda_ce=ce_weight)

    def losses(self, model: nn.Module, batch: dict[str, Tensor], backend: Any) -> dict[str, Tensor]:
        with backend.autocast():
            logits = model(batch["image"])  # [N, classes, *roi]
        return {"total": self.loss_fn(logits.float(), batch["label"])}

    def forward_backward(
        self,
        model: nn.Module,
        batch: dict[str, Tensor],
        backend: Any,
        *,
        sync: bool,
        loss_hook: Callable[[Tensor], Tensor] = _identity,
        phase: Callable[[str], None] = _no_phase,
    ) -> dict[str, Tensor]:
        with backend.accumulate(sync):
            phase("forward")
            losses = {k: loss_hook(v) for k, v in self.losses(model, batch, backend).items()}
            phase("backward")
            backend.backward(losses["total"])
        return {k: v.detach() for k, v in losses.items()}


class SegmentationTask(Task):
    """``finetune`` (the whole SwinUNETR learns) or ``probe`` (the encoder is frozen). For a run: ``data`` is the
    checked labelled data (``LabelledData``), ``init`` the encoder's source (``InitSource``) or None."""

    loss_keys = LOSS_KEYS
    needs_classes = True
    best_metric = "mean_dice"
    higher_is_better = True

    def __init__(self, name: str, data: Any = None, init: Any = None):
        if name not in ("finetune", "probe"):
            raise ValueError(f"segmentation task: got {name!r}, expected finetune or probe")
        self.name = self.title = name
        self.frozen_encoder = name == "probe"
        self.data, self.init = data, init
        self.num_classes = data.num_classes if data is not None else 0
        self.init_tensors = 0

    # -- step facet --------------------------------------------------------------------------------------------
    def build_model(self, model: ModelConfig, contrastive_dim: int = 512, num_classes: int = 0) -> nn.Module:
        if self.frozen_encoder:
            return ProbeModel(model, num_classes)
        return build_segmentation_model(model, num_classes)

    def objective(self, settings: Any, generator: torch.Generator | None = None) -> SegmentationStep:
        return SegmentationStep()

    def step_inputs(self, settings: Any, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """N labelled crops, image [N, channels, *roi] and label [N, 1, *roi], both float32 as the labelled loader's
        ``EnsureTyped`` leaves them (N = volumes x crops per volume)."""
        n = settings.batch_size * settings.num_samples
        return {
            "image": torch.zeros(n, settings.model.in_channels, *settings.roi, device=device),
            "label": torch.zeros(n, 1, *settings.roi, device=device),
        }

    def batch_from_inputs(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"image": inputs["image"], "label": inputs["label"]}

    def randomise_inputs(self, inputs: dict[str, Tensor], settings: Any, generator: torch.Generator) -> None:
        super().randomise_inputs(inputs, settings, generator)
        shape = inputs["label"].shape  # class indices as float, as the labelled loader delivers them
        inputs["label"].copy_(torch.randint(0, settings.num_classes, shape, generator=generator, device="cpu"))

    def check_settings(self, settings: Any) -> str | None:
        if int(settings.num_classes) < 2:
            return f"num_classes: got {settings.num_classes}, expected at least 2 (background included)"
        if settings.grad_cache_chunk or settings.two_passes or settings.negative_queue:
            return (
                f"grad_cache_chunk/two_passes/negative_queue: got {settings.grad_cache_chunk}/{settings.two_passes}/"
                f"{settings.negative_queue} for task {self.name}; they are pre-training settings (expected 0/False/0)"
            )
        return None

    # -- run facet ---------------------------------------------------------------------------------------------
    def run_model(self, cfg: Config, is_main: bool) -> nn.Module:
        model = self.build_model(cfg.model, num_classes=self.data.num_classes)
        self.init_tensors = self.init.load_into(model) if self.init is not None else 0
        return model

    def run_objective(self, cfg: Config, device: torch.device, rank: int) -> SegmentationStep:
        return SegmentationStep(cfg.finetune.dice_weight, cfg.finetune.ce_weight)

    def loaders(self, cfg: Config, rank: int, world_size: int, epoch: int) -> tuple[Any, Any]:
        from ssl3d.data.labelled import build_labelled_loaders

        return build_labelled_loaders(cfg, self.data.training, self.data.validation, rank, world_size, epoch)

    def train_batch(self, batch: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
        return {k: batch[k].to(device, non_blocking=True) for k in ("image", "label")}

    @torch.no_grad()
    def validate(self, trainer: Any) -> dict[str, float]:
        """Per-class and mean Dice (background excluded) over the validation volumes, whole-volume inference,
        each rank its share. Sharded backends gather parameters in every forward, so every rank runs as many
        forwards per volume as the rank with the most windows (the others run spare ones on zeros)."""
        model, strategy, device, cfg = trainer.model, trainer.strategy, trainer.device, trainer.cfg
        f, n = cfg.finetune, self.data.num_classes
        roi = list(cfg.data.roi)
        metric = DiceMetric(include_background=False, reduction="none", get_not_nans=False)
        sums = torch.zeros(2, n - 1, dtype=torch.float64, device=device)  # per class: Dice sum, volumes counted
        calls_per_rank = torch.zeros(strategy.world_size, dtype=torch.float64, device=device)
        shown = None

        def windows(x: Tensor) -> int:
            count = [0]

            def zeros(w: Tensor) -> Tensor:
                count[0] += 1
                return w.new_zeros(w.shape[0], n, *w.shape[2:])

            sliding_window_inference(x, roi, f.sw_batch_size, zeros, overlap=f.sw_overlap)
            return count[0]

        for item in trainer.val_loader:
            trainer.note_bad_volumes(item)
            x = item["image"][None].to(device) if item.get("image") is not None else None
            calls_per_rank.zero_()
            calls_per_rank[strategy.rank] = windows(x) if x is not None else 0
            strategy.all_reduce_sum(calls_per_rank)
            spare = int(calls_per_rank.max()) - int(calls_per_rank[strategy.rank])
            if x is not None:
                with strategy.autocast():
                    logits = sliding_window_inference(x, roi, f.sw_batch_size, model, overlap=f.sw_overlap)
                pred = logits.float().argmax(1, keepdim=True)  # [1, 1, H, W, D]
                if item.get("valid", True):
                    y = item["label"][None].to(device)
                    onehot = torch.nn.functional.one_hot(pred[:, 0].long(), n).permute(0, 4, 1, 2, 3)
                    truth = torch.nn.functional.one_hot(y[:, 0].long(), n).permute(0, 4, 1, 2, 3)
                    dice = metric(onehot, truth)[0].to(torch.float64)  # [classes - 1], NaN: class absent
                    present = ~torch.isnan(dice)
                    sums += torch.stack([torch.where(present, dice, 0.0), present.to(torch.float64)])
                    if shown is None:
                        shown = (x[0], y[0], pred[0])
            for _ in range(spare):
                with strategy.autocast():
                    model(torch.zeros(f.sw_batch_size, cfg.model.in_channels, *roi, device=device))
        strategy.all_reduce_sum(sums)
        per_class = sums[0] / sums[1]  # NaN for a class absent from every volume
        out = {name: float(v) for name, v in zip(self.data.class_names[1:], per_class.cpu())}
        finite = [v for v in out.values() if math.isfinite(v)]
        out["mean_dice"] = sum(finite) / len(finite) if finite else float("nan")
        if shown is not None:
            trainer.log.overlay("Validation", *shown, num_classes=n, step=trainer.state.step)
        return out

    def validation_scalars(self, metrics: dict[str, float]) -> dict[str, float]:
        return {(f"Validation/dice_{k}" if k != "mean_dice" else "Validation/mean_dice"): v for k, v in metrics.items()}

    def _save_weights(self, trainer: Any, name: str) -> None:
        weights = trainer.strategy.full_state_dict()  # collective
        if trainer.strategy.is_main:
            atomic_torch_save({"state_dict": weights, "num_classes": self.data.num_classes}, trainer.logdir / name)

    def on_best(self, trainer: Any) -> None:
        self._save_weights(trainer, "model_best.pt")

    def finish(self, trainer: Any, weights: dict[str, Tensor], validation: dict[str, float]) -> dict[str, Any]:
        atomic_torch_save(
            {"state_dict": weights, "num_classes": self.data.num_classes}, trainer.logdir / "model_final.pt"
        )
        cfg, s = trainer.cfg, trainer.state
        return {
            "task": self.name,
            "init": cfg.finetune.init,
            "init_tensors": self.init_tensors,
            "labelled": len(self.data.training),
            "labelled_cases": [e["image"] for e in self.data.training],
            "validation_cases": len(self.data.validation),
            "steps": s.step,
            "seed": cfg.train.seed,
            "first_loss": s.history[0]["total"] if s.history else None,
            "last_loss": s.history[-1]["total"] if s.history else None,
            "validation": validation,
            "best_mean_dice": s.best if s.best is not None else -1.0,
            "best_step": s.best_step,
        }
