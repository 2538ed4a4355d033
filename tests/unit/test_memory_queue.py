"""The memory estimator counts the queue of negatives (``ssl.negative_queue``).

What a queue of K embeddings of width E adds to one rank's step, in bytes (fp32):
- its buffer, K x E x 4, alive through the whole step (per-rank state, never sharded: counted with the buffers);
- in the one-pass contrastive loss, while the forward's activations are alive: the normalised copy of the queue
  (K x E x 4, saved by the matmul for the embeddings' gradient) and the extra logits [2N views, K] (2N x K x 4).
Both are exact in the trace; the tests hold them to the byte.
"""

from __future__ import annotations

import pytest

from ssl3d.config import ConfigError, ModelConfig, load_config
from ssl3d.memory.estimate import estimate_memory, step_settings, trace_step
from ssl3d.memory.plan import estimator_setting
from ssl3d.step import StepSettings
from ssl3d.strategies.ds_config import load_ds_config
from ssl3d.tasks import FINETUNE, PRETRAIN

TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24), window_size=4)
ROI = (32, 64, 64)
K, E = 256, 64  # queued embeddings, their width (contrastive_dim)
VIEWS = 2 * 1 * 2  # 2 views x 1 volume x 2 crops


def _trace(queue: int, chunk: int = 0):  # noqa: ANN202 - StepTrace
    return trace_step(TINY, ROI, 1, 2, device="cpu", task=PRETRAIN, contrastive_dim=E, grad_cache_chunk=chunk,
                      negative_queue=queue)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [0, 2], ids=["one-pass", "grad-cache"])
def test_trace_counts_the_queue_buffer(chunk: int) -> None:
    """The queue's K x E fp32 buffer is in the buffers column at every point of the step, one pass or chunked."""
    without, with_queue = _trace(0, chunk), _trace(K, chunk)
    grown = with_queue.column("buffers") - without.column("buffers").max()
    assert grown.min() == grown.max() == K * E * 4


@pytest.mark.slow
def test_trace_counts_the_extra_logits() -> None:
    """One pass: the forward's activations peak higher by the normalised queue (saved by the matmul) and the
    [views, K] logits block, exactly."""
    without, with_queue = _trace(0), _trace(K)
    extra = int(with_queue.column("activations").max() - without.column("activations").max())
    assert extra == K * E * 4 + VIEWS * K * 4


@pytest.mark.slow
def test_estimate_grows_by_the_queue() -> None:
    """The estimate's buffers grow by the buffer's bytes, and so does the allocated peak at least."""
    kw = {"device": "cpu", "task": PRETRAIN, "contrastive_dim": E, "process_baseline": 0}
    e0 = estimate_memory(TINY, ROI, 1, 2, **kw)
    e1 = estimate_memory(TINY, ROI, 1, 2, negative_queue=K, **kw)
    assert e1.breakdown["buffers"] - e0.breakdown["buffers"] == K * E * 4
    assert e1.breakdown["allocated_peak"] - e0.breakdown["allocated_peak"] >= K * E * 4
    assert e1.config["negative_queue"] == K


def test_run_config_queue_reaches_the_estimator() -> None:
    """``ssl3d memory`` and ``--fit-memory`` build their settings from the run config: the queue is in them for
    pre-training, and 0 for fine-tuning (the queue belongs to the contrastive loss)."""
    cfg = load_config(overrides={"ssl.negative_queue": 128})
    ds = load_ds_config(None, cfg)
    step, _ = estimator_setting(cfg, ds, 1, PRETRAIN)
    assert step.negative_queue == 128
    step, _ = estimator_setting(cfg, ds, 1, FINETUNE, num_classes=3)
    assert step.negative_queue == 0


def test_negative_queue_settings_refused() -> None:
    with pytest.raises(ConfigError, match="negative_queue: got -1"):
        step_settings(TINY, ROI, negative_queue=-1, task=PRETRAIN)
    with pytest.raises(ConfigError, match="negative_queue"):
        step_settings(StepSettings(TINY, ROI, num_classes=3, negative_queue=8, task=FINETUNE))


@pytest.mark.slow
def test_profile_counts_the_queue_buffer() -> None:
    """The CPU profile's tracked step (real tensors, a queue that enqueued real embeddings in the steps before) shows
    the same buffer bytes as the estimate."""
    from ssl3d.memory.profile import profile_memory

    kw = {"steps": 1, "device": "cpu", "with_estimate": False, "module_peaks": False, "task": PRETRAIN}
    runs = [profile_memory(TINY, ROI, 1, 2, contrastive_dim=E, negative_queue=q, **kw) for q in (0, K)]
    buffers = [r["measured"]["tracked_breakdown"]["buffers"] for r in runs]
    assert buffers[1] - buffers[0] == K * E * 4
