"""The negative queue (``ssl.negative_queue``) on 2 real gloo ranks, DDP and FSDP2, against one process.

What a per-rank queue means for equivalence. Every rank keeps its own queue (``ssl3d.ssl.queue``) and enqueues the
rows its loss saw:

- with ``"gather_contrastive": true`` those rows are the gathered ones, so both ranks hold the SAME queue, equal to
  the queue of one process that runs the global batch, and every rank's contrastive loss is that process's. Here 2
  ranks must equal one process on the global batch: losses, queue contents and parameters.
- without the gather each rank queues only its own views, so its loss sees its own past and never the other rank's
  views. One process on the global batch would see both ranks' views as negatives, so it is NOT the reference (its
  loss differs from the first step on). The correct reference is one process that keeps one queue per rank and
  runs each rank's half of the batch as a micro-batch of its own (gradient accumulation over the 2 halves, which is
  the data-parallel average): each rank's losses and queue must equal that process's for the same half, and the
  parameters must match. The two ranks' queues must differ.

The SSL task is the real one (``SSLTask.forward_backward``: the trainer's step, with the strategy's autocast,
accumulate, gather and backward), in one pass and with contrastive gradient caching (2 views a chunk); the views
are fixed (no random augmentation) so the split over ranks is the only difference. The queue holds 6 rows: it wraps
within the 3 steps whether a step adds 4 rows (local) or 8 (gathered).

Tolerance (as tests/dist/test_strategies.py: summation order is the only difference): losses within rel 1e-5,
queued embeddings (unit vectors) within atol 1e-5, parameters after 3 AdamW steps within rtol 1e-4 / atol 1e-5.
"""

from __future__ import annotations

import datetime
import os
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness as H  # tests/dist is on sys.path (pytest rootdir-relative import)
import pytest
import torch

from ssl3d.config import read_json

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

PRESETS = Path(__file__).resolve().parents[2] / "ds_configs"
QUEUE = 6
RTOL, ATOL = 1e-4, 1e-5
BACKENDS = ("ddp", "fsdp")


@dataclass(frozen=True)
class QueueScenario:
    gather: bool
    chunk: int  # views per gradient-caching chunk; 0: one pass


SCENARIOS = {
    "gather": QueueScenario(gather=True, chunk=0),
    "gather_cache": QueueScenario(gather=True, chunk=2),
    "local": QueueScenario(gather=False, chunk=0),
    "local_cache": QueueScenario(gather=False, chunk=2),
}


def make_task(chunk: int, queue: int = QUEUE):  # noqa: ANN201 - SSLTask
    from ssl3d.ssl import SSLLoss
    from ssl3d.ssl.task import SSLTask

    return SSLTask(SSLLoss(temperature=0.5), grad_cache_chunk=chunk, negative_queue=queue)


def queue_rows(task: Any) -> torch.Tensor:
    """The queue's buffer ``[QUEUE, E]`` in ring order (the same layout on every run that enqueued the same rows)."""
    return task.queue.state_dict()["buffer"].clone()


def step_losses(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(losses[k]) for k in ("total", "contrastive")}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(H.WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)  # 2 processes on 2 cores
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    results: dict[str, Any] = {}
    data = H.global_batches(1)  # [STEPS, 1, WORLD x MICRO, 1, *CROP]
    try:
        for backend in BACKENDS:
            for name, sc in SCENARIOS.items():
                key = f"{backend}/{name}"
                try:
                    preset = read_json(PRESETS / f"{backend}.json")
                    strategy, model, _ = H.make_strategy(
                        preset, H.Scenario(key, gather=sc.gather), H.WORLD, H.MICRO, Path(out)
                    )
                    task = make_task(sc.chunk)
                    losses, queues = [], []
                    for step in range(H.STEPS):
                        strategy.set_lr(H.LR * (step + 1) / H.STEPS)
                        x = data[step, 0, rank * H.MICRO : (rank + 1) * H.MICRO]
                        views = H.fixed_views(x, rank * H.MICRO)
                        losses.append(step_losses(task.forward_backward(model, views, strategy, sync=True)))
                        strategy.step(H.GRAD_CLIP)
                        queues.append(queue_rows(task))
                    mine = {"losses": losses, "queues": queues}
                    every = [None] * H.WORLD
                    torch.distributed.all_gather_object(every, mine)
                    state = strategy.full_state_dict()  # collective; complete on rank 0
                    results[key] = {"ranks": every, "state": state}
                except Exception:
                    results[key] = {"error": traceback.format_exc()}
                    raise  # the other rank may wait in a collective that never comes
    finally:
        if rank == 0:
            torch.save(results, Path(out) / "queue.pt")
        torch.distributed.destroy_process_group()


def single_process(sc: QueueScenario, queue: int = QUEUE) -> dict[str, Any]:
    """The reference for ``sc`` on one process (one pass, no chunks: gradient caching is checked against it too).

    Gathered: the global batch through one task. Local: one task (queue) per rank, each run on that rank's half as
    its own micro-batch, the 2 accumulated into one step."""
    from ssl3d.model.ssl_model import build_model
    from ssl3d.strategies.single import SingleStrategy

    parts = 1 if sc.gather else H.WORLD
    strategy = SingleStrategy(torch.device("cpu"), torch.float32, grad_accum=parts)
    torch.manual_seed(0)
    model, _ = strategy.setup(build_model(H.TINY, H.CONTRASTIVE_DIM), H.make_optimizer)
    tasks = [make_task(0, queue) for _ in range(parts)]
    data = H.global_batches(1)
    per = H.WORLD * H.MICRO // parts
    losses: list[list[dict[str, float]]] = [[] for _ in range(parts)]
    queues: list[list[torch.Tensor]] = [[] for _ in range(parts)]
    for step in range(H.STEPS):
        strategy.set_lr(H.LR * (step + 1) / H.STEPS)
        for r, task in enumerate(tasks):
            views = H.fixed_views(data[step, 0, r * per : (r + 1) * per], r * per)
            out = task.forward_backward(model, views, strategy, sync=r == parts - 1)
            losses[r].append(step_losses(out))
        strategy.step(H.GRAD_CLIP)
        for r, task in enumerate(tasks):
            if task.queue is not None:
                queues[r].append(queue_rows(task))
    return {"losses": losses, "queues": queues, "state": strategy.full_state_dict()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-process spawn runs every backend and scenario (start-up and imports dominate on 2 cores)."""
    import torch.multiprocessing as mp

    from ssl3d.strategies.distributed import free_port

    out = tmp_path_factory.mktemp("queue")
    failure = None
    try:
        mp.spawn(_worker, args=(free_port(), str(out)), nprocs=H.WORLD, join=True)
    except Exception as exc:  # noqa: BLE001 - reported per scenario
        failure = str(exc)
    path = out / "queue.pt"
    results = torch.load(path, weights_only=False) if path.exists() else {}
    for backend in BACKENDS:
        for name in SCENARIOS:
            results.setdefault(f"{backend}/{name}", {"error": f"not run: {failure}"})
    return results


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return {"gather": single_process(SCENARIOS["gather"]), "local": single_process(SCENARIOS["local"])}


def got(two_ranks: dict[str, Any], key: str) -> dict[str, Any]:
    r = two_ranks[key]
    if "error" in r:
        pytest.fail(f"{key} raised:\n{r['error']}")
    return r


def assert_params_close(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(state) == set(ref), "parameter names differ from the unwrapped model's"
    for key, value in ref.items():
        torch.testing.assert_close(state[key], value, rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")


CASES = [pytest.param(b, s, id=f"{b}-{s}") for b in BACKENDS for s in SCENARIOS]


@pytest.mark.parametrize(("backend", "name"), [c for c in CASES if c.values[1].startswith("gather")])
def test_gathered_queue_matches_one_process(
    backend: str, name: str, two_ranks: dict[str, Any], reference: dict[str, Any]
) -> None:
    """Gathered negatives: both ranks hold one queue, the queue of one process on the global batch; each rank's
    contrastive loss is that process's, the ranks' mean total loss is its total, and the parameters match."""
    r, ref = got(two_ranks, f"{backend}/{name}"), reference["gather"]
    ranks = r["ranks"]
    for step in range(H.STEPS):
        want = ref["losses"][0][step]
        for rank in ranks:
            assert rank["losses"][step]["contrastive"] == pytest.approx(want["contrastive"], rel=1e-5), step
        mean_total = sum(rank["losses"][step]["total"] for rank in ranks) / len(ranks)
        assert mean_total == pytest.approx(want["total"], rel=1e-5), step
        assert torch.equal(ranks[0]["queues"][step], ranks[1]["queues"][step]), f"step {step}: the ranks' queues differ"
        torch.testing.assert_close(ranks[0]["queues"][step], ref["queues"][0][step], rtol=0, atol=ATOL)
    assert_params_close(r["state"], ref["state"])


@pytest.mark.parametrize(("backend", "name"), [c for c in CASES if c.values[1].startswith("local")])
def test_per_rank_queue_matches_one_process_per_rank(
    backend: str, name: str, two_ranks: dict[str, Any], reference: dict[str, Any]
) -> None:
    """Without the gather: rank r's losses and queue are those of one process that keeps a queue per rank and runs
    rank r's half on it; the ranks' queues differ (each holds its own views); the parameters match."""
    r, ref = got(two_ranks, f"{backend}/{name}"), reference["local"]
    for rank, mine in enumerate(r["ranks"]):
        for step in range(H.STEPS):
            want = ref["losses"][rank][step]
            assert mine["losses"][step]["contrastive"] == pytest.approx(want["contrastive"], rel=1e-5), (rank, step)
            assert mine["losses"][step]["total"] == pytest.approx(want["total"], rel=1e-5), (rank, step)
            torch.testing.assert_close(mine["queues"][step], ref["queues"][rank][step], rtol=0, atol=ATOL)
    assert not torch.allclose(r["ranks"][0]["queues"][-1], r["ranks"][1]["queues"][-1], atol=1e-3)
    assert_params_close(r["state"], ref["state"])


def test_queue_changes_the_reference(reference: dict[str, Any]) -> None:
    """The comparisons above would pass with a queue that is ignored if the queue did not move the loss: it does,
    from the second step on (the first sees an empty queue), and it wrapped (6 rows, 8 added per step)."""
    without = single_process(SCENARIOS["gather"], queue=0)
    with_queue = reference["gather"]["losses"][0]
    assert with_queue[0]["contrastive"] == pytest.approx(without["losses"][0][0]["contrastive"], rel=1e-6)
    for step in (1, 2):
        assert abs(with_queue[step]["contrastive"] - without["losses"][0][step]["contrastive"]) > 1e-2, step
    assert all(bool(q.norm(dim=1).sub(1).abs().max() < 1e-5) for q in reference["gather"]["queues"][0])
