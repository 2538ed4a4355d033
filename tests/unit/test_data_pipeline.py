"""The data pipeline on demo volumes: crop shapes, seeded crops, resumable order, per-rank caches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl3d.config import Config, DataConfig, DatalistConfig, load_config
from ssl3d.data.datasets import (
    TRAIN_STREAM,
    EpochBatchSampler,
    build_datasets,
    build_loaders,
    even_partition,
    item_seed,
)
from ssl3d.data.demo import write_demo_dataset
from ssl3d.data.transforms import build_crop_transforms, build_load_transforms, build_train_transforms

ROI = (64, 64, 64)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_volumes=6)


@pytest.fixture(scope="module")
def demo12(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo12"), n_volumes=12, shape=(64, 64, 56))


def _cfg(datalist: Path, tmp_path: Path, **overrides: object) -> Config:
    base = {
        "data.datalists": [{"json": str(datalist)}],
        "data.roi": list(ROI),
        "data.num_workers": 0,
        "train.batch_size": 2,
        "train.logdir": str(tmp_path / "run"),
        "train.progress": False,
    }
    return load_config(overrides={**base, **overrides})


def _images(datalist: Path) -> list[str]:
    doc = json.loads(datalist.read_text())
    return [str(datalist.parent / e["image"]) for e in doc["training"] + doc["validation"]]


def _epoch(loader, epoch: int, start_batch: int = 0) -> list[torch.Tensor]:  # noqa: ANN001 - TrainLoader
    loader.set_epoch(epoch, start_batch)
    return [b["image"] for b in loader]


# ---------------------------------------------------------------------------------------------------------
# Transforms


def test_every_demo_volume_gives_roi_crops_even_when_thinner_than_the_roi(demo: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo, tmp_path, **{"data.roi": [96, 96, 96], "data.num_samples": 3})
    chain = build_train_transforms(cfg.data)
    shapes = []
    for path in _images(demo):
        crops = chain({"image": path})
        assert len(crops) == 3
        for c in crops:
            assert set(c) == {"image"}
            x = c["image"]
            assert type(x) is torch.Tensor and x.dtype == torch.float32  # plain tensors, no metadata
            assert tuple(x.shape) == (1, 96, 96, 96)
            assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        shapes.append(crops[0]["image"].shape)
    # The demo set includes a volume thinner than the ROI (48 slices < 96), so padding was exercised.
    import nibabel as nib

    assert min(nib.load(p).shape[2] for p in _images(demo)) < 64


def test_all_air_volume_is_unusable_and_named(tmp_path: Path) -> None:
    import nibabel as nib

    from ssl3d.data.transforms import build_guarded_load

    air = tmp_path / "air.nii.gz"
    nib.save(nib.Nifti1Image(np.full((40, 30, 20), -1000, np.int16), np.diag([2.0, 2.0, 5.0, 1.0])), air)
    d = DataConfig(roi=(32, 32, 32), spacing=(1.0, 1.0, 1.0))
    loaded = build_guarded_load(d)({"image": str(air)})
    assert loaded["image"] is None and loaded["bad"].startswith(f"{air}: ") and "constant" in loaded["bad"]


def test_air_around_a_small_body_is_padded_to_the_roi(tmp_path: Path) -> None:
    import nibabel as nib

    vol = np.full((40, 30, 20), -1000, np.int16)
    vol[18:22, 14:16, 9:11] = 40  # a few voxels of tissue: the foreground box is far below the ROI
    path = tmp_path / "speck.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 5.0, 1.0])), path)
    d = DataConfig(roi=(32, 32, 32), spacing=(1.0, 1.0, 1.0))
    loaded = build_load_transforms(d)({"image": str(path)})
    shape = tuple(loaded["image"].shape)
    assert len(shape) == 4 and shape[0] == 1 and all(s >= 32 for s in shape[1:]), shape
    crops = build_crop_transforms(d)(loaded)
    assert tuple(crops[0]["image"].shape) == (1, 32, 32, 32)


def test_spacing_resamples(demo: Path, tmp_path: Path) -> None:
    from monai.transforms import Compose, Spacingd

    path = _images(demo)[0]
    chain = build_load_transforms(DataConfig(roi=(32, 32, 32), spacing=(7.0, 7.0, 7.0))).transforms
    assert not any(isinstance(t, Spacingd) for t in build_load_transforms(DataConfig()).transforms)
    resampled = Compose([chain[0], chain[2], chain[3]])({"image": path})["image"]  # load, orient, resample
    assert torch.allclose(resampled.pixdim, torch.tensor([7.0, 7.0, 7.0], dtype=resampled.pixdim.dtype))
    original = Compose([chain[0], chain[2]])({"image": path})["image"]
    assert resampled.numel() < original.numel() / 5  # ~3.5 mm voxels -> 7 mm


# ---------------------------------------------------------------------------------------------------------
# Loaders: shapes, determinism, resume


def test_batches_have_flattened_crops(demo: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo, tmp_path, **{"data.num_samples": 2})
    train, val = build_loaders(cfg)
    assert train.batches_per_epoch == len(train) == 2  # 5 training volumes, batch 2, last partial dropped
    batch = next(iter(train))
    assert set(batch) == {"image", "bad"} and batch["bad"] == ["", "", "", ""]  # no volume was replaced
    assert batch["image"].shape == (4, 1, *ROI) and batch["image"].dtype == torch.float32
    vbatch = next(iter(val))
    assert vbatch["image"].shape == (2, 1, *ROI) and vbatch["valid"].tolist() == [True, True]


@pytest.mark.slow
def test_crops_depend_only_on_seed_epoch_and_volume(demo: Path, tmp_path: Path) -> None:
    serial, _ = build_loaders(_cfg(demo, tmp_path))
    parallel, _ = build_loaders(_cfg(demo, tmp_path, **{"data.num_workers": 2}))
    assert parallel.loader.num_workers == 2
    e0, e0_workers = _epoch(serial, 0), _epoch(parallel, 0)
    assert len(e0) == 2
    for a, b in zip(e0, e0_workers, strict=True):
        assert torch.equal(a, b)
    e1 = _epoch(serial, 1)
    assert not any(torch.equal(a, b) for a, b in zip(e0, e1, strict=True))
    for a, b in zip(_epoch(serial, 0), e0, strict=True):  # repeatable
        assert torch.equal(a, b)
    other_seed, _ = build_loaders(_cfg(demo, tmp_path, **{"train.seed": 1}))
    assert not any(torch.equal(a, b) for a, b in zip(e0, _epoch(other_seed, 0), strict=True))


@pytest.mark.slow
def test_loader_advances_epochs_by_itself(demo: Path, tmp_path: Path) -> None:
    train, _ = build_loaders(_cfg(demo, tmp_path))
    auto = [b["image"] for _ in range(2) for b in train]  # two passes, no set_epoch
    assert train.epoch == 2 and train.start_batch == 0
    fresh, _ = build_loaders(_cfg(demo, tmp_path))
    explicit = _epoch(fresh, 0) + _epoch(fresh, 1)
    assert all(torch.equal(a, b) for a, b in zip(auto, explicit, strict=True))


def test_sampler_resume_offset_gives_exactly_the_remaining_batches(demo12: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo12, tmp_path, **{"train.batch_size": 3})
    ds = build_datasets(cfg).train
    assert ds.num_items == 10
    sampler = EpochBatchSampler(ds, batch_size=3, drop_last=True)
    assert sampler.batches_per_epoch == 3
    for epoch in (0, 5):
        sampler.set_epoch(epoch)
        full = list(sampler)
        assert len(full) == len(sampler) == 3 and all(len(b) == 3 for b in full)
        for start in range(4):
            sampler.set_epoch(epoch, start)
            assert list(sampler) == full[start:] and len(sampler) == 3 - start
    with pytest.raises(ValueError, match="start_batch 4 outside"):
        sampler.set_epoch(0, 4)
    # Keys carry the seed of (seed, epoch, volume): the same volume gets the same crops in any position.
    sampler.set_epoch(5)
    index, seed, valid = list(sampler)[0][0]
    assert seed == item_seed(0, TRAIN_STREAM, 5, index) and valid


@pytest.mark.slow
def test_resumed_loader_continues_without_loading_skipped_volumes(
    demo12: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(demo12, tmp_path, **{"train.batch_size": 3})
    reference, _ = build_loaders(cfg)
    wanted = _epoch(reference, 0) + _epoch(reference, 1) + _epoch(reference, 2)  # 3 batches per epoch
    resumed, _ = build_loaders(cfg, start_epoch=1, start_batch=2)
    assert len(resumed) == 1
    loads: list[int] = []
    base = resumed.dataset.base
    original = type(base).__getitem__
    monkeypatch.setattr(type(base), "__getitem__", lambda self, i: loads.append(i) or original(self, i))
    got = [b["image"] for b in resumed] + [b["image"] for b in resumed]  # rest of epoch 1, then epoch 2
    assert len(got) == 4 and len(loads) == 4 * 3  # only the batches actually yielded were loaded
    assert all(torch.equal(a, b) for a, b in zip(got, wanted[5:], strict=True))


def test_global_shuffle_partitions_each_epoch_across_ranks(demo12: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo12, tmp_path, **{"data.dataset": "plain"})
    r0, r1 = (build_datasets(cfg, rank=r, world_size=2).train for r in (0, 1))
    for epoch in (0, 1):
        p0, p1 = r0.plan(epoch), r1.plan(epoch)
        assert len(p0) == len(p1) == 5
        assert sorted(g for _, g, _ in p0 + p1) == list(range(10))
    assert r0.plan(0) != r0.plan(1)  # reshuffled per epoch
    assert even_partition(list(range(5)), 1, 4) == [(1, 0), (0, 1)]  # 5 items on 4 ranks: two each


# ---------------------------------------------------------------------------------------------------------
# Caching kinds


def test_cache_each_rank_caches_only_its_half(demo12: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo12, tmp_path, **{"data.dataset": "cache", "data.cache_rate": 1.0})
    parts = [build_datasets(cfg, rank=r, world_size=2) for r in (0, 1)]
    ids = [p.train.volume_ids for p in parts]
    assert len(ids[0]) == len(ids[1]) == 5 and sorted(ids[0] + ids[1]) == list(range(10))
    for p in parts:
        cache = p.train.base._cache  # noqa: SLF001 - the point of the test
        assert len(p.train.base) == 5 and len(cache) == 5 and all(c is not None for c in cache)
        assert len(p.val.base) == 1  # 2 validation volumes: one each
    assert parts[0].val.volume_ids != parts[1].val.volume_ids
    # The partition is fixed across epochs; only the order within it changes.
    plans = [{g for _, g, _ in parts[0].train.plan(e)} for e in range(3)]
    assert plans[0] == plans[1] == plans[2] == set(ids[0])


@pytest.mark.slow
def test_cache_and_persistent_crops_match_plain(demo: Path, tmp_path: Path) -> None:
    """The same (epoch, volume) gives the same crops whatever the dataset kind."""

    def crops_by_volume(kind: str) -> dict[int, torch.Tensor]:
        cfg = _cfg(demo, tmp_path, **{"data.dataset": kind, "train.batch_size": 1, "data.num_samples": 1})
        train, _ = build_loaders(cfg)
        plan = train.dataset.plan(0)
        return {gid: b["image"] for (_, gid, _), b in zip(plan, train, strict=True)}

    plain = crops_by_volume("plain")
    assert len(plain) == 5  # every training volume of the demo list
    for kind in ("cache", "persistent"):
        other = crops_by_volume(kind)
        assert other.keys() == plain.keys()
        assert all(torch.equal(other[g], plain[g]) for g in plain), kind
    assert list((tmp_path / "run" / "cache").glob("prep-*/*.pt"))  # persistent cache written under logdir


def test_smart_cache_is_started_and_replaced_every_epoch(demo12: Path, tmp_path: Path) -> None:
    overrides = {"data.dataset": "smart_cache", "train.batch_size": 1, "data.num_samples": 1}
    cfg = _cfg(demo12, tmp_path, **overrides)
    train, _ = build_loaders(cfg)
    smart = train.smart
    assert smart is not None and smart.dataset.is_started() and train.batches_per_epoch == 2  # cache_num = 2
    load, crops = build_load_transforms(cfg.data), build_crop_transforms(cfg.data)
    items = [{"image": p} for p in _images(demo12)[:10]]
    seen = []
    try:
        for epoch in range(3):
            batches = [b["image"] for b in train]
            plan = train.dataset.plan(epoch)
            seen.append({g for _, g, _ in plan})
            for (_, gid, _), got in zip(plan, batches, strict=True):  # what the cache served == that volume
                crops.set_random_state(seed=item_seed(0, TRAIN_STREAM, epoch, gid))
                expected = crops(load(items[gid]))[0]["image"][None]
                assert torch.equal(got, expected)
    finally:
        train.close()
    assert len(set.union(*seen)) == 6  # three different windows of two volumes
    # Resuming at epoch 2 rebuilds that epoch's window directly.
    resumed, _ = build_loaders(cfg, start_epoch=2)
    try:
        assert {g for _, g, _ in resumed.dataset.plan(2)} == seen[2]
        again = [b["image"] for b in resumed]
        train2, _ = build_loaders(cfg)
        train2.set_epoch(2)  # a jump: the window is loaded directly
        assert all(torch.equal(a, b["image"]) for a, b in zip(again, train2, strict=True))
        train2.close()
    finally:
        resumed.close()


def test_validation_is_ordered_split_and_marks_padding(demo: Path, tmp_path: Path) -> None:
    doc = json.loads(demo.read_text())
    doc["validation"] = doc["training"][:3]
    dl = tmp_path / "three_val.json"
    dl.write_text(json.dumps(doc))
    (tmp_path / "images").symlink_to(demo.parent / "images")
    cfg = _cfg(dl, tmp_path, **{"train.batch_size": 1, "data.num_samples": 2})
    flags, ids = [], []
    for rank in (0, 1):
        ds = build_datasets(cfg, rank=rank, world_size=2)
        ids.append(ds.val.volume_ids)
        _, val = build_loaders(cfg, rank=rank, world_size=2)
        batches = list(val)
        assert len(batches) == 2  # the same count on both ranks
        flags.append([b["valid"].tolist() for b in batches])
        again = list(val)
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, again, strict=True))  # fixed crops
    assert ids == [[0, 2], [1, 0]]
    assert flags == [[[True, True], [True, True]], [[True, True], [False, False]]]


def test_demo_data_is_used_when_no_datalists(tmp_path: Path) -> None:
    cfg = load_config(
        overrides={
            "data.roi": [32, 64, 64],
            "data.num_workers": 0,
            "train.logdir": str(tmp_path / "runs" / "exp"),
            "data.demo_volumes": 3,
        }
    )
    ds = build_datasets(cfg)
    assert ds.data.datalists == [DatalistConfig(json=str(tmp_path / "runs" / "demo_data" / "dataset_demo.json"))]
    assert ds.train.num_items == 2 and ds.val.num_items == 1
    image = ds.train[(0, 1, True)][0]["image"]
    # -1000..1000 HU -> [0, 1], clipped: air is exactly 0, soft tissue (about 40 HU) above 0.5, nothing above 1.
    assert float(image.min()) == 0.0 and 0.5 < float(image.max()) <= 1.0, (float(image.min()), float(image.max()))
