"""PromptableSegmenter: prompt handling and shapes on tiny models, pretrained LiteMedSAM weights on the real file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medseg.backbones.litemedsam import locate_litemedsam_weights
from medseg.backbones.sam import decode_masks
from medseg.errors import InputShapeError
from medseg.models.promptable import ProjectionNeck, build_promptable
from medseg.prompts.contract import Prompts

TINY_SAM = {"depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}
TINY_DINO = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 56}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_promptable("sam_vit_b", pretrained=False, img_size=64, arch=TINY_SAM).eval()


@pytest.fixture(scope="module")
def embeddings(tiny):
    with torch.no_grad():
        return tiny.encode(torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)))


POINTS = Prompts(point_coords=[[[10.0, 20.0], [30.0, 31.0]], [[5.0, 6.0], [0.0, 0.0]]], point_labels=[[1, 0], [1, -1]])
BOX = Prompts(box=[[4.0, 8.0, 40.0, 30.0], [10.0, 10.0, 50.0, 60.0]])


@pytest.mark.parametrize("multimask, count", [(False, 1), (True, 3)])
@pytest.mark.parametrize(
    "prompts",
    [
        POINTS,
        BOX,
        Prompts(box=BOX.box, point_coords=POINTS.point_coords, point_labels=POINTS.point_labels),
        Prompts(box=BOX.box, prev_mask=torch.randn(2, 1, 64, 64)),
    ],
    ids=["points", "box", "box+points", "box+prev_mask"],
)
def test_decode_shapes(tiny, embeddings, prompts, multimask, count):
    assert embeddings.shape == (2, 256, 4, 4)
    with torch.no_grad():
        logits, iou = tiny.decode(embeddings, prompts, multimask=multimask)
    assert logits.shape == (2, count, 64, 64)
    assert iou.shape == (2, count)
    assert torch.isfinite(logits).all() and torch.isfinite(iou).all()


def test_prompts_are_flipped_to_sam_xy_order(tiny, embeddings):
    """Array-order (i, j) prompts must reach SAM as (x, y) = (j, i); a transposed call would differ."""
    with torch.no_grad():
        ours, _ = tiny.decode(embeddings, Prompts(box=BOX.box, point_coords=POINTS.point_coords,
                                                  point_labels=POINTS.point_labels))  # fmt: skip
        points = (POINTS.point_coords.flip(-1), POINTS.point_labels)
        boxes = BOX.box[:, [1, 0, 3, 2]]
        sam, _ = decode_masks(tiny.prompt_encoder, tiny.mask_decoder, embeddings, boxes, points)
        transposed, _ = decode_masks(tiny.prompt_encoder, tiny.mask_decoder, embeddings, BOX.box,
                                     (POINTS.point_coords, POINTS.point_labels))  # fmt: skip
    assert sam.shape[-1] == 16  # SAM's low-resolution masks (4 x the 4 x 4 grid), upsampled to the input by decode
    upsample = lambda x: F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(ours, upsample(sam), atol=1e-4, rtol=1e-4)  # decode's inference path: float rounding
    assert not torch.allclose(ours, upsample(transposed), atol=1e-2)


def test_prev_mask_reaches_the_decoder(tiny, embeddings):
    """SAM's mask input is used: another previous mask changes the logits; probabilities are read as logits."""
    torch.manual_seed(3)
    mask = (torch.randn(2, 1, 64, 64) * 3).clamp(-8, 8)  # within the +-9.2 logits that probabilities are clamped to
    with torch.no_grad():
        a, _ = tiny.decode(embeddings, Prompts(box=BOX.box, prev_mask=mask))
        b, _ = tiny.decode(embeddings, Prompts(box=BOX.box, prev_mask=-mask))
        c, _ = tiny.decode(embeddings, Prompts(box=BOX.box, prev_mask=torch.sigmoid(mask)))
    assert not torch.allclose(a, b)
    assert torch.allclose(a, c, atol=1e-3)


def test_forward_is_decode_of_encode(tiny):
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        logits, iou = tiny(images, BOX, multimask=True)
        ref_logits, ref_iou = tiny.decode(tiny.encode(images), BOX, multimask=True)
    assert torch.equal(logits, ref_logits) and torch.equal(iou, ref_iou)


def test_bad_inputs_raise_medseg_errors(tiny, embeddings):
    with pytest.raises(InputShapeError, match="model-input"):
        tiny.encode(torch.rand(1, 1, 48, 48))
    with pytest.raises(InputShapeError, match="2-D prompts"):
        tiny.decode(embeddings, Prompts(box=[[0.0, 0, 0, 5, 5, 5], [0.0, 0, 0, 5, 5, 5]]))
    with pytest.raises(InputShapeError, match="prompt sets"):
        tiny.decode(embeddings, Prompts(box=[[0.0, 0, 5, 5]]))


def test_vit_backbone_gets_a_neck_onto_the_sam_grid():
    torch.manual_seed(0)
    model = build_promptable("dinov2_vits14_reg", pretrained=False, arch=TINY_DINO).eval()
    assert isinstance(model.neck, ProjectionNeck)
    assert model.prompt_encoder.image_embedding_size == (4, 4) and model.image_size == 56
    with torch.no_grad():
        embedding = model.encode(torch.rand(1, 1, 56, 56))
        logits, iou = model.decode(embedding, Prompts(box=[[3.0, 4.0, 30.0, 40.0]]), multimask=True)
    assert embedding.shape == (1, 256, 4, 4)
    assert logits.shape == (1, 3, 56, 56) and iou.shape == (1, 3)
    assert "neck" in model.encoder_modules()


def test_adapters_are_applied_to_the_backbone():
    model = build_promptable("sam_vit_b", pretrained=False, img_size=64, arch=TINY_SAM, adapter={"method": "lora"})
    assert model.adapter_names and all("lora" in name for name in model.adapter_names)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == model.adapter_names


@pytest.fixture(scope="module")
def checkpoint():
    return torch.load(locate_litemedsam_weights(), map_location="cpu", weights_only=True)


def _part(model, name):
    return {f"{name}.{k}": v for k, v in getattr(model, name).state_dict().items()}


def test_pretrained_litemedsam_prompt_modules_equal_the_checkpoint(checkpoint):
    model = build_promptable("litemedsam", pretrained=True)
    for name in ("prompt_encoder", "mask_decoder"):
        part = _part(model, name)
        expected = {k: v for k, v in checkpoint.items() if k.startswith(name + ".")}
        assert part.keys() == expected.keys() and len(part) > 5
        for key, value in part.items():
            assert torch.equal(value, expected[key]), key
    encoder = {f"image_encoder.{k}": v for k, v in model.backbone.image_encoder.state_dict().items()}
    assert all(torch.equal(v, checkpoint[k]) for k, v in encoder.items())


def test_scratch_litemedsam_differs_only_in_values(checkpoint):
    model = build_promptable("litemedsam", pretrained=False)
    for name in ("prompt_encoder", "mask_decoder"):
        part = _part(model, name)
        expected = {k: v for k, v in checkpoint.items() if k.startswith(name + ".")}
        assert {k: v.shape for k, v in part.items()} == {k: v.shape for k, v in expected.items()}
        weights = [k for k, v in part.items() if v.is_floating_point() and v.numel() > 1]
        assert all(not torch.equal(part[k], expected[k]) for k in weights if k.endswith("weight"))


def test_hydra_config_builds_the_model():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = str(Path(__file__).resolve().parents[2] / "conf")
    overrides = ["+backbone=sam_vit_b", "backbone.pretrained=false", "backbone.img_size=64"]
    arch = "+model.arch={depth:2,embed_dim:32,num_heads:2,global_attn_indexes:[1]}"
    with initialize_config_dir(config_dir=conf, version_base=None):
        cfg = compose(config_name=None, overrides=["+model=promptable_2d", *overrides, arch])
    model = instantiate(cfg.model, in_channels=1, num_classes=3)
    assert model.image_size == 64 and model.in_channels == 1 and model.neck is None
    with torch.no_grad():
        logits, iou = model(torch.rand(1, 1, 64, 64), Prompts(box=[[2.0, 3.0, 40.0, 50.0]]))
    assert logits.shape == (1, 1, 64, 64) and iou.shape == (1, 1)


def test_dense_pe_is_computed_once_and_renewed_when_its_matrix_changes(tiny):
    first = tiny.dense_pe()
    assert tiny.dense_pe() is first
    torch.testing.assert_close(first, tiny.prompt_encoder.get_dense_pe(), rtol=0, atol=0)
    matrix = tiny.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    saved = matrix.clone()
    try:
        with torch.no_grad():
            matrix.mul_(2.0)  # in place, as load_state_dict writes it
        renewed = tiny.dense_pe()
        assert renewed is not first
        torch.testing.assert_close(renewed, tiny.prompt_encoder.get_dense_pe(), rtol=0, atol=0)
    finally:
        with torch.no_grad():
            matrix.copy_(saved)
    with torch.inference_mode():  # made in inference mode: not the tensor handed to autograd outside it
        inference = tiny.dense_pe()
    assert tiny.dense_pe() is not inference


def _compiled_against_eager(prompts, backend):
    torch.manual_seed(0)
    eager = build_promptable("sam_vit_b", pretrained=False, img_size=64, arch=TINY_SAM).eval()
    compiled = build_promptable("sam_vit_b", pretrained=False, img_size=64, arch=TINY_SAM).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_decoder(backend=backend)
    assert compiled.compiled_mode == ("default" if backend == "inductor" else backend)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    embeddings = torch.randn(2, 256, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference, reference_iou = eager.decode(embeddings, prompts)
        logits, iou = compiled.decode(embeddings, prompts)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, reference_iou, atol=1e-4, rtol=1e-4)
    assert torch.equal(logits > 0, reference > 0)


@pytest.mark.parametrize("prompts", [BOX, POINTS, Prompts(box=BOX.box, prev_mask=torch.randn(2, 1, 64, 64))])
def test_traced_decoder_gives_the_eager_masks(prompts):
    """The compile path traced without code generation (seconds): same masks for boxes, points and mask inputs."""
    _compiled_against_eager(prompts, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("prompts", [BOX, POINTS])
def test_compiled_decoder_gives_the_eager_masks(prompts):
    """Inductor's generated code (20-70 s per prompt layout on a loaded two-core CPU)."""
    _compiled_against_eager(prompts, "inductor")
