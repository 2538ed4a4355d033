"""The run-config overrides every end-to-end test starts from: the tiny encoder, the smallest crop the heads accept
(two last-stage tokens), one crop a volume, no loader workers, no progress bar. Tests add what they need."""

TINY_RUN = {
    "model.feature_size": 12,
    "model.depths": [1, 1, 1, 1],
    "data.roi": [32, 64, 64],
    "data.num_samples": 1,
    "data.num_workers": 0,
    "train.batch_size": 1,
    "train.progress": False,
}
