"""Encoder weights reach the fine-tuning network bit for bit, from every source, and wrong ones are refused.

Silent failures this guards against: tensors that "load" but land permuted (a square projection transposed),
swapped (two same-shaped tensors under each other's names) or nowhere (a renamed prefix), so fine-tuning starts
from a random encoder without an error.
"""

from __future__ import annotations

import pytest
import torch

from ssl3d.checkpoint import export_swinvit
from ssl3d.config import Config, ConfigError, ModelConfig
from ssl3d.downstream.model import (
    ProbeModel,
    build_segmentation_model,
    load_encoder,
    read_init,
    reconcile_model_config,
)
from ssl3d.metadata import metadata_path
from ssl3d.model import build_model

TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))


def exported(tmp_path, model_cfg: ModelConfig, seed: int = 0, metadata: bool = True):
    torch.manual_seed(seed)
    src = build_model(model_cfg, contrastive_dim=16)
    with torch.no_grad():
        for p in src.parameters():  # as if trained: no two tensors alike (fresh LayerNorms are all ones)
            p.add_(torch.randn_like(p) * 0.1)
    cfg = Config(model=model_cfg)
    path = export_swinvit(src.state_dict(), tmp_path / "model_swinvit.pt", cfg if metadata else None, steps=7)
    return src, path


def assert_encoder_equal(net: torch.nn.Module, src: torch.nn.Module) -> None:
    theirs = net.swinViT.state_dict()
    mine = src.swinViT.state_dict()
    assert set(theirs) == set(mine)
    for name, t in mine.items():
        torch.testing.assert_close(theirs[name], t, rtol=0, atol=0, msg=name)


def test_ssl3d_export_loads_bit_exact_into_swinunetr_and_probe(tmp_path) -> None:
    src, path = exported(tmp_path, TINY)
    meta = metadata_path(path)
    assert meta.is_file()
    source = read_init(str(tmp_path))  # a run folder resolves to its model_swinvit.pt
    assert source.metadata["model"]["feature_size"] == 12 and source.metadata["steps"] == 7
    assert source.metadata["preprocessing"]["a_min"] == -1000.0
    for net in (build_segmentation_model(TINY, 3), ProbeModel(TINY, 3)):
        torch.manual_seed(99)  # other random weights before loading
        assert load_encoder(net, source) == len(src.swinViT.state_dict())
        assert_encoder_equal(net, src)


def test_reference_format_checkpoint_loads_bit_exact(tmp_path) -> None:
    """The reference's model_bestValRMSE.pt: the whole SSLHead under DDP's module., old MLP names, no metadata."""
    torch.manual_seed(4)
    src = build_model(TINY, contrastive_dim=16)
    state = {
        "module." + k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): v
        for k, v in src.state_dict().items()
    }
    torch.save({"epoch": 3, "state_dict": state, "optimizer": {}}, tmp_path / "model_bestValRMSE.pt")
    source = read_init(str(tmp_path / "model_bestValRMSE.pt"))
    assert source.metadata is None
    net = build_segmentation_model(TINY, 4)
    load_encoder(net, source)
    assert_encoder_equal(net, src)


@pytest.mark.parametrize("metadata", [True, False], ids=["from-metadata", "from-tensors"])
def test_non_default_depths_and_width_are_taken_from_the_export(tmp_path, metadata: bool) -> None:
    wide = ModelConfig(feature_size=24, depths=(2, 1, 1, 2), num_heads=(3, 6, 6, 12))
    src, path = exported(tmp_path, wide, seed=5, metadata=metadata)
    source = read_init(str(path))
    m, notes = reconcile_model_config(TINY, source, explicit=set())  # the user set nothing: the export decides
    assert (m.feature_size, m.depths, m.num_heads) == (24, (2, 1, 1, 2), (3, 6, 6, 12))
    assert any("feature_size = 24" in n for n in notes)
    net = build_segmentation_model(m, 2)
    load_encoder(net, source)
    assert_encoder_equal(net, src)


def test_feature_size_set_against_the_export_is_an_error_naming_both(tmp_path) -> None:
    _, path = exported(tmp_path, TINY)
    source = read_init(str(path))
    with pytest.raises(ConfigError, match=r"model_swinvit.pt: feature_size 12 .* model.feature_size is 24"):
        reconcile_model_config(TINY.model_copy(update={"feature_size": 24}), source, explicit={"model.feature_size"})


def _rewrite(path, edit) -> None:
    blob = torch.load(path, weights_only=True)
    edit(blob["state_dict"])
    torch.save(blob, path)


def test_permuted_tensor_of_the_same_shape_is_detected_by_the_metadata(tmp_path) -> None:
    _, path = exported(tmp_path, TINY)
    key = "module.layers1.0.blocks.0.attn.proj.weight"  # [12, 12]: a transpose keeps the shape

    def transpose(sd):
        assert sd[key].shape[0] == sd[key].shape[1]
        sd[key] = sd[key].t().contiguous()

    _rewrite(path, transpose)
    with pytest.raises(ConfigError, match=r"attn.proj.weight differs from its fingerprint \(permuted"):
        read_init(str(path))


def test_swapped_same_shape_tensors_are_detected_by_the_metadata(tmp_path) -> None:
    _, path = exported(tmp_path, TINY)
    a, b = "module.layers2.0.blocks.0.norm1.weight", "module.layers2.0.blocks.0.norm2.weight"

    def swap(sd):
        sd[a], sd[b] = sd[b], sd[a]

    _rewrite(path, swap)
    with pytest.raises(ConfigError, match="fingerprint"):
        read_init(str(path))


def test_without_metadata_a_permutation_that_changes_shapes_is_caught_by_the_shape_check(tmp_path) -> None:
    _, path = exported(tmp_path, TINY, metadata=False)
    key = "module.layers1.0.blocks.0.mlp.fc1.weight"  # [48, 12]

    def transpose(sd):
        sd[key] = sd[key].t().contiguous()

    _rewrite(path, transpose)
    source = read_init(str(path))
    with pytest.raises(ConfigError, match=r"mlp.linear1.weight has shape \[12, 48\], this model's is \[48, 12\]"):
        load_encoder(build_segmentation_model(TINY, 2), source)


def test_renamed_prefix_is_refused_not_ignored(tmp_path) -> None:
    """A prefix ssl3d does not know (here ``encoder.``) would make MONAI's load_from fail with a KeyError deep
    inside, or a lenient loader skip everything: refused up front, naming a missing tensor."""
    _, path = exported(tmp_path, TINY, metadata=False)

    def rename(sd):
        for k in list(sd):
            sd["encoder." + k.removeprefix("module.")] = sd.pop(k)

    _rewrite(path, rename)
    with pytest.raises(ConfigError, match="no encoder tensors|missing"):
        source = read_init(str(path))
        load_encoder(build_segmentation_model(TINY, 2), source)
