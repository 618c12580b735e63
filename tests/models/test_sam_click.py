"""ClickDecoder: the restructured inference decoder gives segment_anything's MaskDecoder outputs (<= 1e-4, fp32), and
its per-image context is made, reused and renewed when it should be."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.backbones.sam import decode_masks
from medseg.models.promptable import build_promptable, sam_prompt_inputs
from medseg.models.sam_click import ClickDecoder, supports
from medseg.prompts.contract import Prompts

TINY_SAM = {"depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}
BOX = [[80.0, 100.0, 160.0, 160.0]]
POINTS = {"point_coords": [[[100.0, 120.0], [130.0, 90.0]]], "point_labels": [[1, 0]]}
PROMPTS = {
    "box": Prompts(box=BOX),
    "points": Prompts(**POINTS),
    "box+points": Prompts(box=BOX, **POINTS),
    "box+mask": Prompts(box=BOX, prev_mask=torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(4)) * 3),
}


@pytest.fixture(scope="module")
def lite():
    return build_promptable("litemedsam", pretrained=True).eval()


@pytest.fixture(scope="module")
def embedding(lite):
    """A real LiteMedSAM embedding of a slice with a bright ellipse (what a click segments)."""
    x, y = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    image = 0.15 + 0.02 * torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    image[((x - 120) / 40) ** 2 + ((y - 130) / 30) ** 2 <= 1] = 0.8
    with torch.inference_mode():
        return lite.encode(image.clamp(0, 1)[None, None])


def _reference(model, embeddings, prompts, multimask):
    points, boxes, masks = sam_prompt_inputs(prompts, tuple(4 * s for s in model.prompt_encoder.image_embedding_size))
    return decode_masks(model.prompt_encoder, model.mask_decoder, embeddings, boxes, points, masks, multimask)


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_litemedsam_clicks_equal_segment_anything(lite, embedding, name, multimask):
    """Three clicks in a row (no context, context made, context reused): each one the MaskDecoder's output."""
    prompts = PROMPTS[name]
    with torch.inference_mode():
        expected, expected_iou = _reference(lite, embedding, prompts, multimask)
        for _ in range(3):
            logits, iou = lite.decode(embedding, prompts, multimask=multimask)
            assert logits.shape == expected.shape == (1, 3 if multimask else 1, 256, 256)
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(iou, expected_iou, atol=1e-4, rtol=1e-4)
            assert torch.equal(logits > 0, expected > 0)


def test_a_batch_of_images_on_a_grid_smaller_than_a_chunk():
    """Tiny SAM (4 x 4 tokens): two images with their own prompts, low-resolution masks upsampled by decode."""
    torch.manual_seed(0)
    model = build_promptable("sam_vit_b", pretrained=False, img_size=64, arch=TINY_SAM).eval()
    embeddings = torch.randn(2, 256, 4, 4, generator=torch.Generator().manual_seed(1))
    prompts = Prompts(box=[[4.0, 8.0, 40.0, 30.0], [10.0, 10.0, 50.0, 60.0]],
                      point_coords=[[[10.0, 20.0]], [[5.0, 6.0]]], point_labels=[[1], [0]])  # fmt: skip
    with torch.no_grad():
        expected, expected_iou = _reference(model, embeddings, prompts, True)
        logits, iou = model.decode(embeddings, prompts, multimask=True)
    upsampled = nn.functional.interpolate(expected, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, upsampled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, expected_iou, atol=1e-4, rtol=1e-4)


def test_the_image_context_is_made_on_the_second_click_and_renewed_after_a_weight_change(lite, embedding):
    clicks = ClickDecoder(lite.prompt_encoder, lite.mask_decoder)
    pe = lite.dense_pe()
    box = torch.tensor([[100.0, 80.0, 160.0, 160.0]])
    with torch.no_grad():
        clicks(embedding, pe, boxes=box)
        assert clicks.contexts_built == 0 and clicks.context is None  # one click on a slice (propagation) pays nothing
        clicks(embedding, pe, boxes=box)
        first = clicks.context
        assert clicks.contexts_built == 1 and first.source is embedding
        clicks(embedding, pe, boxes=box + 5)
        assert clicks.context is first  # prompt-independent: reused by another box
        other = embedding.clone()
        clicks(other, pe, boxes=box)
        clicks(other, pe, boxes=box)
        assert clicks.contexts_built == 2 and clicks.context.source is other
        mask = torch.randn(1, 1, 256, 256)
        clicks(other, pe, boxes=box, masks=mask)
        assert clicks.contexts_built == 2  # a mask input changes the image tokens: no context
        weight = lite.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight
        saved = weight.clone()
        try:
            weight.mul_(1.5)  # in place, as an optimizer step or load_state_dict writes it
            clicks(other, pe, boxes=box)  # a new key: seen once
            clicks(other, pe, boxes=box)
            assert clicks.contexts_built == 3
            expected, _ = decode_masks(lite.prompt_encoder, lite.mask_decoder, other, box)
            torch.testing.assert_close(clicks(other, pe, boxes=box)[0], expected, atol=1e-4, rtol=1e-4)
        finally:
            weight.copy_(saved)


def test_training_keeps_segment_anything_modules(lite, embedding):
    """With autograd on, decode is decode_masks exactly, so the gradients are the reference's."""
    prompts = PROMPTS["box"]
    features = embedding.clone().requires_grad_(True)
    logits, iou = lite.decode(features, prompts)
    expected, expected_iou = _reference(lite, features, prompts, False)
    assert torch.equal(logits, expected) and torch.equal(iou, expected_iou)
    logits.sum().backward()
    assert features.grad is not None


class _Wrapped(nn.Module):
    """A projection wrapped the way an adapter would wrap it."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def test_a_decoder_of_another_layout_runs_the_reference_path():
    torch.manual_seed(0)
    model = build_promptable("sam_vit_b", pretrained=False, img_size=64, arch=TINY_SAM).eval()
    assert supports(model.prompt_encoder, model.mask_decoder) and model.click_decoder() is not None
    attention = model.mask_decoder.transformer.layers[1].cross_attn_image_to_token
    attention.q_proj = _Wrapped(attention.q_proj)
    assert not supports(model.prompt_encoder, model.mask_decoder)
    assert model.click_decoder() is None
    embeddings = torch.randn(1, 256, 4, 4)
    prompts = Prompts(box=[[4.0, 8.0, 40.0, 30.0]])
    with torch.no_grad():
        logits, _ = model.decode(embeddings, prompts)
        expected, _ = _reference(model, embeddings, prompts, False)
    upsampled = nn.functional.interpolate(expected, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(logits, upsampled)
