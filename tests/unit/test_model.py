import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMerging

from ssl3d.config import ModelConfig
from ssl3d.model import LegacyPatchMerging, build_model


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_reference_size_parameter_counts():
    model = build_model(ModelConfig())
    # Figures of the reference's SSLHead (SPEC): 19,097,191 = encoder + heads + "vae" decoder.
    assert count(model) == 19_097_191
    assert count(model.swinViT) == 8_062_002
    assert count(model.rotation_head) + count(model.contrastive_head) == 396_804
    assert count(model.conv) == 10_638_385


@pytest.mark.parametrize("decoder", ["vae", "deconv", "large_kernel_deconv"])
def test_output_shapes(tiny_model_cfg, decoder):
    cfg = ModelConfig(**{**tiny_model_cfg.__dict__, "decoder": decoder})
    out = build_model(cfg)(torch.rand(2, 1, 32, 64, 64))
    assert out.rotation.shape == (2, 4)
    assert out.contrastive.shape == (2, 512)
    assert out.reconstruction.shape == (2, 1, 32, 64, 64)


def test_legacy_patch_merging_order():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 4, 6)  # [B, D, H, W, C]
    legacy, current = LegacyPatchMerging(dim=6), PatchMerging(dim=6)
    current.load_state_dict(legacy.state_dict())
    # Old order: (0,0,0) (1,0,0) (0,1,0) (0,0,1) (1,0,1) (0,1,0) (0,0,1) (1,1,1)
    offsets = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)]
    parts = [x[:, a::2, b::2, c::2, :] for a, b, c in offsets]
    expected = legacy.reduction(legacy.norm(torch.cat(parts, -1)))
    torch.testing.assert_close(legacy(x), expected)
    assert not torch.allclose(legacy(x), current(x))


@pytest.mark.slow
def test_legacy_option_changes_the_encoder_but_not_its_parameters(tiny_model_cfg):
    torch.manual_seed(0)
    new = build_model(tiny_model_cfg)
    old = build_model(ModelConfig(**{**tiny_model_cfg.__dict__, "legacy_patch_merging": True}))
    old.load_state_dict(new.state_dict())  # same names and shapes
    x = torch.rand(1, 1, 64, 64, 64)
    assert not torch.allclose(new(x).reconstruction, old(x).reconstruction)


def test_reference_checkpoint_names_load_without_renaming(tiny_model_cfg):
    names = set(build_model(tiny_model_cfg).state_dict())
    assert {"swinViT.patch_embed.proj.weight", "rotation_head.weight", "contrastive_head.weight"} <= names
    assert "swinViT.layers1.0.blocks.0.mlp.linear1.weight" in names
    assert any(n.startswith("conv.0.") for n in names)


def test_monai_swinunetr_has_same_encoder(tiny_model_cfg):
    ours = build_model(tiny_model_cfg).swinViT.state_dict()
    theirs = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1)).swinViT.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
