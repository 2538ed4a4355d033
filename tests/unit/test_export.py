from pathlib import Path

import torch
from monai.networks.nets import SwinUNETR

from ssl3d.checkpoint import export_swinvit, load_init_weights, read_weights
from ssl3d.cli import main
from ssl3d.model import build_model


def test_exported_file_loads_into_monai_swinunetr(tmp_path, tiny_model_cfg):
    torch.manual_seed(1)
    model = build_model(tiny_model_cfg)
    path = export_swinvit(model.state_dict(), tmp_path / "model_swinvit.pt")
    blob = torch.load(path, weights_only=True)
    keys = blob["state_dict"].keys()
    assert "module.patch_embed.proj.weight" in keys
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in keys
    assert "module.layers1.0.downsample.reduction.weight" in keys
    assert not any("swinViT" in k or "linear1" in k for k in keys)

    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1))
    net.load_from(torch.load(path, weights_only=True))
    theirs = net.swinViT.state_dict()
    for name, tensor in model.swinViT.state_dict().items():
        torch.testing.assert_close(theirs[name], tensor, rtol=0, atol=0)


def test_swinvit_file_initialises_a_new_model(tmp_path, tiny_model_cfg):
    torch.manual_seed(2)
    src = build_model(tiny_model_cfg)
    path = export_swinvit(src.state_dict(), tmp_path / "model_swinvit.pt")
    torch.manual_seed(3)
    dst = build_model(tiny_model_cfg)
    untouched = load_init_weights(dst, path)
    for name, tensor in src.swinViT.state_dict().items():
        torch.testing.assert_close(dst.swinViT.state_dict()[name], tensor, rtol=0, atol=0)
    assert all(not n.startswith("swinViT.") for n in untouched)  # only heads/decoder left as built


def test_reference_checkpoint_with_ddp_prefix_and_old_mlp_names(tmp_path, tiny_model_cfg):
    torch.manual_seed(4)
    src = build_model(tiny_model_cfg)
    state = {
        "module." + k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): v
        for k, v in src.state_dict().items()
    }
    torch.save({"global_step": 10, "state_dict": state, "optimizer": {}}, tmp_path / "model_bestValRMSE.pt")
    loaded = read_weights(tmp_path / "model_bestValRMSE.pt")
    assert set(loaded) == set(src.state_dict())
    dst = build_model(tiny_model_cfg)
    assert load_init_weights(dst, tmp_path / "model_bestValRMSE.pt") == []
    x = torch.rand(1, 1, 32, 64, 64)
    torch.testing.assert_close(dst(x).reconstruction, src(x).reconstruction)


class _RunsCodeWhenUnpickled:
    """What a hostile weight file can hold: unpickling it calls a function of the author's choice (here: creates a
    marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_files_that_need_unpickling_are_refused_unless_allow_pickle(tmp_path, tiny_model_cfg, capsys):
    """weights_only=True: a file carrying anything but tensors and plain containers is refused with one line (exit
    2, its code never run, nothing written); ``ssl3d export --allow-pickle`` reads it."""
    torch.manual_seed(5)
    src = build_model(tiny_model_cfg)
    marker = tmp_path / "code_ran"
    path = tmp_path / "old_checkpoint.pt"
    torch.save({"state_dict": src.state_dict(), "args": _RunsCodeWhenUnpickled(marker)}, path)
    out = tmp_path / "model_swinvit.pt"
    assert main(["export", str(path), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "--allow-pickle" in err[0], err
    assert not marker.exists() and not out.exists()
    assert main(["export", str(path), str(out), "--allow-pickle"]) == 0
    assert marker.exists()  # really unpickled
    exported = torch.load(out, weights_only=True)["state_dict"]
    assert torch.equal(exported["module.patch_embed.proj.weight"], src.state_dict()["swinViT.patch_embed.proj.weight"])
