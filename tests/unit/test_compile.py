"""Regional torch.compile (``ssl3d.model.compile``) against eager: loss and gradients, with a checkpointing policy.

The regions are every Swin block and the decoder (tests/dist/test_compile_strategies.py runs the same comparison
under DDP and FSDP2 on 2 ranks).

Tolerance. In fp64 every gradient tensor is within 1e-9 x the largest gradient of the eager run (observed ~3e-14
with the decomposing backend): the compiled blocks compute the same function. In fp32 the compiled and eager
summation orders differ and the differences pass through ~20 layers and the decoder's instance norms (observed up
to 8e-4 of the largest gradient on the first decoder conv), which would hide little, so fp32 is not the check.

The first test compiles with ``aot_eager_decomp_partition``: dynamo's capture of the fused blocks (custom autograd
Functions, the non-reentrant checkpoints, the ``WindowOrder`` argument), AOTAutograd's decompositions and the
forward/backward partition, all that inductor is given, without inductor's C++ compile (minutes on two cores). The
second runs inductor itself on one stage. Both are in the slow tier; the config key's test is fast.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ssl3d.config import ConfigError, ModelConfig, load_config
from ssl3d.memory import apply_activation_checkpointing
from ssl3d.model import build_model
from ssl3d.model.attention import apply_fused_attention
from ssl3d.model.compile import (
    compile_problem,
    compile_refusal,
    compile_regions,
    compiled_regions,
    decoder_regions,
)
from ssl3d.ssl import SSLLoss

SELECTIVE = {"policy": "selective", "stages": [0, 1], "part": "both", "decoder": True}
RTOL = 1e-9


def _model(depths=(1, 1, 1, 1)):
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_size=12, depths=depths, num_heads=(3, 3, 6, 6))).double()
    apply_fused_attention(model)
    return model


def _loss_and_grads(model, x):
    out = model(x)
    loss = SSLLoss()(out.rotation, torch.tensor([0, 2]), out.contrastive, out.reconstruction, x)["total"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(eager, compiled, x):
    (l0, g0), (l1, g1) = _loss_and_grads(eager, x), _loss_and_grads(compiled, x)
    scale = max(g.abs().max().item() for g in g0.values())
    assert abs(l1 - l0).item() <= RTOL * abs(l0).item()
    for k in g0:
        err = (g1[k] - g0[k]).abs().max().item()
        assert err <= RTOL * scale, f"{k}: max difference {err:.3g} (largest gradient {scale:.3g})"


@pytest.mark.slow  # dynamo's capture of four stages: ~30 s on two cores
def test_compiled_regions_match_eager_with_checkpointing():
    torch._dynamo.reset()
    eager = _model()
    apply_activation_checkpointing(eager, SELECTIVE)
    compiled = copy.deepcopy(eager)
    assert compile_regions(compiled, backend="aot_eager_decomp_partition") == 5
    blocks = [n for n, m in compiled.named_modules() if n.endswith(".blocks.0")]
    assert compiled_regions(compiled) == [*blocks, "conv"]  # every Swin block and the checkpointed decoder
    assert list(compiled.state_dict()) == list(eager.state_dict())  # names unchanged: checkpoints load as before
    _assert_same(eager, compiled, torch.rand(2, 1, 32, 32, 64, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.skipif(compile_problem("cpu") is not None, reason="inductor on the CPU needs a C++ compiler")
def test_inductor_matches_eager_on_one_stage():
    """Inductor's C++ code on the shifted block of stage 1 (roll, shift mask, fused attention), checkpointed; the
    other blocks and the decoder stay eager. Their graphs, as inductor is given them, are checked by the test above;
    each more region compiled by inductor adds about half a minute on two cores."""
    torch._dynamo.reset()
    eager = _model(depths=(2, 1, 1, 1))
    apply_activation_checkpointing(eager, SELECTIVE)
    compiled = copy.deepcopy(eager)
    shifted = compiled.swinViT.layers1[0].blocks[1]
    assert any(shifted.shift_size)
    assert compile_regions(shifted) == 1  # no decoder in a block
    _assert_same(eager, compiled, torch.rand(2, 1, 32, 32, 64, dtype=torch.float64))


def test_config_key_and_its_check(tmp_path):
    assert load_config(None, []).model.compile is False
    assert load_config(None, ["model.compile=true"]).model.compile is True
    with pytest.raises(ConfigError, match="model.compile"):
        load_config(None, ['model.compile="yes"'])


@pytest.mark.parametrize(
    ("strategy", "stage", "refused"),
    [("deepspeed", 3, True), ("deepspeed", 2, False), ("deepspeed", 1, False), ("deepspeed", 0, False)]
    + [(s, 0, False) for s in ("single", "ddp", "fsdp", "fairscale")],
)
def test_compile_refusal(strategy, stage, refused):
    message = compile_refusal(strategy, stage)
    if not refused:
        assert message is None
        return
    assert "\n" not in message and message.startswith("model.compile")
    assert "zero_optimization.stage 3" in message  # the key that makes it refused ...
    assert '"fsdp"' in message and "ZeRO stage 1 or 2" in message  # ... and what works instead


def test_decoder_regions():
    """The SSL model's reconstruction decoder is one region; SwinUNETR's five up-sampling blocks are one each; a
    frozen decoder is left out. ``nn.Module.compile`` is lazy: nothing is traced here."""
    from monai.networks.blocks import UnetrUpBlock

    from ssl3d.model.segmentation import build_segmentation_model

    ssl = _model()
    assert decoder_regions(ssl) == [ssl.conv]
    assert compile_regions(ssl, decoder=False) == 4 and "conv" not in compiled_regions(ssl)
    unet = build_segmentation_model(ModelConfig(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 6, 6)), 2)
    assert [type(m) for m in decoder_regions(unet)] == [UnetrUpBlock] * 5
    assert compile_regions(unet) == 4 + 5
    frozen = _model()
    frozen.conv.requires_grad_(False)
    assert decoder_regions(frozen) == []
