"""SAM 2 / MedSAM2: official configs, strict loading of the official file layout, parity with the ``sam2`` package.

The reference is ``sam2``'s own ``build_sam2`` (its Hydra configs composed through its own config module) and its
``SAM2ImagePredictor``; the official-layout file is that model's ``{"model": state_dict}``, as in
``sam2.1_hiera_tiny.pt``, with every parameter perturbed so that zero-initialised ones (position embeddings,
``no_mem_embed``) matter. The real Hiera-T config is used throughout, at 128 px, which keeps the whole file quick.
"""

from __future__ import annotations

import importlib.resources
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from medseg.backbones import create_backbone, list_backbones
from medseg.backbones.registry import get_entry
from medseg.backbones.sam2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Sam2Backbone,
    build_sam2_components,
    decode_sam2_masks,
    prepare_image_features,
)
from medseg.backbones.sam2_configs import MISSING_EXTRA, SAM2_MODELS, require_sam2, sam2_model_config
from medseg.config import CONFIG_DIR
from medseg.errors import ConfigError, InputShapeError, WeightsError

SIZE = 128
ATOL = 1e-4
NAMES = ["medsam2", "sam2_hiera_b+", "sam2_hiera_b_plus", "sam2_hiera_l", "sam2_hiera_s", "sam2_hiera_t"]


def sam2_available() -> bool:
    try:
        require_sam2()  # imports sam2 without leaving its Hydra initialisation behind
    except ConfigError:
        return False
    return True


needs_sam2 = pytest.mark.skipif(not sam2_available(), reason=MISSING_EXTRA)


def reference_sam2(config: str = "configs/sam2.1/sam2.1_hiera_t.yaml", size: int = SIZE):
    """``sam2.build_sam.build_sam2`` at ``size`` px, composed by Hydra from sam2's own config module."""
    from sam2.build_sam import build_sam2

    overrides = [f"++model.image_size={size}"] + [
        f"++model.memory_attention.layer.{part}.feat_sizes=[{size // 16},{size // 16}]"
        for part in ("self_attention", "cross_attention")
    ]
    GlobalHydra.instance().clear()
    with initialize_config_module("sam2", version_base="1.2"):
        model = build_sam2(config, None, device="cpu", mode="eval", hydra_overrides_extra=overrides)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(reference SAM2Base, path of its weights in the official layout, named as the official Hiera-T file)."""
    if not sam2_available():
        pytest.skip(MISSING_EXTRA)
    model = reference_sam2()
    path = tmp_path_factory.mktemp("weights") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return model, path


@pytest.fixture(scope="module")
def components(official):
    """medseg's SAM 2 components loaded from the official-layout file, in evaluation mode."""
    loaded = build_sam2_components("sam2_hiera_t", checkpoint=official[1], img_size=SIZE)
    loaded.model.eval()
    return loaded


def standardise(x: torch.Tensor) -> torch.Tensor:
    """SAM 2's own preprocessing of an RGB image in [0, 1] (sam2/utils/transforms.py)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_registry_lists_every_sam2_model_with_its_official_file():
    assert list_backbones("sam2") == NAMES
    assert get_entry("sam2_hiera_t").filename == "sam2.1_hiera_tiny.pt"
    assert get_entry("sam2_hiera_b+").builder is get_entry("sam2_hiera_b_plus").builder
    assert get_entry("medsam2").filename == "MedSAM2_latest.pt" and "wanglab/MedSAM2" in get_entry("medsam2").url


@needs_sam2
@pytest.mark.parametrize("name", sorted(SAM2_MODELS))
def test_configs_are_sam2s_own_with_the_input_size_set(name):
    cfg = sam2_model_config(name)
    official = OmegaConf.load(importlib.resources.files("sam2").joinpath(SAM2_MODELS[name].config)).model
    size = 512 if name == "medsam2" else 1024
    assert cfg.image_size == size
    assert cfg.memory_attention.layer.self_attention.feat_sizes == [size // 16] * 2  # MedSAM2's t512: [32, 32]
    assert cfg.image_encoder == official.image_encoder and cfg.memory_encoder == official.memory_encoder
    if name == "medsam2":
        assert cfg.image_encoder == sam2_model_config("sam2_hiera_t").image_encoder


@needs_sam2
def test_stage_layout_of_every_size():
    layouts = {  # blocks per stage and first width, from the sam2.1 configs (B+ uses Hiera's defaults)
        "sam2_hiera_t": ([1, 2, 7, 2], 96),
        "sam2_hiera_s": ([1, 2, 11, 2], 96),
        "sam2_hiera_b_plus": ([2, 3, 16, 3], 112),
        "sam2_hiera_l": ([2, 6, 36, 4], 144),
    }
    for name, (stages, width) in layouts.items():
        # a 1-block-per-stage twin of the same widths keeps this quick; the full depth is checked on Hiera-T below
        model = create_backbone(name, pretrained=False, arch={"stages": [1, 1, 1, 1], "global_att_blocks": [2]})
        assert model.block_dims == [width, 2 * width, 4 * width, 8 * width], name
        assert model.block_strides == [4, 8, 16, 32] and model.patch_size == 16 and model.embed_dim == 256, name
        assert sam2_model_config(name).image_encoder.trunk.get("stages", [2, 3, 16, 3]) == stages, name


def test_hiera_t_matches_the_reference_image_encoder(official):
    reference, _ = official
    model = create_backbone("sam2_hiera_t", pretrained=False)
    shapes = {k: v.shape for k, v in model.image_encoder.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.image_encoder.state_dict().items()}
    assert sum(p.numel() for p in model.image_encoder.parameters()) == 27_219_136
    assert model.num_blocks == 12 and model.stage_ends == [0, 2, 9, 11] and model.input_spec.image_size == 1024
    assert model.input_spec.mean == IMAGENET_MEAN and model.input_spec.value_range == (0.0, 1.0)


def test_features_match_sam2_image_encoder_after_loading_the_official_file(official):
    reference, path = official
    model = create_backbone("sam2_hiera_t", checkpoint=path, img_size=SIZE).eval()
    grey = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        ours = model(grey, layers=model.stage_ends)
        rgb = standardise(grey.repeat(1, 3, 1, 1))  # a grey image seen as RGB, as SAM2Transforms sees it
        expected = reference.image_encoder(rgb)
        stages = reference.image_encoder.trunk(rgb)
        encoded = model.encode(grey)
    assert ours.features.shape == (2, 256, SIZE // 16, SIZE // 16)
    assert max_diff(ours.features, expected["vision_features"]) <= ATOL
    assert len(ours.intermediates) == 4 and ours.cls_token is None
    for got, want in zip(ours.intermediates, stages, strict=True):
        assert max_diff(got, want) <= ATOL
    for key in ("backbone_fpn", "vision_pos_enc"):
        for got, want in zip(encoded[key], expected[key], strict=True):
            assert max_diff(got, want) <= ATOL


@pytest.mark.parametrize("multimask", [True, False])
def test_components_load_strictly_and_decode_like_sam2_image_predictor(official, components, multimask):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    reference, _ = official
    expected_state = reference.state_dict()
    loaded = components.model.state_dict()
    assert loaded.keys() == expected_state.keys()
    assert all(torch.equal(loaded[k], expected_state[k]) for k in expected_state)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    box = np.array([20.0, 30.0, 90.0, 100.0])
    clicks, labels = np.array([[50.0, 60.0], [80.0, 40.0]]), np.array([1, 0])
    predictor = SAM2ImagePredictor(reference)
    predictor._bb_feat_sizes = [(SIZE // 4,) * 2, (SIZE // 8,) * 2, (SIZE // 16,) * 2]  # hard-coded for 1024 px
    with torch.no_grad():
        predictor.set_image(image)
        _, iou, low_res = predictor.predict(
            point_coords=clicks, point_labels=labels, box=box, multimask_output=multimask, return_logits=True
        )
        backbone = Sam2Backbone(components.image_encoder, image_size=SIZE, in_channels=3).eval()
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
        features = prepare_image_features(components.model, backbone.encode(x))
        ours = decode_sam2_masks(
            components.prompt_encoder,
            components.mask_decoder,
            features,
            boxes=torch.tensor(box, dtype=torch.float32)[None],
            points=(torch.tensor(clicks, dtype=torch.float32)[None], torch.tensor(labels)[None]),
            multimask_output=multimask,
        )
    assert ours.logits.shape == (1, 3 if multimask else 1, SIZE // 4, SIZE // 4)
    assert max_diff(ours.logits.clamp(-32, 32)[0], torch.from_numpy(low_res)) <= ATOL  # the predictor clamps
    assert max_diff(ours.iou[0], torch.from_numpy(iou)) <= ATOL
    assert ours.object_score_logits.shape == (1, 1) and ours.tokens.shape[-1] == 256


def test_decoder_batch_keeps_each_prompt_with_its_image(components):
    backbone = Sam2Backbone(components.image_encoder, image_size=SIZE).eval()
    images = torch.rand(2, 1, SIZE, SIZE)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 70.0], [40.0, 30.0, 120.0, 100.0]])
    with torch.no_grad():
        both = decode_sam2_masks(
            components.prompt_encoder, components.mask_decoder,
            prepare_image_features(components.model, backbone.encode(images)), boxes=boxes,
        )  # fmt: skip
        for b in range(2):
            one = decode_sam2_masks(
                components.prompt_encoder, components.mask_decoder,
                prepare_image_features(components.model, backbone.encode(images[b : b + 1])), boxes=boxes[b : b + 1],
            )  # fmt: skip
            assert max_diff(both.logits[b : b + 1], one.logits) <= ATOL


def test_missing_and_unexpected_keys_are_refused_with_the_file_named(official, tmp_path):
    reference, path = official
    state = reference.state_dict()
    missing = tmp_path / "missing.pt"
    torch.save({"model": {k: v for k, v in state.items() if k != "image_encoder.trunk.pos_embed"}}, missing)
    with pytest.raises(WeightsError, match=r"sam2\.1_hiera_tiny\.pt.*Missing 1 keys: trunk\.pos_embed\."):
        create_backbone("sam2_hiera_t", checkpoint=missing)
    with pytest.raises(WeightsError, match=r"Missing 1 keys: image_encoder\.trunk\.pos_embed"):
        build_sam2_components("sam2_hiera_t", checkpoint=missing, img_size=SIZE)

    unexpected = tmp_path / "unexpected.pt"
    torch.save({"model": {**state, "memory_attention.extra": torch.zeros(1)}}, unexpected)
    with pytest.raises(WeightsError, match=r"Unexpected 1 keys: memory_attention\.extra"):
        build_sam2_components("sam2_hiera_t", checkpoint=unexpected, img_size=SIZE)
    # the dense backbone reads only the image encoder's part of the file, strictly
    create_backbone("sam2_hiera_t", checkpoint=unexpected)
    extra_encoder_key = tmp_path / "extra_encoder_key.pt"
    torch.save({"model": {**state, "image_encoder.trunk.extra": torch.zeros(1)}}, extra_encoder_key)
    with pytest.raises(WeightsError, match=r"Unexpected 1 keys: trunk\.extra"):
        create_backbone("sam2_hiera_t", checkpoint=extra_encoder_key)

    wrong_size = r"sam2\.1_hiera_small\.pt.*Missing 50 keys: trunk\.blocks\.12\..*Shape mismatches"
    with pytest.raises(WeightsError, match=wrong_size):
        create_backbone("sam2_hiera_s", checkpoint=path)  # a Hiera-T file given to Hiera-S
    with pytest.raises(WeightsError, match=r"sam2\.1_hiera_small\.pt"):
        create_backbone("sam2_hiera_s", checkpoint=tmp_path / "absent.pt")


def test_scratch_twin_has_the_same_parameters_with_other_values(official):
    _, path = official
    pretrained = create_backbone("sam2_hiera_t", checkpoint=path, img_size=SIZE).eval()
    scratch = create_backbone("sam2_hiera_t", pretrained=False, img_size=SIZE).eval()
    a, b = pretrained.state_dict(), scratch.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    weights = [k for k in a if k.endswith("weight")]
    assert all(not torch.equal(a[k], b[k]) for k in weights)
    x = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        assert max_diff(pretrained(x).features, scratch(x).features) > 1e-2


def test_other_sizes_are_padded_and_outputs_cropped(official):
    _, path = official
    model = create_backbone("sam2_hiera_t", checkpoint=path, img_size=SIZE).eval()
    x = torch.rand(1, 1, 100, 70)
    padded = torch.zeros(1, 3, 128, 96)
    padded[..., :100, :70] = model.standardise(x.repeat(1, 3, 1, 1))
    with torch.no_grad():
        out = model(x, layers=(0, -1))
        full = model.forward_features(padded, layers=(0, -1))
    assert out.features.shape == (1, 256, 7, 5)
    assert [tuple(t.shape) for t in out.intermediates] == [(1, 96, 25, 18), (1, 768, 4, 3)]
    assert torch.equal(out.features, full.features[..., :7, :5])
    with pytest.raises(InputShapeError, match="multiples of 32"):
        model.encode(x)


def test_img_size_builds_the_prompt_path_for_that_size():
    with pytest.raises(ConfigError, match="multiple of 32"):
        create_backbone("sam2_hiera_t", pretrained=False, img_size=100)
    components = build_sam2_components("medsam2", pretrained=False)
    assert components.model.image_size == 512 and components.prompt_encoder.image_embedding_size == (32, 32)
    with pytest.raises(ConfigError, match="not SAM 2"):
        build_sam2_components("sam_vit_b", pretrained=False)
    with pytest.raises(ConfigError, match="unknown SAM 2 architecture overrides"):
        create_backbone("sam2_hiera_t", pretrained=False, arch={"depth": 2})


def test_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "sam2", None)  # as if the sam2 extra were not installed
    with pytest.raises(ConfigError) as err:
        create_backbone("sam2_hiera_t", pretrained=False)
    assert str(err.value) == MISSING_EXTRA and "\n" not in MISSING_EXTRA
    assert MISSING_EXTRA.startswith("SAM 2 backbones need the sam2 extra: ")


@needs_sam2
def test_importing_sam2_leaves_hydra_as_it_was(monkeypatch):
    """sam2's __init__ initialises Hydra; medseg must still be able to compose its own configs afterwards."""
    for key in [k for k in sys.modules if k == "sam2" or k.startswith("sam2.")]:
        monkeypatch.delitem(sys.modules, key)  # restored afterwards
    GlobalHydra.instance().clear()
    require_sam2()
    assert "sam2" in sys.modules and not GlobalHydra.instance().is_initialized()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for key in [k for k in sys.modules if k == "sam2" or k.startswith("sam2.")]:
            del sys.modules[key]
        require_sam2()  # already initialised by medseg: left as it is
        assert GlobalHydra.instance().is_initialized()
        cfg = compose("train", overrides=["backbone=sam2_hiera_t"])
    assert cfg.backbone.name == "sam2_hiera_t"


@needs_sam2
@pytest.mark.parametrize(("model", "name"), [("vit_unetr", "sam2_hiera_t"), ("vit_linear", "medsam2")])
def test_train_config_builds_a_dense_model(model, name):
    """``medseg train backbone=... model=vit_unetr|vit_linear init=scratch`` builds and predicts."""
    from medseg.config import instantiate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"backbone={name}", f"model={model}", "init=scratch", "adapter=lora"])
    assert cfg.model.backbone == name and cfg.model.img_size == (512 if name == "medsam2" else 1024)
    tiny = {"embed_dim": 16, "stages": [1, 1, 2, 1], "global_att_blocks": [3]}
    net = instantiate(cfg.model, num_classes=3, in_channels=1, img_size=64, arch=tiny)
    with torch.no_grad():
        logits = net(torch.rand(2, 1, 48, 40))
    assert logits.shape == (2, 3, 48, 40)
    if model == "vit_unetr":
        assert net.decoder.layers == (0, 1, 3)  # the ends of the first three Hiera stages
