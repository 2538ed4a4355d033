"""Activation checkpointing policies: same loss and gradients as none, unchanged names, config errors.

Tolerance: recomputation runs the same CPU kernels on the same inputs, so results are expected to be identical;
the comparison allows rtol 1e-5 / atol 1e-7 to stay robust to a non-deterministic kernel choice.
"""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
from monai.networks.nets.swin_unetr import SwinTransformerBlock

from ssl3d.config import ConfigError, ModelConfig
from ssl3d.memory.checkpointing import (
    CHECKPOINT_KEYS,
    CheckpointPolicy,
    apply_activation_checkpointing,
    checkpointed_modules,
    decoder_segments,
    simulate_offload,
)
from ssl3d.model import build_model
from ssl3d.ssl import SSLLoss

# Window 4 keeps attention cheap on 2 CPU cores; the first two stages have shifted blocks.
TINY = ModelConfig(feature_size=12, depths=(2, 2, 1, 1), num_heads=(3, 6, 12, 24), window_size=4)


def _step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    out = model(x)
    loss = SSLLoss()(out.rotation, labels, out.contrastive, out.reconstruction, x)["total"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = build_model(TINY)
    x = torch.rand(2, 1, 32, 64, 64)
    labels = torch.tensor([1, 3])
    loss, grads = _step(copy.deepcopy(model), x, labels)
    return model, x, labels, loss, grads


POLICIES = {
    "full": "full",
    "selective-default": "selective",
    "selective-mlp-k2-decoder": {"policy": "selective", "part": "mlp", "every_k_blocks": 2, "decoder": True},
    "selective-both-stages-0-3": {"policy": "selective", "part": "both", "stages": [0, 3]},
    "selective-merging-only": {"policy": "selective", "stages": [1], "part": "block", "merging": True},
    "offload": "offload",
    "full-cpu-checkpointing": {"cpu_checkpointing": True},
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_matches_no_checkpointing(reference, name):
    model, x, labels, ref_loss, ref_grads = reference
    m = copy.deepcopy(model)
    apply_activation_checkpointing(m, POLICIES[name])
    assert checkpointed_modules(m), "the policy wrapped nothing"
    # On a CPU-only machine offload would keep tensors in place; simulate it so pack/unpack really run.
    with simulate_offload(contextlib.nullcontext):
        loss, grads = _step(m, x, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def test_state_dict_names_unchanged_and_loadable(reference):
    model = reference[0]
    m = copy.deepcopy(model)
    apply_activation_checkpointing(m, "full")
    assert list(m.state_dict()) == list(model.state_dict())
    assert not any("_checkpoint_wrapped_module" in k for k in m.state_dict())
    m.load_state_dict(model.state_dict(), strict=True)
    # MONAI classes still recognised (FSDP unit selection relies on it), and the swap round-trips.
    assert all(isinstance(b, SwinTransformerBlock) for b in m.swinViT.layers1[0].blocks)
    pickle.loads(pickle.dumps(m))
    copy.deepcopy(m)
    apply_activation_checkpointing(m, "none")
    assert {type(b) for b in m.swinViT.layers1[0].blocks} == {SwinTransformerBlock}
    assert type(m.conv) is torch.nn.Sequential
    assert checkpointed_modules(m) == {}


def test_policy_selection():
    m = build_model(TINY)
    apply_activation_checkpointing(m, {"policy": "selective", "stages": [0, 1], "every_k_blocks": 2, "part": "mlp"})
    done = checkpointed_modules(m)
    # Blocks of stages 0 and 1 numbered 0..3 across stages: every second one.
    assert done == {"swinViT.layers1.0.blocks.0": "recompute mlp", "swinViT.layers2.0.blocks.0": "recompute mlp"}
    apply_activation_checkpointing(m, "full")
    done = checkpointed_modules(m)
    assert sum(1 for k in done if ".blocks." in k) == sum(TINY.depths)
    assert done["conv"].startswith("recompute stages")
    assert "swinViT.layers1.0.downsample" in done


def test_vae_decoder_stages():
    m = build_model(TINY)
    # [Conv, Norm, Act, Upsample] x 5, the final 1x1x1 conv joins the last stage.
    assert decoder_segments(m.conv) == ((0, 4), (4, 8), (8, 12), (12, 16), (16, 21))


def test_wrapped_model_refused():
    m = build_model(TINY)
    with pytest.raises(TypeError, match="before DDP/FSDP/DeepSpeed/torch.compile"):
        apply_activation_checkpointing(torch.nn.Sequential(m), "full")


# -- parsing -------------------------------------------------------------------------------------------------


def test_unknown_key_names_dotted_key():
    with pytest.raises(ConfigError, match=r"activation_checkpointing\.polcy: unknown key; did you mean 'policy'") as e:
        CheckpointPolicy.from_dict({"polcy": "full"})
    assert "valid keys: " + ", ".join(CHECKPOINT_KEYS) in str(e.value)


def test_bad_values_collected():
    with pytest.raises(ConfigError) as e:
        CheckpointPolicy.from_dict({"policy": "selctive", "stages": [0, 7], "part": "ffn", "every_k_blocks": 0})
    msg = str(e.value)
    assert 'activation_checkpointing.policy: got "selctive"' in msg and 'did you mean "selective"' in msg
    assert "activation_checkpointing.stages" in msg and "activation_checkpointing.part" in msg
    assert "activation_checkpointing.every_k_blocks" in msg
    assert len(e.value.problems) == 4


def test_deepspeed_vocabulary():
    p = CheckpointPolicy.from_dict(
        {
            "partition_activations": False,
            "cpu_checkpointing": True,
            "contiguous_memory_optimization": False,
            "number_checkpoints": 4,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
            "_comment": "ignored",
        }
    )
    assert p.policy == "full" and p.offload_to_cpu and p.recompute
    assert any("number_checkpoints" in n for n in p.notes)
    assert CheckpointPolicy.from_dict({}).policy == "none"
    with pytest.raises(ConfigError, match="cpu_checkpointing.*same switch"):
        CheckpointPolicy.from_dict({"cpu_checkpointing": True, "offload_to_cpu": False})
    with pytest.warns(UserWarning, match="partition_activations"):
        apply_activation_checkpointing(build_model(TINY), {"policy": "full", "partition_activations": True})


def test_round_trip_and_labels():
    p = CheckpointPolicy.preset("selective", part="mlp")
    assert CheckpointPolicy.from_dict(p.to_dict()) == p
    assert p.label == "selective(mlp@0,1)"
    assert CheckpointPolicy.preset("full").label == "full(block@0,1,2,3 merging decoder)"


def test_full_policy_under_torch_compile(reference):
    """Checkpointing (and fused attention) traced by dynamo + AOTAutograd; aot_eager needs no C++ compiler."""
    from ssl3d.model.attention import apply_fused_attention

    model, x, labels, ref_loss, ref_grads = reference
    m = copy.deepcopy(model)
    apply_fused_attention(m)
    apply_activation_checkpointing(m, "full")
    compiled = torch.compile(m, backend="aot_eager")
    loss, grads = _step(compiled, x, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for k, g in grads.items():
        ref = ref_grads[k.replace("_orig_mod.", "")]
        err, scale = (g - ref).abs().max().item(), ref.abs().max().item()
        assert err <= 1e-4 * scale + 1e-6, f"{k}: {err:.3g} vs max {scale:.3g}"
