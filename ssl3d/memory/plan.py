"""What fits: largest crop and batch per backend and world size, and the cheapest checkpointing that fits.

Everything here asks ``estimate_memory``; traces are cached per (ROI, batch, policy), and the sharding arithmetic
that distinguishes backends is free, so a whole table costs a few dozen traces. Peak memory grows monotonically
with ROI and batch, so both searches are binary searches over the candidates.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl3d.config import ConfigError, ModelConfig
from ssl3d.memory.activation_checkpointing import CheckpointPolicy, as_policy
from ssl3d.memory.estimate import GIB, MIB, STRATEGIES, estimate_memory, normalize_roi, step_settings
from ssl3d.step import StepSettings

STEP_FIELDS = frozenset(f.name for f in dataclasses.fields(StepSettings))

__all__ = [
    "CAPACITY_MARGIN",
    "DEFAULT_LADDER",
    "MemoryFit",
    "fit_memory",
    "fit_memory_flag",
    "format_plan",
    "plan_memory",
    "plot_memory_vs_roi",
    "task_ladder",
    "usable_capacity",
]

# A fit on a real card plans for at most its capacity less this share: room for what the estimate leaves out or gets
# wrong (fragmentation beyond its 10%, a cuDNN engine with a larger workspace, other processes on the GPU).
CAPACITY_MARGIN = 0.06

# Cheapest first: recomputation (and host traffic) grows down the list.
DEFAULT_LADDER: tuple[tuple[str, dict[str, Any]], ...] = (
    ("none", {"policy": "none"}),
    ("decoder", {"policy": "selective", "stages": [], "decoder": True}),
    ("selective-mlp", {"policy": "selective", "stages": [0, 1], "part": "mlp"}),
    ("selective-attention", {"policy": "selective", "stages": [0, 1], "part": "attention"}),
    ("selective-both", {"policy": "selective", "stages": [0, 1], "part": "both", "decoder": True}),
    ("full", {"policy": "full"}),
    # The stage-0 Swin MLPs' 4x-wide hidden layer is then the largest thing alive in backward (at 320^3).
    ("full+mlp-chunks", {"policy": "full", "mlp_chunks": 4}),
    ("full+offload", {"policy": "full", "offload_to_cpu": True}),
)


def task_ladder(ladder: Sequence[tuple[str, dict[str, Any]]], step: StepSettings) -> list[tuple[str, dict[str, Any]]]:
    """The rungs that change something for this step's model, first of each kind kept.

    A policy acts on the Swin blocks, the patch mergings and the "decoder": the SSL model's reconstruction decoder,
    or SwinUNETR's convolutional encoder/decoder blocks (``SEGMENTATION_DECODER``) when fine-tuning. Two rungs that
    wrap the same modules the same way are one rung. The probe's encoder is frozen and runs under ``no_grad``
    (nothing saved, nothing to recompute) and its heads are never wrapped: every rung is the first."""
    import copy

    from ssl3d.memory.activation_checkpointing import apply_activation_checkpointing, checkpointed_modules
    from ssl3d.model.meta import meta_model, model_key

    if step.task.frozen_encoder:
        return list(ladder[:1])
    model = copy.deepcopy(meta_model(model_key(step.model), step.contrastive_dim, step.task, step.num_classes))
    seen, out = set(), []
    for name, section in ladder:
        pol = as_policy(section)
        apply_activation_checkpointing(model, pol, warn=False)
        key = (json.dumps(checkpointed_modules(model), sort_keys=True), pol.offload_to_cpu or pol.policy == "offload")
        if key not in seen:
            seen.add(key)
            out.append((name, section))
    return out


def _search_largest(candidates: Sequence[int], fits) -> int | None:  # type: ignore[no-untyped-def]
    """Largest candidate with fits(c) True, assuming fits is monotone (True ... True False ... False)."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def plan_memory(
    budget_bytes: int,
    model: ModelConfig | StepSettings,
    roi: int | Sequence[int] | None = None,
    batch_size: int = 1,
    num_samples: int = 2,
    precision: str = "bf16",
    fused_attention: bool = True,
    strategies: Sequence[str] = STRATEGIES,
    world_sizes: Sequence[int] = (1, 2, 4, 8),
    device: str = "cuda",
    limit_policies: Sequence[str] = ("none", "full", "full+mlp-chunks"),
    ladder: Sequence[tuple[str, dict[str, Any]]] = DEFAULT_LADDER,
    max_roi: int = 512,
    max_batch: int = 64,
    offload_optimizer: bool = False,
    plot_path: str | Path | None = None,
    plot_rois: Sequence[int] | None = None,
    task: Any = None,
) -> dict[str, Any]:
    """For each strategy and world size: largest cubic ROI and largest batch (at ``roi``) under each of
    ``limit_policies`` (ladder names), and the cheapest ladder policy that makes ``roi`` x ``batch_size`` fit.

    ``budget_bytes`` is the device memory per rank (the estimate's ``total``: allocator and CUDA context
    included for ``device="cuda"``). ``model``: ``StepSettings``, or a model config with ``task`` (a
    ``ssl3d.tasks.Task``). Returns a JSON-ready dict; ``format_plan`` prints it.
    """
    if budget_bytes <= 0:
        raise ConfigError(f"budget: got {budget_bytes} bytes, expected a positive size")
    if isinstance(model, StepSettings):
        ladder = task_ladder(ladder, model)
        # Columns for policies that are the same rung as an earlier one for this model (the probe) are left out.
        limit_policies = [n for n in limit_policies if n in {name for name, _ in ladder}] or [ladder[0][0]]
    names = [n for n, _ in ladder]
    policies = {n: as_policy(p) for n, p in ladder}
    for name in limit_policies:
        if name not in policies:
            raise ConfigError(f"limit_policies: {name!r} is not on the ladder; choose from {', '.join(names)}")
    for s in strategies:
        if s not in STRATEGIES:
            raise ConfigError(f'strategies: got "{s}", expected some of {", ".join(STRATEGIES)}')
    if isinstance(model, StepSettings):  # the step as the run configures it
        step = model
        model, roi, batch_size, num_samples = step.model, step.roi, step.batch_size, step.num_samples
        precision, fused_attention = step.precision, step.fused_attention
    else:
        if task is None:
            raise ConfigError("task: missing; give the task whose step is planned (ssl3d.tasks.get_task)")
        step = StepSettings(model, roi or 64, batch_size, num_samples, precision, None, fused_attention, task=task)
    roi3 = normalize_roi(roi) if roi is not None else None
    rois = [r for r in range(64, max_roi + 1, 32)]

    def total(strategy: str, ws: int, r: int | tuple[int, int, int], batch: int, policy: CheckpointPolicy) -> int:
        setting = dataclasses.replace(step, roi=r, batch_size=batch, policy=policy, grad_cache_chunk=0)
        return estimate_memory(
            setting, strategy=strategy, world_size=ws, device=device, offload_optimizer=offload_optimizer
        ).total

    rows = []
    for strategy in strategies:
        for ws in world_sizes if strategy != "single" else (1,):
            row: dict[str, Any] = {"strategy": strategy, "world_size": ws, "largest_roi": {}, "largest_batch": {}}
            for name in limit_policies:
                pol = policies[name]
                row["largest_roi"][name] = _search_largest(
                    rois, lambda r, pol=pol, s=strategy, n=ws: total(s, n, r, batch_size, pol) <= budget_bytes
                )
                if roi3 is not None:
                    row["largest_batch"][name] = _largest_batch(
                        lambda b, pol=pol, s=strategy, n=ws: total(s, n, roi3, b, pol) <= budget_bytes, max_batch
                    )
            if roi3 is not None:
                row["cheapest_policy"] = None
                for name in names:
                    t = total(strategy, ws, roi3, batch_size, policies[name])
                    if t <= budget_bytes:
                        row["cheapest_policy"] = name
                        row["cheapest_policy_total"] = t
                        row["cheapest_policy_section"] = policies[name].to_dict()
                        break
            rows.append(row)
    result: dict[str, Any] = {
        "budget_bytes": int(budget_bytes),
        "model": {"feature_size": model.feature_size, "depths": list(model.depths)},
        "roi": list(roi3) if roi3 else None,
        "batch_size": batch_size,
        "num_samples": num_samples,
        "precision": precision,
        "fused_attention": fused_attention,
        "device": device,
        "task": step.task.name,
        "task_label": step.task.describe(step.num_classes),
        "num_classes": step.num_classes if step.task.needs_classes else None,
        "ladder": names,
        "rows": rows,
    }
    if plot_path is not None:
        grid = list(plot_rois) if plot_rois else [r for r in rois if r <= 256]
        result["plot"] = plot_memory_vs_roi(
            plot_path, model, grid, batch_size, num_samples, precision, fused_attention, device, ladder, budget_bytes,
            task=step.task, num_classes=step.num_classes,
        )  # fmt: skip
    return result


def usable_capacity(total_memory: int) -> int:
    """What a fit may plan for on a card of ``total_memory`` bytes (``get_device_properties().total_memory``): the
    card less ``CAPACITY_MARGIN``. A 32 GB V100 reports 34,089,730,048 bytes (31.75 GiB): 29.84 GiB."""
    return int(total_memory * (1 - CAPACITY_MARGIN))


def fit_memory_flag(total_memory: int) -> tuple[int, str]:
    """The ``--fit-memory`` size to suggest for a card: its usable capacity rounded DOWN to a whole GiB (to a MiB
    below 1 GiB), as bytes and as the flag's text, e.g. ``(29 GiB, "29GiB")`` for a 32 GB V100."""
    usable = usable_capacity(total_memory)
    if usable >= GIB:
        return usable // GIB * GIB, f"{usable // GIB}GiB"
    return usable // MIB * MIB, f"{usable // MIB}MiB"


def _device_capacity(device: str) -> tuple[int, str] | None:
    """Total memory and name of the current CUDA device when the estimate is for CUDA and this machine has one."""
    if device != "cuda":
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties()
        return int(props.total_memory), str(getattr(props, "name", "this GPU"))
    except Exception:  # noqa: BLE001 - no device to compare with: the budget is the user's
        return None


@dataclass
class MemoryFit:
    """What ``ssl3d pretrain --fit-memory`` applies: a ladder policy and a gradient-caching chunk (0: off)."""

    policy_name: str
    policy: dict[str, Any]  # an activation_checkpointing section
    grad_cache_chunk: int
    estimate_bytes: int
    tried: int  # configurations estimated
    budget_bytes: int = 0  # the budget the fit was made for (the request, or less on a card it would not fit)
    note: str = ""  # why the budget differs from the one asked for

    def describe(self, budget_bytes: int) -> str:
        """One line for the run's log; ``budget_bytes`` is the one asked for (the fit's own one wins if it has one)."""
        cache = (
            f"gradient caching {self.grad_cache_chunk} views per chunk"
            if self.grad_cache_chunk
            else "no gradient caching"
        )
        budget = self.budget_bytes or budget_bytes
        note = f" ({self.note})" if self.note else ""
        return (
            f"activation checkpointing {self.policy_name!r}, {cache}: estimated peak "
            f"{self.estimate_bytes / GIB:.2f} GiB per rank of {budget / GIB:.2f} GiB{note}"
        )


def estimator_setting(
    cfg: Any, ds: Any, world_size: int, task: Any, num_classes: int | None = None
) -> tuple[StepSettings, dict[str, Any]]:
    """A run config and its resolved preset as the estimator's arguments: the step's settings, and how ranks share
    it (strategy, world size, offload, bucket size). ``task``: the run's ``ssl3d.tasks.Task``; ``num_classes``: its
    outputs (default: the task's own), with the same checkpointing policy rule for every task."""
    classes = num_classes if num_classes is not None else task.num_classes
    strategy = {"deepspeed": f"zero{ds.zero_stage}" if ds.zero_stage else "ddp", "fairscale": "zero1"}.get(
        ds.strategy, ds.strategy
    )
    step = StepSettings(
        model=cfg.model,
        roi=tuple(cfg.data.roi),
        batch_size=cfg.train.batch_size,
        num_samples=cfg.data.num_samples,
        precision=ds.precision,
        policy=ds.activation_checkpointing or ({"policy": "full"} if cfg.model.use_checkpoint else None),
        fused_attention=cfg.model.fused_attention,
        contrastive_dim=cfg.ssl.contrastive_dim,
        grad_cache_chunk=cfg.ssl.grad_cache_chunk if task.supports_grad_cache else 0,
        num_classes=classes if task.needs_classes else StepSettings.num_classes,
        # The queue of negatives belongs to the contrastive loss, as gradient caching does.
        negative_queue=cfg.ssl.negative_queue if task.supports_grad_cache else 0,
        task=task,
    )
    zero = (ds.deepspeed or {}).get("zero_optimization", {})
    sharding = {
        "strategy": "single" if strategy == "single" and world_size == 1 else strategy,
        "world_size": world_size,
        "offload_optimizer": ds.offload_optimizer.enabled or ds.fsdp.cpu_offload,
        "offload_params": ds.offload_param.enabled or ds.fsdp.cpu_offload,
        **({"reduce_bucket_size": int(zero["reduce_bucket_size"])} if "reduce_bucket_size" in zero else {}),
    }
    return step, sharding


def out_of_memory_help(cfg: Any, strategy: Any, task: Any) -> str:
    """For an out-of-memory stop: the measured peak, the estimate for this run, and the planner's suggestion.

    Never raises: whatever cannot be worked out is left out of the message rather than hiding the real error."""
    parts = []
    capacity = None
    try:
        import torch

        if strategy.device.type == "cuda":
            peak = torch.cuda.max_memory_reserved(strategy.device)
            capacity = torch.cuda.get_device_properties(strategy.device).total_memory
            parts.append(f"measured peak {peak / GIB:.2f} GiB reserved of {capacity / GIB:.2f} GiB on this device")
        else:
            import psutil

            capacity = psutil.virtual_memory().total
            rss = strategy.memory_report().get("host_rss_peak_gib")
            if rss is not None:
                parts.append(f"measured peak RSS {rss:.2f} GiB of {capacity / GIB:.2f} GiB host memory")
        setting = estimator_setting(cfg, strategy.ds_config, strategy.world_size, task) if strategy.ds_config else None
    except Exception:  # noqa: BLE001 - advice only
        setting = None
    if setting is not None:
        step, sharding = setting
        device = strategy.device.type
        try:
            est = estimate_memory(step, **sharding, device=device).total
            parts.append(f"the estimate for this run is {est / GIB:.2f} GiB per rank")
        except Exception:  # noqa: BLE001 - advice only
            pass
        if capacity:
            # The flag to copy: the device's (or host's) capacity less the margin, rounded down; never the whole card.
            budget, flag = fit_memory_flag(capacity)
            try:
                fit = fit_memory(budget, step, device=device, **sharding)
                parts.append(f"--fit-memory {flag} would use {fit.describe(budget)}")
            except ConfigError as err:
                parts.append(str(err).replace("--fit-memory: ", "the planner: "))
            except Exception:  # noqa: BLE001 - advice only
                pass
    parts.append("see ssl3d memory estimate / plan")
    return "; ".join(parts)


def fit_memory(
    budget_bytes: int,
    model: ModelConfig | StepSettings,
    *step: Any,
    ladder: Sequence[tuple[str, dict[str, Any]]] = DEFAULT_LADDER,
    **estimate_kwargs: Any,
) -> MemoryFit:
    """The cheapest way to run this step within ``budget_bytes`` per rank, by the estimator.

    Cheapest first: the checkpointing ladder without gradient caching; then, when no rung fits, gradient caching
    with halving chunks (each rung again), since caching costs one extra forward per step. Raises ``ConfigError``
    with the largest cubic ROI that would fit when nothing does.

    For ``device="cuda"`` on a machine with CUDA, the budget is at most the current device's ``usable_capacity``
    (its capacity less ``CAPACITY_MARGIN``): ``--fit-memory 32GiB`` on a 32 GB V100 (31.75 GiB) plans for 29.84 GiB
    and the fit's ``note`` says so. Planning for a GPU elsewhere uses the budget as given.
    """
    if budget_bytes <= 0:
        raise ConfigError(f"--fit-memory: got {budget_bytes} bytes, expected a positive size such as 29GiB")
    note = ""
    card = _device_capacity(estimate_kwargs.get("device", "cuda"))
    if card is not None and budget_bytes > usable_capacity(card[0]):
        total, name = card
        note = (
            f"--fit-memory {budget_bytes / GIB:.2f} GiB is above what the {name}'s {total / GIB:.2f} GiB allows "
            f"after a {CAPACITY_MARGIN:.0%} margin; planned for {usable_capacity(total) / GIB:.2f} GiB"
        )
        budget_bytes = usable_capacity(total)
    # The step's own settings (its policy and chunk are what this chooses); the rest says how ranks share it.
    own = {k: estimate_kwargs.pop(k) for k in list(estimate_kwargs) if k in STEP_FIELDS}
    setting = step_settings(model, *step, **own)
    roi, batch_size, num_samples = setting.roi, setting.batch_size, setting.num_samples
    rows = 2 * batch_size * num_samples  # views per micro-batch
    chunks = [0]
    c = rows // 2
    while c >= 1 and setting.task.supports_grad_cache:  # gradient caching is the contrastive loss's
        chunks.append(c)
        c //= 2
    ladder = task_ladder(ladder, setting)
    if estimate_kwargs.get("device", "cuda") == "cpu":
        # Offloading saved activations to host memory saves nothing when the device IS the host.
        ladder = [
            (n, sec) for n, sec in ladder if not (as_policy(sec).offload_to_cpu or as_policy(sec).policy == "offload")
        ]
    tried = 0

    def total(section: dict[str, Any], chunk: int) -> int:
        nonlocal tried
        tried += 1
        rung = dataclasses.replace(setting, policy=as_policy(section), grad_cache_chunk=chunk)
        return estimate_memory(rung, **estimate_kwargs).total

    # Peak memory is not monotone along the ladder (recomputation has temporaries of its own; for small models the
    # decoder can dominate), so every rung is estimated in order, cheapest first; traces are cached.
    smallest = None
    for chunk in chunks:
        for name, section in ladder:
            t = total(section, chunk)
            if t <= budget_bytes:
                return MemoryFit(name, as_policy(section).to_dict(), chunk, t, tried, budget_bytes, note)
            smallest = t if smallest is None else min(smallest, t)
    last_name, last_section = ladder[-1]
    # Only smaller ROIs can fit (the requested one does not): a short search.
    best_roi = _search_largest(
        list(range(64, max(normalize_roi(roi)), 32)),
        lambda r: (
            estimate_memory(
                dataclasses.replace(setting, roi=r, policy=as_policy(last_section), grad_cache_chunk=chunks[-1]),
                **estimate_kwargs,
            ).total
            <= budget_bytes
        ),
    )
    hint = f"the largest cubic ROI that fits is {best_roi}" if best_roi else "not even ROI 64 fits"
    caching = ", gradient caching down to one view per chunk" if chunks[-1] else ""
    per_chunk = " and one view per chunk" if chunks[-1] else ""
    why = f" ({note})" if note else ""
    raise ConfigError(
        f"--fit-memory: ROI {list(normalize_roi(roi))} x batch {batch_size} x {num_samples} crops needs at least "
        f"{smallest / GIB:.2f} GiB per rank (every checkpointing policy{caching}), over the budget of "
        f"{budget_bytes / GIB:.2f} GiB{why}; {hint} with {last_name!r}{per_chunk} (or shard over more ranks)"
    )


def _largest_batch(fits, max_batch: int) -> int | None:  # type: ignore[no-untyped-def]
    if not fits(1):
        return None
    b = 1
    while b * 2 <= max_batch and fits(b * 2):
        b *= 2
    return _search_largest(list(range(b, min(2 * b, max_batch + 1))), fits)


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a fixed-width table."""
    roi = "x".join(str(r) for r in plan["roi"]) if plan["roi"] else "-"
    what = plan.get("task_label", "")
    lines = [
        f"{what}budget {plan['budget_bytes'] / GIB:.1f} GiB per rank, {plan['precision']}, "
        f"crops x{plan['num_samples']}, "
        f"batch {plan['batch_size']}, requested roi {roi}, fused attention {'on' if plan['fused_attention'] else 'off'}"
    ]
    limit = list(plan["rows"][0]["largest_roi"]) if plan["rows"] else []
    head = f"{'strategy':<8} {'ranks':>5}  " + "  ".join(f"{'max roi ' + n:>18}" for n in limit)
    if plan["roi"]:
        head += "  " + "  ".join(f"{'max batch ' + n:>20}" for n in limit) + f"  {'cheapest policy':<20} GiB"
    lines.append(head)
    for row in plan["rows"]:
        line = f"{row['strategy']:<8} {row['world_size']:>5}  " + "  ".join(
            f"{str(row['largest_roi'][n] or '-'):>18}" for n in limit
        )
        if plan["roi"]:
            line += "  " + "  ".join(f"{str(row['largest_batch'][n] or '-'):>20}" for n in limit)
            cheap = row.get("cheapest_policy") or "does not fit"
            gib = f"{row['cheapest_policy_total'] / GIB:.1f}" if row.get("cheapest_policy") else ""
            line += f"  {cheap:<20} {gib}"
        lines.append(line)
    if plan.get("plot"):
        lines.append(f"plot: {plan['plot']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# A line plot with PIL (matplotlib is not a dependency).

_COLORS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
)


def plot_memory_vs_roi(
    path: str | Path,
    model: ModelConfig,
    rois: Sequence[int],
    batch_size: int = 1,
    num_samples: int = 2,
    precision: str = "bf16",
    fused_attention: bool = True,
    device: str = "cuda",
    ladder: Sequence[tuple[str, dict[str, Any]]] = DEFAULT_LADDER,
    budget_bytes: int | None = None,
    *,
    task: Any,
    num_classes: int = 14,
) -> str:
    """PNG of estimated peak memory (one rank, no sharding) against cubic ROI, one line per ladder policy; ``task``
    and ``num_classes`` as in ``StepSettings`` (fine-tuning: SwinUNETR's step)."""
    from PIL import Image, ImageDraw

    series = {}
    for name, pol in ladder:
        step = StepSettings(
            model, 64, batch_size, num_samples, precision, as_policy(pol), fused_attention, task=task,
            num_classes=num_classes,
        )  # fmt: skip
        series[name] = [estimate_memory(dataclasses.replace(step, roi=r), device=device).total / GIB for r in rois]
    w, h, left, right, top, bottom = 900, 560, 70, 190, 40, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    ymax = max(max(v) for v in series.values())
    if budget_bytes:
        ymax = max(ymax, budget_bytes / GIB)
    ymax *= 1.05
    x0, x1 = min(rois), max(rois)

    def px(r: float, g: float) -> tuple[float, float]:
        x = left + (r - x0) / max(x1 - x0, 1) * (w - left - right)
        y = h - bottom - g / ymax * (h - top - bottom)
        return x, y

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for r in rois:
        x, _ = px(r, 0)
        d.line([x, h - bottom, x, h - bottom + 5], fill="black")
        d.text((x - 10, h - bottom + 8), str(r), fill="black")
    step = _nice_step(ymax)
    g = 0.0
    while g <= ymax:
        _, y = px(x0, g)
        d.line([left - 5, y, left, y], fill="black")
        d.line([left, y, w - right, y], fill=(230, 230, 230))
        d.text((8, y - 6), f"{g:g}", fill="black")
        g += step
    for i, (name, ys) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        pts = [px(r, v) for r, v in zip(rois, ys)]
        d.line(pts, fill=color, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        d.text((w - right + 10, top + 16 * i), name, fill=color)
    if budget_bytes:
        _, y = px(x0, budget_bytes / GIB)
        d.line([left, y, w - right, y], fill=(0, 0, 0), width=1)
        d.text((left + 6, y - 14), f"budget {budget_bytes / GIB:g} GiB", fill="black")
    title = (
        f"estimated peak per rank (GiB) vs cubic ROI; {task.name}, feature {model.feature_size}, "
        f"batch {batch_size}x{num_samples}, {precision}, {device}"
    )
    d.text((left, 12), title, fill="black")
    d.text((w // 2 - 20, h - 20), "ROI (voxels per side)", fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    (Path(path).with_suffix(".json")).write_text(json.dumps({"rois": list(rois), "gib": series}, indent=1))
    return str(path)


def _nice_step(ymax: float) -> float:
    for s in (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100):
        if ymax / s <= 10:
            return float(s)
    return 200.0
