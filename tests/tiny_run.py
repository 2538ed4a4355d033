"""The run-config overrides every end-to-end test starts from: the tiny encoder, the smallest crop the heads accept
(two last-stage tokens), one crop a volume, no loader workers, no progress bar, on the CPU. Tests add what they need.

``train.device: "cpu"``: these runs assert what the CPU computes (exact resumed losses, gloo collectives, host
memory), so on a GPU machine they stay on the CPU; "auto" would take the GPU, bf16 and, with 2 ranks on a 1-GPU
machine, a device index that does not exist.
"""

TINY_RUN = {
    "model.feature_size": 12,
    "model.depths": [1, 1, 1, 1],
    "data.roi": [32, 64, 64],
    "data.num_samples": 1,
    "data.num_workers": 0,
    "train.batch_size": 1,
    "train.progress": False,
    "train.device": "cpu",
}
