"""SAM ViT encoders: official hyperparameters, strict loading of the full-SAM layout, parity with segment_anything."""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from medseg.backbones import create_backbone
from medseg.backbones.sam import SAM_ARCHS, build_sam_components, decode_masks

# A tiny SAM: 2 blocks of width 64, the second one global, built for 128 x 128 inputs (8 x 8 tokens).
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "global_attn_indexes": (1,)}
TINY_SIZE = 128


def reference_sam(img_size: int = TINY_SIZE) -> Sam:
    """segment_anything's own SAM with the tiny encoder, assembled as in its build_sam._build_sam."""
    grid = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=TINY["depth"],
            embed_dim=TINY["embed_dim"],
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=TINY["num_heads"],
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=TINY["global_attn_indexes"],
            window_size=14,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    torch.manual_seed(0)
    with torch.no_grad():  # SAM zero-initialises pos_embed and rel_pos: perturb everything so they matter
        for param in sam.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return sam.eval()


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    """(reference SAM, path of its state dict saved in the official full-SAM layout)."""
    sam = reference_sam()
    path = tmp_path_factory.mktemp("weights") / "sam_vit_b_01ec64.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


def tiny_backbone(checkpoint=None, **kwargs):
    kwargs.setdefault("img_size", TINY_SIZE)
    return create_backbone("sam_vit_b", pretrained=checkpoint is not None, checkpoint=checkpoint, arch=TINY, **kwargs)


def test_sam_vit_b_has_the_official_parameter_count():
    model = create_backbone("sam_vit_b", pretrained=False)
    assert sum(p.numel() for p in model.image_encoder.parameters()) == 89_670_912
    assert model.input_spec.image_size == 1024
    assert model.block_dim == 768 and model.num_blocks == 12 and model.embed_dim == 256


def test_registered_sizes_use_build_sam_hyperparameters(monkeypatch):
    build_sam = importlib.import_module("segment_anything.build_sam")  # the package re-exports a function of that name
    captured = {}
    monkeypatch.setattr(build_sam, "_build_sam", lambda **kw: kw)
    for name, builder in [
        ("sam_vit_b", "build_sam_vit_b"),
        ("sam_vit_l", "build_sam_vit_l"),
        ("sam_vit_h", "build_sam"),
    ]:
        captured[name] = getattr(build_sam, builder)()
    for name, official in captured.items():
        ours = SAM_ARCHS[name]
        assert ours["embed_dim"] == official["encoder_embed_dim"], name
        assert ours["depth"] == official["encoder_depth"], name
        assert ours["num_heads"] == official["encoder_num_heads"], name
        assert list(ours["global_attn_indexes"]) == list(official["encoder_global_attn_indexes"]), name


def test_features_match_segment_anything_after_loading_full_sam_checkpoint(tiny_sam):
    sam, path = tiny_sam
    model = tiny_backbone(path).eval()
    x = torch.rand(2, 1, TINY_SIZE, TINY_SIZE) * 255  # a grey image in SAM's 0-255 range
    with torch.no_grad():
        ours = model(x, layers=(0, -1))
        reference = sam.image_encoder(sam.preprocess(x.repeat(1, 3, 1, 1)))  # SAM's own per-channel statistics
    assert ours.features.shape == (2, 256, 8, 8)
    assert (ours.features - reference).abs().max().item() <= 1e-5
    assert [tuple(t.shape) for t in ours.intermediates] == [(2, 64, 8, 8)] * 2
    assert ours.cls_token is None


def test_components_load_strictly_and_decode_like_sam(tiny_sam):
    sam, path = tiny_sam
    components = build_sam_components("sam_vit_b", checkpoint=path, img_size=TINY_SIZE, arch=TINY)
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        reference = getattr(sam, part).state_dict()
        loaded = getattr(components, part).state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference), part

    # An RGB image in [0, 1]: Backbone.normalise must reproduce SAM's own preprocessing (0-255, per-channel stats).
    image = torch.rand(2, 3, TINY_SIZE, TINY_SIZE)
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0], [30.0, 5.0, 120.0, 64.0]])
    backbone = tiny_backbone(path, in_channels=3).eval()
    with torch.no_grad():
        features = backbone(backbone.normalise(image)).features
        ours, iou = decode_masks(components.prompt_encoder, components.mask_decoder, features, boxes=boxes)
        batched = [
            {
                "image": image[b] * 255,
                "original_size": (TINY_SIZE, TINY_SIZE),
                "boxes": boxes[b : b + 1],
            }
            for b in range(2)
        ]
        reference = sam(batched, multimask_output=False)
    expected = torch.cat([r["low_res_logits"] for r in reference])
    assert ours.shape == expected.shape == (2, 1, 32, 32)
    assert (ours - expected).abs().max().item() <= 1e-4
    assert iou.shape == (2, 1)


def test_other_input_sizes_interpolate_position_embeddings(tiny_sam):
    _, path = tiny_sam
    native = tiny_backbone(path).eval()  # built for 128, run at 256: resized on the fly
    built_for_256 = tiny_backbone(path, img_size=256).eval()  # checkpoint resized at load time
    assert built_for_256.image_encoder.pos_embed.shape == (1, 16, 16, 64)
    assert built_for_256.image_encoder.blocks[1].attn.rel_pos_h.shape == (31, 32)
    assert built_for_256.image_encoder.blocks[0].attn.rel_pos_h.shape == (27, 32)  # windowed: size-independent
    x = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        a, b = native(x, layers=(-1,)), built_for_256(x, layers=(-1,))
        odd = native(torch.randn(1, 1, 96, 160))
    assert a.features.shape == (1, 256, 16, 16) and a.intermediates[0].shape == (1, 64, 16, 16)
    assert (a.features - b.features).abs().max().item() <= 1e-5
    assert odd.features.shape == (1, 256, 6, 10)
    with pytest.raises(ValueError, match="multiples of 16"):
        native(torch.randn(1, 1, 100, 100))


def test_scratch_twin_has_same_parameters_with_other_values(tiny_sam):
    _, path = tiny_sam
    pretrained = dict(tiny_backbone(path).named_parameters())
    scratch = dict(tiny_backbone(None).named_parameters())
    assert pretrained.keys() == scratch.keys()
    assert all(pretrained[k].shape == scratch[k].shape for k in pretrained)
    assert not torch.equal(
        pretrained["image_encoder.patch_embed.proj.weight"], scratch["image_encoder.patch_embed.proj.weight"]
    )
    assert sum(not torch.equal(pretrained[k], scratch[k]) for k in pretrained) == len(pretrained)


def test_layers_index_blocks_from_either_end(tiny_sam):
    _, path = tiny_sam
    model = tiny_backbone(path).eval()
    x = torch.randn(1, 1, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        out = model(x, layers=(-1, 0, 1))
    assert torch.equal(out.intermediates[0], out.intermediates[2])
    assert not torch.equal(out.intermediates[0], out.intermediates[1])
    with pytest.raises(IndexError):
        model(x, layers=(2,))


def test_arch_overrides_are_checked():
    with pytest.raises(TypeError, match="unknown SAM architecture overrides"):
        create_backbone("sam_vit_b", pretrained=False, arch={"depht": 2})
