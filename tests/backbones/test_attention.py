"""Fused attention (issue 18): same parameters and outputs as segment_anything's / TinyViT's / timm's own attention."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from segment_anything.modeling.image_encoder import Attention as SamAttention

from medseg.adapters import apply_adapters, volume_depth
from medseg.adapters.targets import is_adapter_name
from medseg.backbones import create_backbone
from medseg.backbones.attention import FusedSamAttention, attention_mode, set_attention
from medseg.backbones.sam import build_sam_components
from medseg.errors import ConfigError

# Block 0 windowed (14 x 14 windows on a 16 x 16 grid: 4 windows, padded), block 1 global.
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}
SIZE = 256


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Tiny models: one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def official_sam(tmp_path_factory):
    """(segment_anything's own tiny encoder, path of a full SAM state dict in the official file layout).

    The modules are segment_anything's classes with their own attention (``attention="reference"``); every weight is
    perturbed, the zero-initialised relative-position tables strongly, so that the position bias matters.
    """
    torch.manual_seed(0)
    parts = build_sam_components("sam_vit_b", pretrained=False, img_size=SIZE, arch=TINY, attention="reference")
    with torch.no_grad():
        for name, param in parts.image_encoder.named_parameters():
            param.add_(torch.randn_like(param) * (0.5 if "rel_pos" in name else 0.05))
    state = {f"{part}.{k}": v for part, module in parts._asdict().items() for k, v in module.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    return parts.image_encoder.eval(), path


def _sam(path, **kwargs):
    return create_backbone("sam_vit_b", checkpoint=path, arch=TINY, img_size=SIZE, in_channels=3, **kwargs)


def _reference_blocks(encoder, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """segment_anything's ImageEncoderViT.forward, keeping every block's output."""
    x = encoder.patch_embed(x) + encoder.pos_embed
    outputs = []
    for block in encoder.blocks:
        x = block(x)
        outputs.append(x.permute(0, 3, 1, 2))
    return outputs, encoder.neck(x.permute(0, 3, 1, 2))


def test_fused_sam_encoder_loads_official_file_strictly_and_matches_segment_anything(official_sam):
    reference, path = official_sam
    model = _sam(path).eval()  # fused is the default; create_backbone loads strictly
    assert all(type(block.attn) is FusedSamAttention for block in model.image_encoder.blocks)
    assert model.image_encoder.state_dict().keys() == reference.state_dict().keys()
    x = torch.rand(2, 3, SIZE, SIZE) * 255
    with torch.no_grad():
        ours = model(x, layers=(0, 1))
        blocks, features = _reference_blocks(reference, model.standardise(x))
    for index, (a, b) in enumerate(zip(ours.intermediates, blocks, strict=True)):  # windowed, then global
        assert (a - b).abs().max().item() <= 1e-4, f"block {index}"
    assert (ours.features - features).abs().max().item() <= 1e-4


def test_fused_sam_gradients_match_the_reference(official_sam):
    _, path = official_sam
    fused, reference = _sam(path).train(), _sam(path, attention="reference").train()
    assert attention_mode(reference) == "reference" and attention_mode(fused) == "fused"
    x = torch.rand(2, 3, SIZE, SIZE) * 255
    for model in (fused, reference):
        model(x).features.square().mean().backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "config",
    [
        {"method": "lora", "rank": 4},
        {"method": "dora", "rank": 4},
        {"method": "adaptformer", "bottleneck": 8},
        {"method": "adapter3d", "bottleneck": 8},
    ],
    ids=lambda c: c["method"],
)
def test_parity_holds_with_adapters_applied(official_sam, config):
    _, path = official_sam
    fused, reference = _sam(path), _sam(path, attention="reference")
    for model in (fused, reference):
        apply_adapters(model, config)
    torch.manual_seed(1)
    with torch.no_grad():  # zero-initialised adapters would hide a wrongly wired one: give them values
        for name, param in fused.named_parameters():
            if is_adapter_name(name):
                param.normal_(0.0, 0.1)
    reference.load_state_dict(fused.state_dict())  # same names: the adapted fused model loads into the reference
    if config["method"] in {"lora", "dora"}:  # peft wraps the fused module's own qkv Linear
        attn = fused.image_encoder.blocks[1].attn
        assert type(attn) is FusedSamAttention and isinstance(attn.qkv, LoraLayer)
    x = torch.rand(2, 3, SIZE, SIZE) * 255
    outputs = []
    for model in (fused, reference):
        with volume_depth(model, 2):  # adapter3d: one volume of two slices
            out = model.train()(x).features
        out.square().mean().backward()
        outputs.append(out.detach())
    assert (outputs[0] - outputs[1]).abs().max().item() <= 1e-4
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (fused, reference)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-3, msg=name)


def test_litemedsam_tinyvit_fused_matches_the_package_attention():
    fused = create_backbone("litemedsam").eval()  # the bundled official weights
    reference = create_backbone("litemedsam", attention="reference").eval()
    kinds = {type(m).__name__ for m in fused.image_encoder.modules()}
    assert "FusedTinyViTAttention" in kinds and attention_mode(reference) == "reference"
    assert fused.state_dict().keys() == reference.state_dict().keys()
    x = torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fused(x, layers=(3, -1)), reference(x, layers=(3, -1))
    assert (a.features - b.features).abs().max().item() <= 1e-4
    for ours, theirs in zip(a.intermediates, b.intermediates, strict=True):
        assert (ours - theirs).abs().max().item() <= 1e-4


def test_timm_vits_take_the_switch_through_their_own_flag():
    arch = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 56}
    torch.manual_seed(0)
    model = create_backbone("dinov2_vits14", pretrained=False, arch=arch, attention="reference").eval()
    flags = [block.attn.fused_attn for block in model.vit.blocks]
    assert flags == [False, False]
    x = torch.rand(1, 1, 56, 56)
    with torch.no_grad():
        reference = model(x).features
        assert model.set_attention("fused") == 2
        fused = model(x).features
    assert [block.attn.fused_attn for block in model.vit.blocks] == [True, True]
    assert (fused - reference).abs().max().item() <= 1e-5


def test_switching_keeps_the_same_module_and_parameters(official_sam):
    _, path = official_sam
    model = _sam(path)
    attn = model.image_encoder.blocks[0].attn
    params = [id(p) for p in model.parameters()]
    assert set_attention(model, "reference") == 2 and type(attn) is SamAttention
    assert set_attention(model, "fused") == 2 and type(attn) is FusedSamAttention
    assert model.image_encoder.blocks[0].attn is attn and [id(p) for p in model.parameters()] == params


def test_unknown_attention_mode_is_a_config_error():
    with pytest.raises(ConfigError, match=r"attention must be one of fused, reference.*'flash'"):
        create_backbone("sam_vit_b", pretrained=False, arch=TINY, img_size=64, attention="flash")
