"""What keeps the contrastive head from collapsing? Short pre-trainings on the demo data, one change each.

A collapsed contrastive head maps every view to the same point: its loss sits at exactly ln(2N - 1) for 2N views in
the loss (ln 3 at the reference's 4), the embeddings' per-dimension std goes to 0 and their effective rank to 1
(``ssl3d.ssl.monitors``). Each variant below is a real ``ssl3d pretrain`` run (two processes over torchrun for the
global negatives), read back from its TensorBoard events at every validation:

- ``reference``: the CPU demo preset's model and data, 2 crops a volume (4 views), temperature 0.5, weights 1/1/1;
- ``temperature-0.1``: a sharper softmax;
- ``crops-4``: 4 crops a volume (8 views, 7 negatives each), with contrastive gradient caching 4 views a chunk;
- ``contrastive-x4``: contrastive weight 4 (the reconstruction loss no longer dominates the encoder's gradient);
- ``gather-2-ranks``: DDP on 2 ranks with ``"gather_contrastive": true``: each rank's loss sees both ranks' views.

    python bench/collapse.py --work /tmp/ssl3d_collapse --steps 60 --eval-every 20   # results: BENCHMARKS.md

``--direct`` is the evidence for the single-device recipe (``configs/single_gpu.json``: many views per step through
gradient caching, plus a queue of negatives). It drives ``SSLTask`` and the model directly, one process, on real CT
(``ssl3d data samples DIR``, passed as ``--samples DIR``) plus the demo volumes, with one warm-up + cosine schedule
that reaches its peak within the run, and reads the collapse monitors every ``--eval-every`` steps on fixed
validation crops laid out the same way for every setting (4 crops = 8 views a batch, collapsed at ln 7):

- ``reference``: the reference's per-device batch, 1 volume x 2 crops = 4 views, one pass, no queue;
- ``recipe``: the recipe's views, chunk and queue (read from the run config) on the same small model;
- ``recipe-no-queue``: the recipe without the queue (many views through gradient caching alone);
- ``gather-2-ranks``: the reference's per-device batch on each of 2 ranks with ``"gather_contrastive": true`` (8
  views in the loss, 4 per device), run as the one process it equals: the global batch of 2 volumes x 2 crops in
  one pass. DDP with the gather computes exactly one process's loss and gradient on the global batch up to float
  summation order (``Strategy.gather_embeddings``; tests/dist/test_strategies.py ``gather``,
  tests/dist/test_queue_strategies.py), so the run answers what 2 devices buy without a second process on 2 cores;
- ``recipe-2-volumes``: one device, 2 volumes x 2 crops = 8 views a step through gradient caching at the recipe's
  chunk (``train.batch_size 2, data.num_samples 2``): the recipe's views and activation memory with gather-2-ranks'
  negatives (the same loss and gradient in exact arithmetic; float summation order differs).

    python bench/collapse.py --direct --samples data/samples --work /tmp/ssl3d_recipe --steps 300 --eval-every 50

A setting may carry the loss keys ``temperature``, ``rotation_weight``, ``contrastive_weight`` and
``reconstruction_weight`` (the recipe's from its ``ssl`` section; absent: 0.5 and 1/1/1); ``--extra NAME=JSON`` adds
a candidate setting, e.g. ``--only recipe-t02 --extra 'recipe-t02={"crops": 4, "chunk": 4, "queue": 0,
"temperature": 0.2}'``. The monitors' validation contrastive is always at temperature 0.5 (comparable across
settings); a setting with another temperature also records ``contrastive_at_t``.

Every direct run also writes its encoder, ``<work>/encoders/<setting>/seed<S>/model_swinvit.pt`` with its metadata,
for the downstream check (``bench/downstream.py --init``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl3d.run_config import DEMO_CPU  # noqa: E402

# The CPU demo preset's model, data and optimiser (``ssl3d pretrain`` with no config), cosine schedule.
BASE = {
    **{k: v for k, v in DEMO_CPU.items() if not k.startswith("train.")},
    "data.num_workers": 1,
    "train.batch_size": 1,
    "optim.schedule": "warmup_cosine",
    "train.progress": False,
}
VARIANTS: dict[str, tuple[dict, int, dict | None]] = {  # name -> (overrides, ranks, preset)
    "reference": ({}, 1, None),
    "temperature-0.1": ({"ssl.temperature": 0.1}, 1, None),
    "crops-4": ({"data.num_samples": 4, "ssl.grad_cache_chunk": 4}, 1, None),
    "contrastive-x4": ({"ssl.contrastive_weight": 4.0}, 1, None),
    "gather-2-ranks": ({}, 2, {"strategy": "ddp", "gather_contrastive": True}),
}
TAGS = {
    "contrastive": "Validation/loss_contrastive",
    "rotation": "Validation/loss_rotation",
    "std": "Validation/collapse_embedding_std",
    "rank": "Validation/collapse_effective_rank",
    "recon_masked": "Validation/loss_reconstruction_masked",
}


def sets(values: dict) -> list[str]:
    return [f"--set={k}={json.dumps(v)}" for k, v in values.items()]


def read_events(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags()["scalars"])
    return {k: [(e.step, e.value) for e in acc.Scalars(tag)] for k, tag in TAGS.items() if tag in have}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/ssl3d_collapse"))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--only", help="comma list of variants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--direct", action="store_true", help="the single-device recipe's evidence (see the docstring)")
    p.add_argument("--samples", type=Path, help="--direct: folder written by `ssl3d data samples` (real CT)")
    p.add_argument("--no-demo", action="store_true", help="--direct: the real CT of --samples only, no demo volumes")
    p.add_argument("--recipe", type=Path, default=Path(__file__).resolve().parent.parent / "configs/single_gpu.json")
    p.add_argument("--seeds", type=int, nargs="+", help="--direct: seeds (default: --seed)")
    p.add_argument("--queues", type=int, nargs="+", help="--direct: also the recipe with these queue sizes")
    p.add_argument("--plot", type=Path, help="--direct: write the monitor plot (PNG) here from the results so far")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help='--direct: also this candidate setting, e.g. \'recipe-t02={"crops":4,"chunk":4,"queue":0,'
        '"temperature":0.2}\' (keys: crops, chunk, queue, volumes, temperature, rotation_weight, '
        "contrastive_weight, reconstruction_weight); repeatable",
    )
    p.add_argument("--roi", type=int, nargs=3, default=DIRECT_ROI, help="--direct: crop size (the last two equal)")
    a = p.parse_args()
    if a.direct:
        direct_main(a)
        return
    a.work.mkdir(parents=True, exist_ok=True)
    demo = a.work / "demo_data"
    if not (demo / "dataset_demo.json").is_file():
        subprocess.run([sys.executable, "-m", "ssl3d.cli", "data", "demo", str(demo)], check=True)
    results = {}
    for name, (overrides, ranks, preset) in VARIANTS.items():
        if a.only and name not in a.only.split(","):
            continue
        logdir = a.work / name
        cfg = {**BASE, **overrides, "train.num_steps": a.steps, "train.eval_num": a.eval_every}
        cfg |= {"train.logdir": str(logdir), "train.seed": a.seed}
        args = ["--datalist", str(demo / "dataset_demo.json"), *sets(cfg)]
        if preset:
            (a.work / f"{name}.json").write_text(json.dumps(preset))
            args += ["--ds_config", str(a.work / f"{name}.json")]
        if ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "launch/pretrain.py"]
        else:
            cmd = [sys.executable, "-m", "ssl3d.cli", "pretrain"]
        if not (logdir / "summary.json").is_file():
            t = time.perf_counter()
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // ranks))}
            proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
            print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        # Validation runs each rank's own batches (no gathering): its collapsed value depends on the local views.
        local = 2 * cfg["data.num_samples"] * cfg["train.batch_size"]
        results[name] = {
            "views_in_training_loss": local * ranks if preset and preset.get("gather_contrastive") else local,
            "views_in_validation_loss": local,
            "collapsed_at": math.log(local - 1),
            **read_events(logdir),
        }
    (a.work / "collapse.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))


def format_table(results: dict) -> str:
    lines = [
        "| variant | views in training loss | val: ln(2N-1) | val contrastive (each validation) | embedding std | "
        "effective rank | val rotation (ln 4 = 1.386) | masked recon. L1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():

        def series(key: str, fmt: str = "{:.3f}", r: dict = r) -> str:
            return " / ".join(fmt.format(v) for _, v in r.get(key, [])) or "-"

        lines.append(
            f"| {name} | {r['views_in_training_loss']} | {r['collapsed_at']:.4f} | {series('contrastive', '{:.4f}')} | "
            f"{series('std')} | {series('rank', '{:.2f}')} | {series('rotation')} | {series('recon_masked')} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# --direct: the single-device recipe against the reference setting, driving SSLTask and the model directly.

# A model and crop the 2-core CPU affords for 300 steps x 3 settings: feature 12, depths 1-1-1-1, window 4 (a window
# of 7 pads the small stages and is ~8x slower here), crops 64 x 32 x 32 (2 last-stage tokens, as the contrastive
# head needs), the fp32 eager path; the CPU demo preset's AdamW at lr 1e-3, 50 warm-up steps, cosine to 0.
DIRECT_MODEL = {"feature_size": 12, "depths": (1, 1, 1, 1), "window_size": 4, "fused_attention": False}
DIRECT_ROI = (64, 32, 32)
DIRECT_LR, DIRECT_WARMUP = 1e-3, 50
VAL_CROPS = 16  # per validation volume
VAL_LAYOUT = 4  # crops per validation batch (8 views): collapsed at ln 7 whatever the setting trained on


# Loss keys a setting may carry (absent: SSLLoss's defaults, temperature 0.5 and weights 1/1/1), read from the
# recipe's ``ssl`` section when it sets them.
LOSS_KEYS = ("temperature", "rotation_weight", "contrastive_weight", "reconstruction_weight")
SETTING_KEYS = {"crops", "chunk", "queue", "volumes", *LOSS_KEYS}


def direct_settings(recipe: Path, queues: list[int] | None = None, extra: list[str] | None = None) -> dict[str, dict]:
    """name -> crops a step, gradient-caching chunk, queue size (and the loss keys the recipe sets); the recipe's from
    its run config; ``queues``: the recipe with other queue sizes besides; ``extra``: ``NAME=JSON`` candidates."""
    cfg = json.loads(recipe.read_text())
    crops = cfg["data"]["num_samples"] * cfg["train"].get("batch_size", 1)
    chunk, queue = cfg["ssl"]["grad_cache_chunk"], cfg["ssl"].get("negative_queue", 0)
    loss = {k: cfg["ssl"][k] for k in LOSS_KEYS if k in cfg["ssl"]}
    settings = {
        "reference": {"crops": 2, "chunk": 0, "queue": 0},
        "recipe": {"crops": crops, "chunk": chunk, "queue": queue, **loss},
    }
    if queue:
        settings["recipe-no-queue"] = {"crops": crops, "chunk": chunk, "queue": 0}
    # 2 ranks x (1 volume x 2 crops) with gathered negatives = one process with the global batch (see the docstring)
    settings["gather-2-ranks"] = {"crops": 2, "chunk": 0, "queue": 0, "volumes": 2}
    # The same 8 views on one device at the recipe's chunk: equal to gather-2-ranks in exact arithmetic
    settings["recipe-2-volumes"] = {"crops": 2, "chunk": chunk, "queue": 0, "volumes": 2}
    for k in queues or []:
        settings[f"recipe-queue-{k}"] = {"crops": crops, "chunk": chunk, "queue": k, **loss}
    for item in extra or []:
        name, _, text = item.partition("=")
        setting = json.loads(text)
        if not name or not isinstance(setting, dict) or not {"crops", "chunk", "queue"} <= setting.keys():
            raise SystemExit(f'--extra {item!r}: expected NAME={{"crops": .., "chunk": .., "queue": .., ...}}')
        if setting.keys() - SETTING_KEYS:
            raise SystemExit(f"--extra {item!r}: unknown keys {sorted(setting.keys() - SETTING_KEYS)}")
        settings[name] = setting
    return settings


def _loss(setting: dict):  # noqa: ANN202
    """The setting's SSLLoss: its temperature and weights, SSLLoss's defaults for the keys it does not set."""
    from ssl3d.ssl import LossWeights, SSLLoss

    given = {k: v for k, v in setting.items() if k in LOSS_KEYS}
    weights = LossWeights(**{k.removesuffix("_weight"): v for k, v in given.items() if k.endswith("_weight")})
    return SSLLoss(weights, **({"temperature": setting["temperature"]} if "temperature" in setting else {}))


def _data_config(datalists: list[Path], roi, crops: int, seed: int, work: Path, volumes: int = 1):  # noqa: ANN001, ANN202
    from ssl3d.config import load_config

    return load_config(
        overrides={
            "data.datalists": [{"json": str(d)} for d in datalists],
            "data.roi": list(roi),
            "data.num_samples": crops,
            "data.dataset": "cache",
            "data.cache_rate": 1.0,
            "data.num_workers": 0,
            "train.batch_size": volumes,
            "train.seed": seed,
            "train.progress": False,
            "train.logdir": str(work / "run"),
        }
    )


def _validation_views(datalists: list[Path], roi, seed: int, work: Path) -> list:  # noqa: ANN001
    """Fixed validation batches: VAL_CROPS crops of every validation volume, VAL_LAYOUT crops a batch, fixed views."""
    import torch

    from ssl3d.data import build_loaders
    from ssl3d.ssl import MaskingParams, make_views

    _, val = build_loaders(_data_config(datalists, roi, VAL_CROPS, seed, work))
    crops = torch.cat([b["image"] for b in val])  # [volumes x VAL_CROPS, 1, H, W, D]
    gen = torch.Generator().manual_seed(7919)
    return [make_views(crops[i : i + VAL_LAYOUT], gen, MaskingParams()) for i in range(0, len(crops), VAL_LAYOUT)]


def _monitors(model, val_views: list, loss_fn, train_temperature: float | None = None) -> dict[str, float]:  # noqa: ANN001
    """The collapse monitors on the fixed validation views; with ``train_temperature`` also ``contrastive_at_t``,
    the contrastive loss of the same embeddings at that temperature."""
    import torch

    from ssl3d.ssl.losses import contrastive_loss
    from ssl3d.ssl.monitors import effective_rank, embedding_std

    model.eval()
    emb, contrastive, at_t, correct, rows, masked = [], [], [], 0, 0, [0.0, 0.0]
    with torch.no_grad():
        for v in val_views:
            out = model(v.corrupted)
            n = out.contrastive.shape[0] // 2
            contrastive.append(
                float(loss_fn(out.rotation, v.rot_labels, out.contrastive, out.reconstruction, v.views)["contrastive"])
            )
            if train_temperature is not None:
                at_t.append(float(contrastive_loss(out.contrastive[:n], out.contrastive[n:], train_temperature)))
            emb.append(out.contrastive.float())
            correct += int((out.rotation.argmax(1) == v.rot_labels).sum())
            rows += 2 * n
            changed = v.corrupted != v.views
            masked[0] += float(((out.reconstruction - v.views).abs() * changed).sum())
            masked[1] += float(changed.sum())
    model.train()
    e = torch.cat(emb)
    return {
        "contrastive": sum(contrastive) / len(contrastive),
        "rank": float(effective_rank(e)),
        "std": float(embedding_std(e)),
        "rotation_acc": correct / rows,
        "recon_masked": masked[0] / max(masked[1], 1.0),
        **({"contrastive_at_t": sum(at_t) / len(at_t)} if at_t else {}),
    }


def direct_run(name: str, setting: dict, datalists: list[Path], seed: int, a: argparse.Namespace) -> dict:
    import torch

    from ssl3d.config import ModelConfig, OptimConfig
    from ssl3d.data import build_loaders
    from ssl3d.model import build_model
    from ssl3d.optim import lr_at
    from ssl3d.ssl import MaskingParams, SSLLoss
    from ssl3d.ssl.task import SSLTask
    from ssl3d.step import LocalBackend

    torch.manual_seed(seed)
    model = build_model(ModelConfig(**DIRECT_MODEL))
    optim_cfg = OptimConfig(lr=DIRECT_LR, warmup_steps=DIRECT_WARMUP, schedule="warmup_cosine")
    optimizer = torch.optim.AdamW(model.parameters(), lr=DIRECT_LR, weight_decay=optim_cfg.weight_decay)
    backend = LocalBackend(optimizer)
    monitor_fn = SSLLoss()
    loss_fn = _loss(setting)
    gen = torch.Generator().manual_seed(seed * 1000 + 1)
    task = SSLTask(loss_fn, MaskingParams(), gen, grad_cache_chunk=setting["chunk"], negative_queue=setting["queue"])
    train, _ = build_loaders(_data_config(datalists, a.roi, setting["crops"], seed, a.work, setting.get("volumes", 1)))
    val_views = _validation_views(datalists, a.roi, seed, a.work)
    record: dict = {"setting": setting, "seed": seed, "monitors": [], "train": []}
    batches = iter(())
    t0 = time.perf_counter()
    for step in range(a.steps + 1):
        if step % a.eval_every == 0:
            # Monitors at the reference's temperature (monitor_fn) whatever the setting trains with, so the
            # validation contrastive compares across settings; a setting with its own temperature also gets
            # "contrastive_at_t", the validation loss at that temperature.
            own_t = loss_fn.temperature if loss_fn.temperature != monitor_fn.temperature else None
            record["monitors"].append({"step": step, **_monitors(model, val_views, monitor_fn, own_t)})
            print(f"{name} seed {seed} step {step}: {record['monitors'][-1]}", file=sys.stderr, flush=True)
        if step == a.steps:
            break
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(train)
            batch = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(optim_cfg, step, a.steps)
        losses = task.forward_backward(model, batch["image"], backend, sync=True)
        backend.step()
        record["train"].append({k: float(v) for k, v in losses.items()})
    record["seconds"] = time.perf_counter() - t0
    train.close()
    # The encoder for the downstream check (bench/downstream.py --init): model_swinvit.pt with its metadata.
    from ssl3d.checkpoint import export_swinvit

    cfg = _data_config(datalists, a.roi, setting["crops"], seed, a.work, setting.get("volumes", 1))
    cfg.model = ModelConfig(**DIRECT_MODEL)
    record["encoder"] = str(export_swinvit(model.state_dict(), a.work / "encoders" / name / f"seed{seed}" /
                                           "model_swinvit.pt", cfg, a.steps))  # fmt: skip
    return record


def direct_main(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    a.work.mkdir(parents=True, exist_ok=True)
    from ssl3d.data.demo import write_demo_dataset

    if a.no_demo and not a.samples:
        raise SystemExit("--no-demo: needs --samples DIR (the real CT to train on)")
    datalists = [] if a.no_demo else [write_demo_dataset(a.work / "demo_data")]
    if a.samples:
        datalists.insert(0, a.samples / "dataset_samples.json")
    settings = direct_settings(a.recipe, a.queues, a.extra)
    out = a.work / "recipe.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    for seed in a.seeds or [a.seed]:
        for name, setting in settings.items():
            if a.only and name not in a.only.split(","):
                continue
            key = f"{name}/seed{seed}"
            if key in results and len(results[key]["train"]) == a.steps:
                continue
            results[key] = direct_run(name, setting, datalists, seed, a)
            out.write_text(json.dumps(results, indent=1))
    print(format_direct(results, a.steps))
    if a.plot:
        plot_direct(results, a.plot)


def _per_setting(results: dict) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for key, r in results.items():
        by.setdefault(key.split("/")[0], []).append(r)
    return by


def format_direct(results: dict, steps: int) -> str:
    """Each monitor at the last validation, seed by seed (and their mean), then the first seed's series."""
    lines = [
        "| setting | views a step (chunk) | queue | seeds | val contrastive (ln 7 = 1.946) | effective rank | "
        "embedding std | rotation acc. (chance 0.25) | masked recon. L1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in _per_setting(results).items():
        s = runs[0]["setting"]

        def cell(key: str, fmt: str, runs: list = runs) -> str:
            last = [r["monitors"][-1][key] for r in runs]
            text = " / ".join(fmt.format(v) for v in last)
            if len(last) > 1:
                text += f" (mean {fmt.format(sum(last) / len(last))})"
            series = " / ".join(fmt.format(m[key]) for m in runs[0]["monitors"])
            return f"{text}<br>{series}"

        lines.append(
            f"| {name} | {2 * s['crops'] * s.get('volumes', 1)} ({s['chunk'] or 'one pass'}) | {s['queue'] or '-'} | "
            f"{len(runs)} | "
            f"{cell('contrastive', '{:.3f}')} | {cell('rank', '{:.2f}')} | {cell('std', '{:.4f}')} | "
            f"{cell('rotation_acc', '{:.3f}')} | {cell('recon_masked', '{:.3f}')} |"
        )
    return "\n".join(lines)


def plot_direct(results: dict, path: Path) -> None:
    """One panel per monitor, one line per setting (mean over seeds, bold; each seed thin), drawn with Pillow."""
    from PIL import Image, ImageDraw

    panels = [
        ("contrastive", "val contrastive (8 views)", math.log(7), "collapsed: ln 7"),
        ("rank", "effective rank (64 val. embeddings)", 1.0, "collapsed: 1"),
        ("std", "embedding std", 0.0, "collapsed: 0"),
        ("rotation_acc", "rotation accuracy", 0.25, "chance: 0.25"),
        ("recon_masked", "masked reconstruction L1", None, None),
    ]
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
    colors += [(23, 190, 207)]
    pw, ph, left, right, top, bottom = 300, 240, 48, 12, 30, 34
    by = _per_setting(results)
    img = Image.new("RGB", (pw * len(panels), ph + 24 * len(by) + 10), "white")
    d = ImageDraw.Draw(img)
    for k, (key, title, ref, label) in enumerate(panels):
        ox = k * pw
        values = [m[key] for runs in by.values() for r in runs for m in r["monitors"]] + (
            [ref] if ref is not None else []
        )
        lo, hi = min(values), max(values)
        lo, hi = (lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
        max_step = max(m["step"] for runs in by.values() for r in runs for m in r["monitors"]) or 1

        def px(step: float, v: float, ox: int = ox, lo: float = lo, hi: float = hi, ms: int = max_step) -> tuple:
            return (ox + left + step / ms * (pw - left - right), top + (hi - v) / (hi - lo) * (ph - top - bottom))

        d.rectangle([ox + left, top, ox + pw - right, ph - bottom], outline="black")
        d.text((ox + left, 8), title, fill="black")
        for i in range(5):
            v = lo + (hi - lo) * i / 4
            _, y = px(0, v)
            d.line([ox + left, y, ox + pw - right, y], fill=(230, 230, 230))
            d.text((ox + 2, y - 6), f"{v:.3g}", fill="black")
        for step in range(0, max_step + 1, max(1, max_step // 6)):
            x, _ = px(step, lo)
            d.text((x - 8, ph - bottom + 6), str(step), fill="black")
        d.text((ox + pw // 2 - 10, ph - 16), "step", fill="black")
        if ref is not None:
            (x0, y), (x1, _) = px(0, ref), px(max_step, ref)
            for xs in range(int(x0), int(x1), 8):
                d.line([xs, y, min(xs + 4, x1), y], fill=(120, 120, 120))
            d.text((x1 - 80, y - 12), label, fill=(120, 120, 120))
        for j, runs in enumerate(by.values()):
            color = colors[j % len(colors)]
            if len(runs) > 1:  # each seed thin: collapse is all or nothing per seed, a mean alone would hide it
                pale = tuple(int(c + (255 - c) * 0.55) for c in color)
                for r in runs:
                    d.line([px(m["step"], m[key]) for m in r["monitors"]], fill=pale, width=1)
            pts = []
            for i, m in enumerate(runs[0]["monitors"]):
                vals = [r["monitors"][i][key] for r in runs]
                x, y = px(m["step"], sum(vals) / len(vals))
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
                pts.append((x, y))
            d.line(pts, fill=color, width=2)
    for j, (name, runs) in enumerate(by.items()):
        s = runs[0]["setting"]
        what = (
            f"{2 * s['crops'] * s.get('volumes', 1)} views a step, chunk {s['chunk'] or '-'}, "
            f"queue {s['queue'] or '-'}, {len(runs)} seed(s)"
        )
        what += " (bold: mean; thin: each seed)" if len(runs) > 1 else ""
        d.text((left, ph + 6 + 24 * j), f"{name}: {what}", fill=colors[j % len(colors)])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


if __name__ == "__main__":
    main()
