"""sam_mask: pretrained mask-decoder weights (SAM, LiteMedSAM), learnable class tokens, a scratch twin of same shape."""

from __future__ import annotations

import pytest
import torch

from medseg.backbones.litemedsam import locate_litemedsam_weights
from medseg.backbones.sam import build_sam_components
from medseg.backbones.weights import read_checkpoint, strip_prefixes
from medseg.models import build_segmenter

SAM_TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}


def _assert_decoder_from(state: dict, model, num_classes: int) -> None:
    """Every decoder tensor equals its source in a full SAM-layout state dict."""
    decoder = model.decoder.state_dict()
    for key, value in decoder.items():
        if key.startswith("class_tokens."):
            source = [state["mask_decoder.mask_tokens.weight"][k % 4] for k in range(num_classes)]
            expected = torch.stack(source)
        elif key.startswith("output_hypernetworks_mlps."):
            index, rest = key.split(".", 2)[1:]
            expected = state[f"mask_decoder.output_hypernetworks_mlps.{int(index) % 4}.{rest}"]
        elif key.startswith(("pe_layer.", "no_mask_embed.")):
            expected = state[f"prompt_encoder.{key}"]
        else:
            expected = state[f"mask_decoder.{key}"]
        assert torch.equal(value, expected), key


@pytest.fixture(scope="module")
def litemedsam_pair():
    torch.manual_seed(0)
    pretrained = build_segmenter("litemedsam", True, None, "sam_mask", num_classes=6, in_channels=1)
    scratch = build_segmenter("litemedsam", False, None, "sam_mask", num_classes=6, in_channels=1)
    return pretrained, scratch


def test_litemedsam_mask_decoder_weights_are_the_checkpoints(litemedsam_pair):
    model, _ = litemedsam_pair
    state = strip_prefixes(read_checkpoint(locate_litemedsam_weights()))
    _assert_decoder_from(state, model, num_classes=6)
    encoder = model.backbone.image_encoder.state_dict()
    assert all(torch.equal(v, state[f"image_encoder.{k}"]) for k, v in encoder.items())


def test_class_tokens_are_learnable_and_each_class_gets_its_own_gradient(litemedsam_pair):
    from medseg.backbones.base import BackboneOutput

    model, _ = litemedsam_pair
    decoder = model.decoder
    assert decoder.class_tokens.weight.requires_grad and decoder.class_tokens.weight.shape == (6, 256)
    decoder.zero_grad()
    features = torch.randn(1, 256, 16, 16)  # the decoder alone, on a small embedding: cheap on CPU
    logits = decoder(BackboneOutput(features=features), torch.zeros(1, 1, 64, 64))
    assert logits.shape == (1, 6, 64, 64)
    target = torch.arange(6).repeat_interleave(64 * 64 // 6 + 1)[: 64 * 64].view(1, 64, 64)
    torch.nn.functional.cross_entropy(logits, target).backward()
    grad = decoder.class_tokens.weight.grad
    assert grad is not None and (grad.abs().sum(dim=1) > 0).all()
    assert not torch.allclose(grad[0], grad[4])  # tokens 0 and 4 start equal (both from SAM's token 0), then split


def test_scratch_twin_differs_only_in_values(litemedsam_pair):
    pretrained, scratch = litemedsam_pair
    a, b = pretrained.state_dict(), scratch.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    for key in ("decoder.transformer.layers.0.self_attn.q_proj.weight", "backbone.image_encoder.neck.0.weight"):
        assert not torch.equal(a[key], b[key]), key


def test_tiny_sam_full_checkpoint_loads_into_encoder_and_decoder(tmp_path):
    torch.manual_seed(1)
    reference = build_sam_components("sam_vit_b", pretrained=False, img_size=64, arch=SAM_TINY)
    with torch.no_grad():
        for module in reference:
            for param in module.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    state = {f"{prefix}.{k}": v for prefix, m in reference._asdict().items() for k, v in m.state_dict().items()}
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    model = build_segmenter("sam_vit_b", True, str(path), "sam_mask", 5, 1, img_size=64, arch=SAM_TINY)
    _assert_decoder_from(state, model, num_classes=5)
    encoder = model.backbone.image_encoder.state_dict()
    assert all(torch.equal(v, state[f"image_encoder.{k}"]) for k, v in encoder.items())
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 5, 64, 64)
