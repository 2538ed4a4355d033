"""Run the same deterministic training on one process and on 2 gloo processes, for every backend.

Every rank takes its half of a fixed random GLOBAL batch, so with a per-sample-mean loss the data-parallel run
computes exactly the single-process gradient up to float summation order. The loss is built from all three
heads of the tiny model (L1 reconstruction + rotation cross-entropy + mean contrastive embedding); the real SSL
augmentations and losses are tested elsewhere.

One spawn runs all scenarios of a group of backends in sequence (process start-up and imports dominate on 2
cores); rank 0 writes the results to ``<out>/<group>.pt``.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ssl3d.config import Config, ModelConfig, OptimConfig
from ssl3d.model.ssl_model import build_model

TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24), window_size=4, decoder="deconv")
CROP = (64, 64, 32)  # smallest crop with the 2 last-stage tokens the rotation and contrastive heads read
CONTRASTIVE_DIM = 32
LR = 1e-3
# Adam's eps: gradients that are pure rounding noise (the softmax makes the attention key bias's true gradient
# exactly 0) sit near the default eps of 1e-8, where Adam turns a 1e-7 relative summation-order difference into
# an O(lr) step. With eps = 1e-6 those updates stay tiny while real gradients (>= 1e-4 here) see plain Adam.
ADAM_EPS = float(os.environ.get("SSL3D_TEST_ADAM_EPS", "1e-6"))
GRAD_CLIP = 1.0
WORLD = 2
MICRO = 2  # samples per rank per micro-batch; one process takes WORLD x MICRO
STEPS = 3
SAVE_AFTER = 2  # the "plain" scenario checkpoints after this many steps; "resume" continues from there


@dataclass
class Scenario:
    name: str
    grad_accum: int = 1
    checkpointing: str | None = None  # "wrapper": torch's checkpoint_wrapper; "full": ssl3d.memory's policy
    nan_step: int | None = None  # make this step's loss NaN: the update must be skipped
    save_after: int | None = None
    resume_from: str | None = None  # a scenario whose checkpoint to load (then run the remaining steps)
    load_weights_from: str | None = None  # round-trip that scenario's full_state_dict through load_model_weights
    gather: bool = False  # add a batch-coupled term on contrastive embeddings gathered from all ranks
    precision: str = "fp32"  # train.precision of the run config ("auto" values in the preset follow it)
    ssl_loss: bool = False  # the real SSLLoss (contrastive over both views) instead of deterministic_loss
    grad_cache: int = 0  # with ssl_loss: views per chunk through ssl3d.ssl.grad_cache (0: one pass)


SCENARIOS = {
    "plain": Scenario("plain", save_after=SAVE_AFTER),
    "accum2": Scenario("accum2", grad_accum=2),
    "ckpt": Scenario("ckpt", grad_accum=2, checkpointing="wrapper"),
    "ckpt_full": Scenario("ckpt_full", grad_accum=2, checkpointing="full"),
    "nan": Scenario("nan", nan_step=1),
    "resume": Scenario("resume", resume_from="plain"),
    "load_weights": Scenario("load_weights", load_weights_from="plain"),
    "gather": Scenario("gather", gather=True),
    "bf16": Scenario("bf16", precision="bf16"),
    # The real SSL loss with negatives from the global batch; the reference runs it in one pass on one process.
    "ssl_accum2": Scenario("ssl_accum2", ssl_loss=True, gather=True, grad_accum=2),
    "gradcache": Scenario("gradcache", ssl_loss=True, gather=True, grad_cache=1, grad_accum=2),
}


@dataclass
class Job:
    backend: str  # a name for the results file
    preset: dict[str, Any]  # the ds_config (DeepSpeed vocabulary)
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    world: int = WORLD
    micro: int = MICRO
    checkpoint_dir: str | None = None  # resume from here instead of the job's own "plain" checkpoint
    record_optimizer: bool = False  # DeepSpeed: the full Adam moments when saving and right after loading


def global_batches(grad_accum: int, world: int = WORLD, micro: int = MICRO) -> torch.Tensor:
    """[STEPS, grad_accum, WORLD x MICRO, 1, *CROP]: the same numbers for any split over processes."""
    assert world * micro == WORLD * MICRO, "every run sees the same global batch"
    g = torch.Generator().manual_seed(1234 + grad_accum)
    return torch.rand(STEPS, grad_accum, WORLD * MICRO, 1, *CROP, generator=g)


def deterministic_loss(
    model: torch.nn.Module, x: torch.Tensor, first_index: int, gather: Any = None, seen: dict[str, Any] | None = None
) -> torch.Tensor:
    """Per-sample means of all three heads; with ``gather``, plus a term that couples every pair of samples of the
    GLOBAL batch (like the contrastive loss does), computed on embeddings gathered from all ranks. ``seen`` gets
    the dtype the model computed its reconstruction in (the proof that bf16 ran)."""
    out = model(x)
    if seen is not None:
        seen.setdefault("activation_dtype", out.reconstruction.dtype)
    labels = (torch.arange(x.shape[0]) + first_index) % 4
    loss = (
        F.l1_loss(out.reconstruction.float(), x)
        + F.cross_entropy(out.rotation.float(), labels.to(x.device))
        + out.contrastive.float().mean()
    )
    if gather is not None:
        z = gather(out.contrastive.float())  # [global batch, E]
        loss = loss + torch.logsumexp(z @ z.T / 10.0, dim=1).mean()
    return loss


def fixed_views(x: torch.Tensor, first_index: int):
    """Two deterministic "views" of a micro-batch (no random augmentation), as ssl3d.ssl.make_views stacks them."""
    from ssl3d.ssl import SSLViews

    labels = (torch.arange(x.shape[0], device=x.device) + first_index) % 4
    views = torch.cat([x, x.flip(-1)])
    return SSLViews(views=views, corrupted=views * 0.5 + 0.1, rot_labels=torch.cat([labels, (labels + 1) % 4]))


def ssl_step(strategy, model, x: torch.Tensor, first_index: int, sc: Scenario, sync: bool, world: int) -> torch.Tensor:
    """Forward + backward of the real SSL loss; with ``sc.grad_cache`` through gradient caching in chunks."""
    from ssl3d.ssl import SSLLoss
    from ssl3d.ssl.grad_cache import grad_cached_backward

    loss_fn = SSLLoss(temperature=0.5)
    views = fixed_views(x, first_index)
    gather = strategy.gather_embeddings if world > 1 else (lambda t: t)
    if sc.grad_cache:
        losses = grad_cached_backward(
            model,
            views,
            loss_fn,
            sc.grad_cache,
            lambda loss, last: strategy.backward(loss),
            context=lambda last: strategy.accumulate(sync and last),
            autocast=strategy.autocast,
            gather=gather,
        )
        return losses["total"]
    with strategy.accumulate(sync):
        with strategy.autocast():
            out = model(views.corrupted)
        n = x.shape[0]
        emb = out.contrastive.float()
        emb = torch.cat([gather(emb[:n]), gather(emb[n:])])
        loss = loss_fn(out.rotation, views.rot_labels, emb, out.reconstruction, views.views)["total"]
        strategy.backward(loss)
    return loss


def apply_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing of every Swin block with torch's checkpoint_wrapper, which inserts
    ``_checkpoint_wrapped_module.`` into parameter names (full_state_dict must strip it)."""
    from monai.networks.nets.swin_unetr import SwinTransformerBlock
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, SwinTransformerBlock),
    )


def local_sizes(model: torch.nn.Module, optimizer: Any) -> dict[str, int]:
    """Elements this rank holds: its parameters (an FSDP2 DTensor's local shard, a ZeRO-3 parameter's partition
    ``ds_tensor``) and its optimizer's Adam moments (the torch optimizer inside DeepSpeed's or fairscale's), and
    that optimizer's class."""

    def local(t: torch.Tensor) -> int:
        t = getattr(t, "ds_tensor", t)
        return int(t.to_local().numel() if hasattr(t, "to_local") else t.numel())

    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optim"):
        optimizer = getattr(optimizer, "optimizer", None) or optimizer.optim  # DeepSpeed's ZeRO / fairscale's OSS
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    return {
        "params": sum(local(p) for p in model.parameters()),
        "optim": sum(local(v) for v in moments),
        "optimizer": type(optimizer).__name__,
    }


def full_optimizer_state(strategy) -> dict[str, dict[str, torch.Tensor]]:
    """DeepSpeed: Adam's exp_avg / exp_avg_sq of every parameter, full and fp32, gathered from the ZeRO partitions
    (collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from ssl3d.strategies.base import clean_name

    out = {}
    for name, p in strategy.module.named_parameters():
        moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
        out[clean_name(name)] = {k: v.detach().float().cpu().clone() for k, v in moments.items() if v is not None}
    return out


def run_config(grad_accum: int, micro: int, precision: str = "fp32") -> Config:
    cfg = Config()
    cfg.model = TINY
    cfg.optim = OptimConfig(name="adamw", lr=LR, weight_decay=0.1, schedule="constant")
    cfg.train.batch_size = micro
    cfg.train.grad_accum = grad_accum
    cfg.train.grad_clip = GRAD_CLIP
    cfg.train.precision = precision
    cfg.train.device = "cpu"
    return cfg


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=LR, eps=ADAM_EPS, weight_decay=0.1)


def make_strategy(preset: dict[str, Any], sc: Scenario, world: int, micro: int, out: Path):
    """Through ``build_strategy``, as the CLI does: the preset is a ds_config file, the world comes from the env."""
    from ssl3d.strategies import build_strategy

    cfg = run_config(sc.grad_accum, micro, sc.precision)
    if sc.gather:
        preset = {**preset, "gather_contrastive": True}
    path = out / f"ds_config_rank{os.environ.get('RANK', 0)}.json"
    path.write_text(json.dumps(preset))
    cfg.ds_config = str(path)
    strategy = build_strategy(cfg)
    assert strategy.world_size == world
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    model = build_model(TINY, CONTRASTIVE_DIM)
    if sc.checkpointing == "wrapper":
        apply_checkpointing(model)
    elif sc.checkpointing:
        from ssl3d.memory import apply_activation_checkpointing as apply_policy

        apply_policy(model, sc.checkpointing)  # swaps block/decoder classes; names unchanged
    wrapped, optimizer = strategy.setup(model, make_optimizer)
    return strategy, wrapped, optimizer


def train(
    strategy,
    model,
    sc: Scenario,
    rank: int,
    world: int,
    micro: int,
    first_step: int,
    ckpt_root: Path | None,
    on_step: Any = None,
    saved: dict[str, Any] | None = None,
    record_optimizer: bool = False,
    seen: dict[str, Any] | None = None,
):
    """Steps ``first_step..STEPS-1``; returns per-step gradient norms and mean losses (this rank's).

    With ``ckpt_root`` a checkpoint is written after ``sc.save_after`` steps, and the weights it holds are put in
    ``saved["state"]`` (from full_state_dict, for comparing with offline consolidation)."""
    from ssl3d.checkpoint import CheckpointManager

    data = global_batches(sc.grad_accum, world, micro)
    norms, losses = [], []
    for step in range(first_step, STEPS):
        strategy.set_lr(LR * (step + 1) / STEPS)  # a warm-up: set_lr must reach the (wrapped) optimizer
        total = 0.0
        for m in range(sc.grad_accum):
            sync = m == sc.grad_accum - 1
            x = data[step, m, rank * micro : (rank + 1) * micro]
            if sc.ssl_loss:
                loss = ssl_step(strategy, model, x, rank * micro, sc, sync, world)
                total += float(loss.detach()) / sc.grad_accum
                continue
            with strategy.accumulate(sync):
                with strategy.autocast():
                    gather = (strategy.gather_embeddings if world > 1 else lambda t: t) if sc.gather else None
                    loss = deterministic_loss(model, x, rank * micro, gather, seen)
                if sc.nan_step == step:
                    loss = loss * float("nan")
                strategy.backward(loss)
            total += float(loss.detach()) / sc.grad_accum
        norms.append(strategy.step(GRAD_CLIP).grad_norm)
        losses.append(total)
        if on_step is not None:
            on_step(step)
        if sc.save_after == step + 1 and ckpt_root is not None:
            extra = {"step": step + 1, "rank": rank}
            CheckpointManager(ckpt_root, strategy).save(step + 1, extra)
            if saved is not None:
                saved["state"] = strategy.full_state_dict()
                if record_optimizer:
                    saved["optim"] = full_optimizer_state(strategy)
    return norms, losses


def run_scenario(job: Job, sc: Scenario, rank: int, out: Path, states: dict[str, Any]) -> dict[str, Any]:
    from ssl3d.checkpoint import CheckpointManager

    t0 = time.perf_counter()
    strategy, model, optimizer = make_strategy(job.preset, sc, job.world, job.micro, out)
    result: dict[str, Any] = {}
    seen: dict[str, Any] = {}
    first = 0
    if sc.resume_from:
        root = Path(job.checkpoint_dir) if job.checkpoint_dir else out / f"{job.backend}_{sc.resume_from}_ckpt"
        folder = CheckpointManager(root, strategy).latest()
        assert folder is not None, f"no checkpoint under {root}"
        extra = strategy.load(folder)
        first = int(extra["step"])
        if job.record_optimizer:
            result["loaded_optim"] = full_optimizer_state(strategy)
            result["loaded_state"] = strategy.full_state_dict()
    if sc.load_weights_from:
        # full_state_dict() is meaningful on rank 0: go through a file, as a user starting from weights would.
        path = out / f"{job.backend}_{sc.load_weights_from}_weights.pt"
        if rank == 0:
            torch.save(states[sc.load_weights_from], path)
        strategy.barrier()
        strategy.load_model_weights(torch.load(path, weights_only=True))
        result.update(norms=[], losses=[])
    else:
        ckpt_root = out / f"{job.backend}_{sc.name}_ckpt" if sc.save_after else None
        saved: dict[str, Any] = {}
        norms, losses = train(
            strategy,
            model,
            sc,
            rank,
            job.world,
            job.micro,
            first,
            ckpt_root,
            saved=saved,
            record_optimizer=job.record_optimizer,
            seen=seen,
        )
        result.update(norms=norms, losses=losses, saved_state=saved.get("state"), saved_optim=saved.get("optim"))
        result["activation_dtype"] = seen.get("activation_dtype")
        if sc.name == "plain" and job.world > 1:  # what each rank holds, and DeepSpeed's ZeRO stage
            sizes = local_sizes(model, optimizer)
            if hasattr(model, "zero_optimization_stage"):
                sizes["zero_stage"] = model.zero_optimization_stage()
            result["local_sizes"] = [{} for _ in range(job.world)]
            torch.distributed.all_gather_object(result["local_sizes"], sizes)
    state = strategy.full_state_dict()  # collective
    result["state"] = state
    result["seconds"] = time.perf_counter() - t0
    result["memory"] = strategy.memory_report()
    return result


def worker(rank: int, jobs: list[Job], port: int, out: str, name: str) -> None:
    world = jobs[0].world
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # 2 processes on 2 cores
    # DeepSpeed 0.19 calls c10d functions that torch 2.13 deprecates, once per collective.
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    out_dir = Path(out)
    results: dict[str, Any] = {}
    try:
        for job in jobs:
            t0 = time.perf_counter()
            results[job.backend] = job_results = {}
            states: dict[str, Any] = {}
            for scenario_name in job.scenarios:
                try:
                    res = run_scenario(job, SCENARIOS[scenario_name], rank, out_dir, states)
                except Exception:
                    job_results[scenario_name] = {"error": traceback.format_exc()}
                    # The other rank may now wait in a collective that never comes: stop the whole group.
                    raise
                states[scenario_name] = res["state"]
                job_results[scenario_name] = res
            job_results["_seconds"] = time.perf_counter() - t0
    finally:
        if rank == 0:
            torch.save(results, out_dir / f"{name}.pt")
        torch.distributed.destroy_process_group()


def spawn(jobs: Job | list[Job], out: Path, name: str | None = None) -> dict[str, Any]:
    """Run the jobs one after the other on ``world`` fresh processes (one start-up for all of them).

    Returns ``{backend: {scenario: result}}`` from rank 0; when a process failed, every scenario that did not
    finish carries the failure as ``{"error": ...}``.
    """
    import torch.multiprocessing as mp

    from ssl3d.strategies.distributed import free_port

    jobs = [jobs] if isinstance(jobs, Job) else jobs
    assert len({j.world for j in jobs}) == 1, "one process group per spawn"
    name = name or "_".join(j.backend for j in jobs)
    out.mkdir(parents=True, exist_ok=True)
    failure = None
    try:
        mp.spawn(worker, args=(jobs, free_port(), str(out), name), nprocs=jobs[0].world, join=True)
    except Exception as exc:  # noqa: BLE001 - reported per scenario below
        failure = str(exc)
    path = out / f"{name}.pt"
    results = torch.load(path, weights_only=False) if path.exists() else {}
    for job in jobs:
        job_results = results.setdefault(job.backend, {})
        for scenario_name in job.scenarios:
            job_results.setdefault(scenario_name, {"error": f"not run: the group {name} failed: {failure}"})
    return results


def reference(scenarios: list[str]) -> dict[str, Any]:
    """The same scenarios on one process (SingleStrategy) with the whole global batch per micro-batch."""
    from ssl3d.strategies.single import SingleStrategy

    results: dict[str, Any] = {}
    for name in scenarios:
        sc = replace(SCENARIOS[name], checkpointing=None, save_after=None, grad_cache=0)
        strategy = SingleStrategy(torch.device("cpu"), torch.float32, grad_accum=sc.grad_accum)
        torch.manual_seed(0)
        model = build_model(TINY, CONTRASTIVE_DIM)
        wrapped, _ = strategy.setup(model, make_optimizer)
        snapshots = []

        def snapshot(step: int, strategy=strategy, snapshots=snapshots) -> None:
            optim = {
                i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                for i, s in strategy.optimizer.state_dict()["state"].items()
            }
            snapshots.append((strategy.full_state_dict(), optim))

        norms, losses = train(strategy, wrapped, sc, 0, 1, WORLD * MICRO, 0, None, on_step=snapshot)
        results[name] = {"norms": norms, "losses": losses, "state": strategy.full_state_dict(), "snapshots": snapshots}
    return results
