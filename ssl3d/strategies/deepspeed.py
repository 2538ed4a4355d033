"""DeepSpeed ZeRO stages 0-3 with optional optimizer/parameter offload, driven by the ds_config preset.

Differences from the other backends that this module hides from the loop:

- ``engine.backward`` divides the loss by ``gradient_accumulation_steps`` itself, so the UNSCALED micro-batch
  loss goes in; the accumulation boundary follows the loop's ``sync`` flag (``set_gradient_accumulation_boundary``)
  and ``engine.step()`` is called once per optimizer step.
- clipping is DeepSpeed's (``gradient_clipping`` in the preset, filled from ``train.grad_clip``).
- a non-finite gradient norm skips the update: DeepSpeed's ZeRO, bf16 and fp16 optimizers do this themselves;
  for stage 0 in fp32 (a bare torch optimizer) this module checks the norm and suppresses the step.
- the optimizer is ssl3d's torch optimizer (``zero_allow_untested_optimizer``), or DeepSpeedCPUAdam with
  the same hyper-parameters when the optimizer is offloaded. DeepSpeedCPUAdam is a C++ extension that is
  JIT-compiled on first use (cached in ``TORCH_EXTENSIONS_DIR``, default
  ``~/.cache/torch_extensions``); ``"zero_force_ds_cpu_optimizer": false`` keeps the torch optimizer instead.
- a ZeRO-1/2/3 checkpoint resumes at another world size WITH its optimizer state: ``load`` converts the step
  folder's partitions once into DeepSpeed's universal checkpoint (``<step>/deepspeed_universal/``) and loads that
  (``"checkpoint": {"load_universal": true}``, switched on for that one load). Stage 0, a change between ZeRO-1/2
  and ZeRO-3, and NVMe optimizer offload cannot go that way (``resume_problem`` says why).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl3d.fileio import fsync_tree
from ssl3d.strategies.base import (
    OptimizerFactory,
    Strategy,
    clean_name,
    require_layout,
    to_cpu_fp32,
)
from ssl3d.strategies.distributed import backend_for, init_distributed, is_distributed
from ssl3d.strategies.single import match_names

CHECKPOINT_TAG = "deepspeed"
# DeepSpeed's universal checkpoint of the step folder's ZeRO partitions, converted once by the first resume at
# another world size (``convert_to_universal``) and reused by later ones.
UNIVERSAL_TAG = "deepspeed_universal"


def select_accelerator(device: torch.device | None = None) -> None:
    """Point DeepSpeed at the accelerator of the run's device, before DeepSpeed is first imported.

    DeepSpeed picks its accelerator once, at import, from ``DS_ACCELERATOR`` or else from what the machine has: on a
    GPU machine it takes CUDA even when the run asked for the CPU (``train.device: "cpu"``), then moves the model to
    ``cuda:LOCAL_RANK`` while ssl3d feeds CPU tensors. A run on the CPU therefore sets ``DS_ACCELERATOR=cpu``; a
    DeepSpeed already imported with another accelerator is an error that says so.
    """
    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    if not cpu:
        return
    if "deepspeed.accelerator" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        if name != "cpu":
            raise RuntimeError(
                f"DeepSpeed was already imported with its {name} accelerator, but this run is on the CPU; "
                "start a fresh process (or set DS_ACCELERATOR=cpu before anything imports deepspeed)"
            )
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


def import_deepspeed(device: torch.device | None = None) -> Any:
    """Import DeepSpeed with the run device's accelerator and without a compile step training never uses.

    ``select_accelerator`` makes the CPU explicit where the run is on the CPU. DeepSpeed's CPU communication backend
    JIT-compiles a shared-memory all-reduce op (``deepspeed_shm_comm``, about a minute) that only inference
    all-reduce uses; training collectives go through torch.distributed (gloo), so the build is skipped.
    """
    select_accelerator(device)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # importlib: the attribute ``deepspeed.comm.torch`` is the torch package itself, not this submodule.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def _cpu_adam_like(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
    """DeepSpeedCPUAdam with the hyper-parameters of ssl3d's Adam/AdamW; None for other optimizers."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return None
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    d = optimizer.defaults
    return DeepSpeedCPUAdam(
        params,
        lr=d["lr"],
        betas=d["betas"],
        eps=d["eps"],
        weight_decay=d["weight_decay"],
        adamw_mode=isinstance(optimizer, torch.optim.AdamW),
    )


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with its floating-point tensors (also inside lists, tuples and dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, list | tuple):
        return type(value)(_cast_floating(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floating(v, dtype) for k, v in value.items()}
    return value


class DeepSpeedStrategy(Strategy):
    """DeepSpeed owns the run's precision: with the ``bf16``/``fp16`` sections its engine makes the whole model bf16
    or fp16 (fp32 masters in the optimizer), and ``engine.forward`` switches off any autocast opened outside it
    (on CUDA; DeepSpeed asks ``torch.is_autocast_enabled()``, which on the CPU reports CUDA's state and so never saw
    ssl3d's CPU autocast). So ssl3d opens no autocast of its own and casts the floating inputs to the engine's
    dtype, as the Hugging Face trainer does. Why this route rather than DeepSpeed's ``torch_autocast`` section
    (fp32 weights, autocast inside the engine): bf16 weights and gradients take half the memory and half the
    gradient traffic, and it is DeepSpeed's most used mixed-precision path; the losses are computed in fp32 from
    ``.float()`` outputs either way. A preset may still choose ``torch_autocast`` (LayerNorm and softmax in fp32,
    as under DDP's autocast): the engine then autocasts its forward itself and the inputs stay fp32."""

    name = "deepspeed"

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine's precision sections or its torch_autocast section decide

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        if self.ds_config is None:
            raise ValueError("DeepSpeedStrategy needs a resolved ds_config (ds_config.resolve_ds_config)")
        deepspeed = import_deepspeed(self.device)
        init_distributed(backend_for(self.device))
        deepspeed.init_distributed(dist_backend=backend_for(self.device))
        config = dict(self.ds_config.deepspeed)
        self.stage = self.ds_config.zero_stage
        if self.stage == 0 and self.ds_config.precision == "bf16" and self.is_main:
            warnings.warn(
                "deepspeed: ZeRO stage 0 in bf16 takes DeepSpeed's unfused low-precision path (bf16 gradient "
                "all-reduce and accumulation), which drifts from fp32 several times as far as ZeRO-1 "
                '(docs/scaling.md): prefer "zero_optimization": {"stage": 1} (or strategy "ddp" with bf16 autocast)'
            )

        # Order: activation checkpointing (applied by the caller) -> engine (wraps/shards) -> optimizer.
        model = model.to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params)
        if self.ds_config.offload_optimizer.enabled and config.get("zero_force_ds_cpu_optimizer", True):
            cpu_adam = _cpu_adam_like(optimizer, params)
            if cpu_adam is None:
                warnings.warn(
                    f"zero_optimization.offload_optimizer: {type(optimizer).__name__} has no DeepSpeed CPU "
                    "version; stepping the torch optimizer on the CPU (slower than DeepSpeedCPUAdam)"
                )
                config["zero_force_ds_cpu_optimizer"] = False
            else:
                optimizer = cpu_adam
        if not type(optimizer).__module__.startswith("deepspeed"):
            config["zero_allow_untested_optimizer"] = True
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.module = self.engine.module
        self.model = self.engine
        if self.dtype != torch.float32 and not self.ds_config.torch_autocast:
            # The module's weights are bf16/fp16 now: its inputs must be too (crops arrive in fp32).
            def cast_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                return _cast_floating(args, self.dtype), _cast_floating(kwargs, self.dtype)

            self.module.register_forward_pre_hook(cast_inputs, with_kwargs=True)
        # Stage 0 in fp32 hands DeepSpeed's step straight to the torch optimizer, which would apply a NaN update;
        # every other configuration wraps it in a DeepSpeed optimizer that skips non-finite steps itself.
        self._bare_optimizer = self.engine.optimizer is optimizer
        self._skip_next = False
        if self._bare_optimizer:
            step = optimizer.step

            def guarded_step(*args: Any, **kwargs: Any) -> Any:
                return None if self._skip_next else step(*args, **kwargs)

            optimizer.step = guarded_step  # type: ignore[method-assign]
        return self.model, self.optimizer

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        """The loop, not DeepSpeed's micro-step counter, says where the accumulation boundary is."""
        self.engine.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself

    def clip_and_step(self, max_grad_norm: float | None) -> torch.Tensor:
        configured = self.ds_config.gradient_clipping if self.ds_config else None
        if (max_grad_norm or None) != configured:
            raise ValueError(
                f"DeepSpeed clips with the preset's gradient_clipping ({configured}), step() was asked for "
                f'{max_grad_norm}; set gradient_clipping to "auto" so it follows train.grad_clip'
            )
        norm: torch.Tensor | None = None
        if self._bare_optimizer:
            # Gradients were all-reduced at the boundary's backward: the same norm on every rank.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads).detach().float().cpu()
            self._skip_next = not bool(torch.isfinite(norm))
        self.engine.step()
        self._skip_next = False
        if norm is None:
            value = self.engine.get_global_grad_norm()
            norm = torch.as_tensor(float("nan") if value is None else value, dtype=torch.float32).detach().cpu()
        return norm.float()

    def is_loss_scale_stop(self, exc: BaseException) -> bool:
        return "loss scale already at minimum" in str(exc)  # DeepSpeed's own fp16 underflow stop

    def loss_scale(self) -> float | None:
        """DeepSpeed's dynamic fp16 loss scale (its fp16 and ZeRO optimizers keep it as ``cur_scale``)."""
        if self.ds_config is None or self.ds_config.precision != "fp16":
            return None
        opt = self.engine.optimizer
        scale = getattr(opt, "cur_scale", None)
        if scale is None:
            scale = getattr(getattr(opt, "loss_scaler", None), "cur_scale", None)
        return None if scale is None else float(scale)

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    # -- state ---------------------------------------------------------------------------------------------
    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        # Every rank writes its ZeRO partitions under directory/deepspeed/.
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={}, save_latest=False)
        self.save_extra(directory, extra)

    def load(self, directory: Path) -> dict[str, Any]:
        """Exact resume; a ZeRO checkpoint written at another world size goes through the universal checkpoint."""
        directory = Path(directory)
        require_layout(directory, CHECKPOINT_TAG, self.name)
        saved_world = len(zero_partition_files(directory))
        if saved_world and saved_world != self.world_size:
            problem = self.resume_problem(directory, saved_world)
            if problem is not None:
                raise RuntimeError(
                    f"{directory}: cannot resume its optimizer state at world size {self.world_size} ({problem}); "
                    "start from its weights with a fresh optimizer (load_model_weights + read_checkpoint_weights)"
                )
            self._load_universal(directory, saved_world)
            return self.load_extra(directory)
        path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=CHECKPOINT_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise RuntimeError(f"{directory}: DeepSpeed could not load the checkpoint under tag {CHECKPOINT_TAG!r}")
        return self.load_extra(directory)

    def resume_problem(self, directory: Path, saved_world_size: int) -> str | None:
        if saved_world_size == self.world_size:
            return None
        parts = zero_partition_files(directory)
        if not parts:
            return (
                "a ZeRO stage 0 checkpoint: DeepSpeed's universal checkpoint converts ZeRO-1/2/3 optimizer partitions "
                "only"
            )
        saved_stage3 = is_zero3_checkpoint(directory)
        if saved_stage3 != (self.stage == 3):
            saved = "3" if saved_stage3 else "1/2"
            return (
                f"written with ZeRO stage {saved}, this run uses stage {self.stage}: ssl3d loads a universal "
                "checkpoint into the same ZeRO family only (1/2 or 3)"
            )
        if self.ds_config is not None and self.ds_config.offload_optimizer.device == "nvme":
            return "NVMe optimizer offload: DeepSpeed restores its swap files only at the world size that wrote them"
        return None

    def universal_checkpoint(self, directory: Path) -> Path:
        """``directory/deepspeed_universal``, converted by rank 0 the first time (collective: every rank calls it)."""
        directory = Path(directory)
        error = ""
        if self.is_main and not (directory / UNIVERSAL_TAG).is_dir():
            try:
                convert_to_universal(directory)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                error = str(exc)
        if is_distributed():
            box = [error]
            torch.distributed.broadcast_object_list(box, src=0)  # also the barrier after the conversion
            error = box[0]
        if error:
            raise RuntimeError(error)
        return directory / UNIVERSAL_TAG

    def _load_universal(self, directory: Path, saved_world: int) -> None:
        folder = self.universal_checkpoint(directory)
        # DeepSpeed reads "checkpoint": {"load_universal": ...} only while loading (engine.load_universal_checkpoint
        # and the optimizer's load_state_dict); switched on for this load, not for the whole run.
        config = self.engine._config
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            path, _ = self.engine.load_checkpoint(
                str(directory),
                tag=UNIVERSAL_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        finally:
            config.load_universal_checkpoint = before
        if path is None:
            raise RuntimeError(f"{folder}: DeepSpeed could not load the universal checkpoint")
        # The universal load restores parameters (and their optimizer state) only; buffers come from the module file.
        module_files = sorted(folder.glob("*model_states.pt"))
        if module_files:
            state = torch.load(module_files[0], map_location="cpu", weights_only=False).get("module") or {}
            with torch.no_grad():
                for name, b in self.module.named_buffers():
                    value = state.get(name)
                    if value is not None and value.shape == b.shape:
                        b.copy_(value.to(b.device, b.dtype))
        if self.is_main:
            print(
                f"ssl3d: {directory} was written at world size {saved_world}: resumed at world size "
                f"{self.world_size} with its optimizer state, through DeepSpeed's universal checkpoint {folder}"
            )

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 master weights (not the bf16 compute copies), gathered from the ZeRO partitions; collective."""
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        masters = self._unfused_masters()
        for name, p in self.module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None  # collective under ZeRO
            if full is None:
                full = masters.get(id(p), p.data)
            out[clean_name(name)] = to_cpu_fp32(full).reshape(self._shape(p))
        for name, value in self.module.state_dict().items():
            key = clean_name(name)
            if key not in out:  # buffers (ZeRO never partitions them)
                out[key] = to_cpu_fp32(value)
        return out

    def _unfused_masters(self) -> dict[int, torch.Tensor]:
        """Stage 0 in bf16/fp16 (DeepSpeed's unfused low-precision optimizer): parameter id -> its fp32 master.

        Those masters have no ``_hp_mapping``, so ``safe_get_full_fp32_param`` returns None for them."""
        opt = self.engine.optimizer
        low, high = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
        if not (isinstance(low, list) and isinstance(high, list) and all(isinstance(g, list) for g in high)):
            return {}
        return {id(a): b for ga, gb in zip(low, high) for a, b in zip(ga, gb) if a.shape == b.shape}

    @staticmethod
    def _shape(p: nn.Parameter) -> torch.Size:
        return p.ds_shape if hasattr(p, "ds_shape") else p.shape

    def load_model_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Full plain-named weights on every rank -> compute copies and fp32 master copies (fresh optimizer).

        Under ZeRO-3 the master partitions are refreshed from the (re-partitioned) compute weights, which is
        exact in fp32 and rounds the masters to bf16 in a bf16 run. (``safe_set_full_fp32_param`` would be exact
        but fails on the last rank for parameters whose size is not a multiple of the world size, in the
        pinned DeepSpeed.)
        """
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        named = dict(self.module.named_parameters())
        state = match_names({**dict(self.module.named_buffers()), **named}, state)
        missing = sorted(set(named) - set(state))
        if missing:
            raise KeyError(f"load_model_weights: {len(missing)} parameters missing, e.g. {clean_name(missing[0])}")
        if self.stage == 3:
            with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=0), torch.no_grad():
                for name, p in named.items():
                    p.data.copy_(state[name].to(p.device, p.dtype).reshape(p.shape))
            self.engine.optimizer.refresh_fp32_params()
        else:
            with torch.no_grad():
                for name, p in named.items():
                    p.data.copy_(state[name].to(p.device, p.dtype).reshape(p.shape))
            masters = self._unfused_masters()
            for name, p in named.items():
                # The optimizer's fp32 master copy, when there is one (ZeRO-1/2, bf16): exact, not bf16-rounded.
                value = state[name].to(self.device, torch.float32).reshape(p.shape)
                safe_set_full_fp32_param(p, value)
                if id(p) in masters:
                    masters[id(p)].data.copy_(value)
        with torch.no_grad():
            for name, b in self.module.named_buffers():
                if name in state:
                    b.copy_(state[name].to(b.device, b.dtype))


def read_zero_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights in a DeepSpeed checkpoint folder, offline (``zero_to_fp32``; no process group).

    Stage 0 in fp32 has no ZeRO partitions: its module file already holds the full fp32 weights.
    """
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    directory = Path(directory)
    tagged = directory / CHECKPOINT_TAG
    if any(tagged.glob("*optim_states.pt")):
        quiet = io.StringIO()  # zero_to_fp32 prints its progress and tqdm bars
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=CHECKPOINT_TAG)
    else:
        # Our own file: it holds DeepSpeed's config objects, so it needs full unpickling.
        state = torch.load(tagged / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {clean_name(k): to_cpu_fp32(v) for k, v in state.items()}


def zero_partition_files(directory: Path) -> list[Path]:
    """The ZeRO optimizer partitions in a step folder, one per data-parallel rank (none at stage 0)."""
    return sorted((Path(directory) / CHECKPOINT_TAG).glob("*zero_pp_rank_*_optim_states.pt"))


def is_zero3_checkpoint(directory: Path) -> bool:
    """ZeRO-3 writes one model-state file per rank (its parameter partitions); stages 0-2 one for all."""
    return any((Path(directory) / CHECKPOINT_TAG).glob("zero_pp_rank_*_model_states.pt"))


def convert_to_universal(directory: Path) -> Path:
    """``<step>/deepspeed/`` -> ``<step>/deepspeed_universal/`` with DeepSpeed's ``ds_to_universal``, offline.

    Written under a temporary name and renamed when complete (kept for later resumes); returns the folder. The
    converter's own progress output is kept and shown only when it fails."""
    import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    directory = Path(directory)
    final = directory / UNIVERSAL_TAG
    if final.is_dir():
        return final
    tmp = directory / f".{UNIVERSAL_TAG}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(directory / CHECKPOINT_TAG),
        output_folder=str(tmp),
        num_extract_workers=1,  # in this process: no process pool forked from a training process
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # ssl3d's modules carry no universal_checkpoint_info (a Megatron-style client attribute): the default one.
        inject_missing_state=True,
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join(log.getvalue().splitlines()[-10:])
        raise RuntimeError(
            f"{directory}: DeepSpeed's universal checkpoint conversion failed: {type(exc).__name__}: {exc}\n{tail}"
        ) from exc
    finally:
        (directory / "latest_universal").unlink(missing_ok=True)  # the converter's pointer next to its output
    fsync_tree(tmp)
    os.replace(tmp, final)
    return final
