"""Strategy set-up refusals and helpers that need no process group (fast; no spawn)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ssl3d.strategies import clean_name
from ssl3d.strategies.distributed import init_distributed


def test_clean_name_drops_whole_wrapper_components() -> None:
    assert clean_name("module.swinViT.layers1.0.blocks.0._checkpoint_wrapped_module.norm1.weight") == (
        "swinViT.layers1.0.blocks.0.norm1.weight"
    )
    assert clean_name("_orig_mod.conv.0.weight") == "conv.0.weight"
    assert clean_name("swinViT.submodule.x") == "swinViT.submodule.x"  # only whole components


def test_resuming_another_backends_folder_says_what_it_holds(tmp_path: Path) -> None:
    from ssl3d.strategies.single import SingleStrategy

    (tmp_path / "deepspeed").mkdir()
    strategy = SingleStrategy(torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="DeepSpeed engine checkpoint.*read_checkpoint_weights"):
        strategy.load(tmp_path)


def test_fairscale_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl3d.strategies.fairscale import import_fairscale

    monkeypatch.setitem(sys.modules, "fairscale", None)  # what an environment without the extra looks like
    with pytest.raises(ImportError, match=r"pip install \"ssl3d\[fairscale\]\".*fsdp"):
        import_fairscale()


def test_distributed_env_without_master_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    if torch.distributed.is_initialized():
        pytest.skip("a process group already exists in this process")
    with pytest.raises(RuntimeError, match="torchrun or the deepspeed launcher"):
        init_distributed("gloo")


def test_read_checkpoint_weights_of_an_unknown_folder(tmp_path: Path) -> None:
    from ssl3d.strategies import read_checkpoint_weights

    with pytest.raises(FileNotFoundError, match="state.pt, dcp/ or deepspeed/"):
        read_checkpoint_weights(tmp_path)
