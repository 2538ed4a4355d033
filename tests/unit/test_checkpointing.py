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
from torch.utils._python_dispatch import TorchDispatchMode

from ssl3d.config import ConfigError, ModelConfig
from ssl3d.memory.activation_checkpointing import (
    CHECKPOINT_KEYS,
    CheckpointPolicy,
    apply_activation_checkpointing,
    checkpointed_modules,
    decoder_segments,
    simulate_offload,
)
from ssl3d.model import ReorderedSequential, build_model
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


@pytest.mark.slow
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
    assert type(m.conv) is ReorderedSequential
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


@pytest.mark.slow
def test_full_policy_under_torch_compile(reference):
    """The full policy's checkpoints (and fused attention) traced by dynamo + AOTAutograd in ``model.compile``'s
    regions (every Swin block and the decoder); aot_eager needs no C++ compiler."""
    from ssl3d.model.attention import apply_fused_attention
    from ssl3d.model.compile import compile_regions

    model, x, labels, ref_loss, ref_grads = reference
    m = copy.deepcopy(model)
    apply_fused_attention(m)
    apply_activation_checkpointing(m, "full")
    torch._dynamo.reset()
    assert compile_regions(m, backend="aot_eager") == sum(TINY.depths) + 1
    loss, grads = _step(m, x, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for k, g in grads.items():
        ref = ref_grads[k]
        err, scale = (g - ref).abs().max().item(), ref.abs().max().item()
        assert err <= 1e-4 * scale + 1e-6, f"{k}: {err:.3g} vs max {scale:.3g}"


# -- what each policy does, measured -------------------------------------------------------------------------

# Modules that run their forward twice (once more in backward) under each policy of POLICIES, for TINY (depths
# 2-2-1-1): "attn"/"mlp" of blocks (stage, block), "merge" of stages, "decoder" = every conv of the decoder.
_ALL_BLOCKS = [(s, b) for s, n in enumerate(TINY.depths) for b in range(n)]
RECOMPUTED = {
    "full": {("attn", *k) for k in _ALL_BLOCKS}
    | {("mlp", *k) for k in _ALL_BLOCKS}
    | {("merge", s) for s in range(4)}
    | {("decoder",)},
    "selective-default": {("attn", s, b) for s, b in _ALL_BLOCKS if s in (0, 1)},
    "selective-mlp-k2-decoder": {("mlp", 0, 0), ("mlp", 1, 0), ("decoder",)},
    "selective-both-stages-0-3": {(part, s, b) for part in ("attn", "mlp") for s, b in _ALL_BLOCKS if s in (0, 3)},
    "selective-merging-only": {("attn", 1, 0), ("mlp", 1, 0), ("attn", 1, 1), ("mlp", 1, 1), ("merge", 1)},
    "offload": set(),
}
RECOMPUTED["full-cpu-checkpointing"] = RECOMPUTED["full"]


def _measured_step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[set, int, int]:
    """One forward + backward; returns the modules whose forward ran twice, the bytes autograd saved outside any
    policy region, and the bytes offload copied to (simulated) host memory."""
    calls: dict[tuple, int] = {}

    def count(key: tuple):
        def hook(*_):
            calls[key] = calls.get(key, 0) + 1

        return hook

    for s in range(4):
        layer = getattr(model.swinViT, f"layers{s + 1}")[0]
        for b, block in enumerate(layer.blocks):
            block.attn.register_forward_hook(count(("attn", s, b)))
            block.mlp.register_forward_hook(count(("mlp", s, b)))
        # Inside the patch merging: its own forward is re-run by its swapped class without its hooks.
        layer.downsample.reduction.register_forward_hook(count(("merge", s)))
    convs = [m for m in model.conv if isinstance(m, torch.nn.Conv3d)]
    for conv in convs:
        conv.register_forward_hook(count(("decoder",)))
    saved, host = [0], [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    class HostCopies(TorchDispatchMode):  # what offload allocates as (simulated) host memory
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.clone.default:  # the copy (detach before it is a view)
                host[0] += out.numel() * out.element_size()
            return out

    # Recompute whole regions (torch stops a recomputation early once it has every saved tensor back, which would
    # hide the last module of a region from the count).
    with simulate_offload(HostCopies), torch.utils.checkpoint.set_checkpoint_early_stop(False):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
            loss = SSLLoss()(out.rotation, labels, out.contrastive, out.reconstruction, x)["total"]
        loss.backward()
    twice = {k for k, n in calls.items() if n == 2}
    decoder_runs = calls[("decoder",)] / len(convs)
    twice.discard(("decoder",))
    if decoder_runs == 2:
        twice.add(("decoder",))
    assert all(n == 1 for k, n in calls.items() if k not in twice and k != ("decoder",)), calls
    assert decoder_runs in (1, 2), decoder_runs
    return twice, saved[0], host[0]


@pytest.fixture(scope="module")
def measured_none(reference):
    model, x, labels, *_ = reference
    return _measured_step(copy.deepcopy(model), x, labels)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_recomputes_and_offloads_what_it_says(reference, measured_none, name):
    """Counted, not labelled: the modules a policy checkpoints run their forward a second time in backward (and no
    others do); what they saved for backward leaves autograd's saved tensors; offload moves every saved tensor
    of its regions to host memory instead of recomputing."""
    model, x, labels, *_ = reference
    m = copy.deepcopy(model)
    apply_activation_checkpointing(m, POLICIES[name])
    twice, saved, host = _measured_step(m, x, labels)
    none_twice, none_saved, none_host = measured_none
    assert none_twice == set() and none_host == 0
    assert twice == RECOMPUTED[name]
    print(f"{name}: saved {saved / 2**20:.1f} MiB (none: {none_saved / 2**20:.1f}), host copies {host / 2**20:.1f} MiB")
    if name == "offload":
        # Every block, merging and decoder stage offloaded: all that is left on the device is the patch embedding's
        # and the heads' (a few %); the rest is in host memory, byte for byte.
        assert saved < 0.1 * none_saved
        assert saved + host == none_saved
    else:
        assert saved < (0.15 if name.startswith("full") else 0.9) * none_saved
        if "cpu" in name:  # cpu_checkpointing: the checkpoints' inputs in host memory as well
            assert host > 0 and saved < 0.1 * none_saved
        else:
            assert host == 0


# -- chunked MLPs ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "section",
    [
        {"policy": "full", "mlp_chunks": 3},
        {"policy": "selective", "stages": [0, 1], "part": "attention", "mlp_chunks": 2},
        {"policy": "selective", "stages": [0], "part": "mlp", "mlp_chunks": 4},
    ],
)
def test_mlp_chunks_match_no_checkpointing_and_bound_the_hidden_layer(reference, section):
    """norm2 + MLP per chunk of the first spatial axis: same loss and gradients (tolerances as above), and the
    4x-wide hidden layer of a stage-0 block never exists for more than one chunk."""
    model, x, labels, ref_loss, ref_grads = reference
    m = copy.deepcopy(model)
    apply_activation_checkpointing(m, section)
    block = m.swinViT.layers1[0].blocks[0]
    assert checkpointed_modules(m)["swinViT.layers1.0.blocks.0"].endswith(f"mlp/{section['mlp_chunks']}")
    hidden: list[tuple[int, ...]] = []
    block.mlp.linear1.register_forward_hook(lambda mod, i, o: hidden.append(tuple(o.shape)))
    loss, grads = _step(m, x, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    depth = x.shape[2] // 2  # [B, D, H, W, C] after the patch embedding (patch 2)
    largest = -(-depth // section["mlp_chunks"])
    assert hidden and max(s[1] for s in hidden) == largest
    assert sum(s[1] for s in hidden[: section["mlp_chunks"]]) == depth  # the first forward covers the volume once


def test_mlp_chunks_parsing_and_label():
    p = CheckpointPolicy.from_dict({"policy": "full", "mlp_chunks": 4})
    assert p.mlp_chunks == 4 and p.label == "full(block@0,1,2,3 merging mlp/4 decoder)"
    assert CheckpointPolicy.from_dict(p.to_dict()) == p
    with pytest.raises(ConfigError, match=r"activation_checkpointing\.mlp_chunks: got 0, expected an integer >= 1"):
        CheckpointPolicy.from_dict({"policy": "full", "mlp_chunks": 0})
    notes = CheckpointPolicy.from_dict({"policy": "none", "mlp_chunks": 2}).notes
    assert any("mlp_chunks: no effect" in n for n in notes)
