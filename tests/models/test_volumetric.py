"""VolumetricPromptableSegmenter: shapes, 2-D behaviour kept at init, cross-slice mixing, prompts, a short fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from monai.losses import DiceLoss

from medseg.adapters.adapter3d import Adapter3d
from medseg.backbones import create_backbone
from medseg.errors import ConfigError, InputShapeError
from medseg.models.volumetric import VolumetricPromptableSegmenter, build_volumetric_promptable
from medseg.prompts.contract import Prompts

CONF = Path(__file__).resolve().parents[2] / "conf"
TINY = {  # two blocks of width 32: (arch, roi [X, Y, Z]) with the in-plane roi a multiple of the patch
    "sam_vit_b": ({"depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}, [32, 32, 8]),
    "dinov2_vits14": ({"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 56}, [28, 28, 8]),
    "mae_vit_base": ({"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}, [32, 32, 8]),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(backbone: str = "sam_vit_b", seed: int = 0, **kwargs) -> VolumetricPromptableSegmenter:
    arch, roi = TINY[backbone]
    kwargs = {"roi_size": roi, "decoder_dim": 32, "num_heads": 2, "layers": [0], **kwargs}
    torch.manual_seed(seed)
    return build_volumetric_promptable(backbone, pretrained=False, arch=arch, **kwargs).eval()


def volume(shape, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


POINTS = Prompts(point_coords=[[[3.0, 4.0, 5.0], [20.0, 9.0, 1.0]], [[10.0, 11.0, 2.0], [0.0, 0.0, 0.0]]],
                 point_labels=[[1, 0], [1, -1]])  # fmt: skip
BOX = Prompts(box=[[0.0, 2.0, 1.0, 12.0, 15.0, 6.0], [5.0, 5.0, 0.0, 20.0, 25.0, 7.0]])


@pytest.mark.parametrize("backbone", sorted(TINY))
def test_shapes_and_forward_is_decode_of_encode(backbone):
    model = tiny(backbone)
    roi = TINY[backbone][1]
    x = volume((2, 1, *roi))
    prompts = Prompts(point_coords=POINTS.point_coords, point_labels=POINTS.point_labels, box=BOX.box)
    with torch.no_grad():
        embeddings = model.encode(x)
        logits, iou = model.decode(embeddings, prompts)
        again, iou_again = model(x, prompts, multimask=True)  # one mask either way
    grid = [r // model.backbone.patch_size for r in roi[:2]] + [roi[2]]
    assert [tuple(level.shape[2:]) for level in embeddings.levels] == [tuple(grid)] * 2
    assert logits.shape == (2, 1, *roi) and iou.shape == (2, 1)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, again, atol=1e-5) and torch.allclose(iou, iou_again, atol=1e-5)
    assert model.spatial_dims == 3 and model.in_channels == 1 and model.roi_size == tuple(roi)
    assert set(model.encoder_modules()) == {"backbone", "depth_embedding"}


@pytest.mark.parametrize("backbone", ["sam_vit_b", "dinov2_vits14"])
def test_at_init_every_slice_gets_the_2d_backbone_features(backbone):
    """Zero depth embedding and zero-initialised adapter3d: the pretrained 2-D behaviour is unchanged."""
    model = tiny(backbone)
    assert any(isinstance(m, Adapter3d) for m in model.backbone.modules())  # adapter3d is the default
    arch, roi = TINY[backbone]
    torch.manual_seed(0)  # the builder's first draw: the same backbone weights, without adapters
    plain = create_backbone(backbone, pretrained=False, arch=arch, img_size=roi[0]).eval()
    x = volume((2, 1, *roi))
    with torch.no_grad():
        levels = model.encode(x).levels
        slices = x.permute(0, 4, 1, 2, 3).reshape(-1, 1, *roi[:2])  # (B * Z, 1, X, Y), volume-major
        reference = plain(plain.normalise(slices), layers=[0])
    for level, expected in zip(levels, [*reference.intermediates, reference.features]):
        per_slice = level.permute(0, 4, 1, 2, 3).reshape(expected.shape)
        assert torch.allclose(per_slice, expected, atol=1e-5)


def _perturb_adapters(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.backbone.modules():
        if isinstance(module, Adapter3d):
            with torch.no_grad():
                module.up.weight.copy_(torch.randn(module.up.weight.shape, generator=generator))


def _slice_features(model, x):
    with torch.no_grad():
        return model.encode(x).levels[-1]  # (B, c, h, w, Z)


def test_adapter3d_mixes_neighbouring_slices_only_after_training():
    """Changing slice 3 changes slice 4 (kernel 3, two blocks: +-2 slices reach), never slice 7; nothing without it."""
    x = volume((1, 1, 32, 32, 8))
    y = x.clone()
    y[..., 3] = volume((1, 1, 32, 32), seed=5)
    for adapter, mixes in [(None, False), ("default", False), ("perturbed", True)]:
        model = tiny(adapter=None) if adapter is None else tiny()
        if adapter == "perturbed":
            _perturb_adapters(model)
        a, b = _slice_features(model, x), _slice_features(model, y)
        assert not torch.allclose(a[..., 3], b[..., 3])
        assert torch.allclose(a[..., 7], b[..., 7], atol=1e-6)
        assert torch.allclose(a[..., 4], b[..., 4], atol=1e-6) != mixes, adapter


def test_depth_embedding_tells_identical_slices_apart():
    model = tiny(adapter=None)
    x = volume((1, 1, 32, 32, 1)).expand(-1, -1, -1, -1, 8).contiguous()  # eight identical slices
    before = _slice_features(model, x)
    assert torch.allclose(before[..., 0], before[..., 5], atol=1e-6)
    assert model.depth_embedding.embedding.requires_grad
    with torch.no_grad():
        model.depth_embedding.embedding.normal_(generator=torch.Generator().manual_seed(0))
    after = _slice_features(model, x)
    assert not torch.allclose(after[..., 0], after[..., 5], atol=1e-3)
    with torch.no_grad():  # outside encode the hook is inactive: the backbone is the plain 2-D model again
        plain = model.backbone(model.backbone.normalise(x[..., 0])).features
    assert torch.allclose(plain, before[..., 0], atol=1e-5)


@pytest.fixture(scope="module")
def encoded():
    model = tiny()
    with torch.no_grad():
        return model, model.encode(volume((1, 1, 32, 32, 8)))


def _logits(encoded, prompts):
    model, embeddings = encoded
    with torch.no_grad():
        return model.decode(embeddings.expand(prompts.batch_size), prompts)[0]


def test_moving_a_point_changes_the_mask_and_padding_does_not(encoded):
    base = _logits(encoded, Prompts(point_coords=[[[8.0, 9.0, 3.0], [1.0, 2.0, 3.0]]], point_labels=[[1, -1]]))
    padding_moved = _logits(
        encoded, Prompts(point_coords=[[[8.0, 9.0, 3.0], [30.0, 0.0, 7.0]]], point_labels=[[1, -1]])
    )
    point_moved = _logits(encoded, Prompts(point_coords=[[[20.0, 9.0, 3.0], [1.0, 2.0, 3.0]]], point_labels=[[1, -1]]))
    slice_moved = _logits(encoded, Prompts(point_coords=[[[8.0, 9.0, 6.0], [1.0, 2.0, 3.0]]], point_labels=[[1, -1]]))
    negative = _logits(encoded, Prompts(point_coords=[[[8.0, 9.0, 3.0], [1.0, 2.0, 3.0]]], point_labels=[[0, -1]]))
    assert torch.equal(base, padding_moved)
    for other in (point_moved, slice_moved, negative):
        assert (base - other).abs().max() > 1e-4


def test_box_and_previous_mask_reach_the_decoder(encoded):
    box = _logits(encoded, Prompts(box=[[2.0, 3.0, 1.0, 12.0, 14.0, 5.0]]))
    other_box = _logits(encoded, Prompts(box=[[2.0, 3.0, 1.0, 25.0, 14.0, 5.0]]))
    assert (box - other_box).abs().max() > 1e-4
    mask = (torch.randn(1, 1, 32, 32, 8, generator=torch.Generator().manual_seed(2)) * 3).clamp(-8, 8)
    with_mask = _logits(encoded, Prompts(box=[[2.0, 3.0, 1.0, 12.0, 14.0, 5.0]], prev_mask=mask))
    flipped = _logits(encoded, Prompts(box=[[2.0, 3.0, 1.0, 12.0, 14.0, 5.0]], prev_mask=-mask))
    as_probabilities = _logits(encoded, Prompts(box=[[2.0, 3.0, 1.0, 12.0, 14.0, 5.0]], prev_mask=mask.sigmoid()))
    assert (with_mask - box).abs().max() > 1e-4 and (with_mask - flipped).abs().max() > 1e-4
    assert torch.allclose(with_mask, as_probabilities, atol=1e-3)


def test_bad_inputs_raise_medseg_errors(encoded):
    model, embeddings = encoded
    with pytest.raises(InputShapeError, match="3-D prompts"):
        model.decode(embeddings, Prompts(box=[[0.0, 0.0, 5.0, 5.0]]))
    with pytest.raises(InputShapeError, match="prompt sets"):
        model.decode(embeddings, BOX)
    with pytest.raises(InputShapeError, match="multiples of 16"):
        model.encode(torch.rand(1, 1, 24, 32, 8))
    with pytest.raises(InputShapeError, match="prev_mask"):
        model.decode(embeddings, Prompts(box=[[0.0, 0, 0, 5, 5, 5]], prev_mask=torch.zeros(1, 1, 16, 16, 8)))
    with pytest.raises(ConfigError, match="plain ViT"):
        build_volumetric_promptable("litemedsam", pretrained=False)
    with pytest.raises(ConfigError, match="multiples of"):
        tiny(roi_size=[30, 32, 8])


def test_overfits_one_volume_and_follows_the_prompt():
    """Two identical spheres in one volume: a click on either must segment that sphere (Dice > 0.8 after 40 steps)."""
    model = tiny(roi_size=[32, 32, 8]).train()
    grid = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), torch.arange(8.0), indexing="ij")
    centres = [(9.0, 10.0, 4.0), (22.0, 21.0, 3.0)]
    spheres = [
        ((grid[0] - i) ** 2 + (grid[1] - j) ** 2 + (2 * (grid[2] - k)) ** 2 <= 36).float() for i, j, k in centres
    ]
    noise = 0.05 * torch.randn(32, 32, 8, generator=torch.Generator().manual_seed(0))
    image = (0.3 + 0.4 * (spheres[0] + spheres[1]) + noise)[None, None]
    labels = torch.stack(spheres)[:, None]
    prompts = Prompts(point_coords=[[list(c)] for c in centres], point_labels=[[1], [1]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    dice_loss = DiceLoss(sigmoid=True)
    for _ in range(40):
        logits, _ = model.decode(model.encode(image).expand(2), prompts)
        loss = dice_loss(logits, labels) + F.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        masks = (model.decode(model.encode(image).expand(2), prompts)[0] > 0).float()
    dice = 2 * (masks * labels).sum((1, 2, 3, 4)) / (masks.sum((1, 2, 3, 4)) + labels.sum((1, 2, 3, 4)))
    assert (dice > 0.8).all(), dice


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


TINY_OVERRIDES = [
    "model=promptable_3d",
    "backbone=sam_vit_b",
    "init=scratch",
    "data/sampling=patches_3d",
    "data.sampling.patch_size=[32,32,8]",
    "+model.arch={depth:2,embed_dim:32,num_heads:2,global_attn_indexes:[1]}",
    "model.decoder_dim=32",
    "model.num_heads=2",
]


def test_config_composes_and_instantiates_with_adapter3d_by_default():
    cfg = _compose(TINY_OVERRIDES)
    assert cfg.hydra.runtime.choices.adapter == "adapter3d"
    model = instantiate(cfg.model, in_channels=1, num_classes=3)
    assert isinstance(model, VolumetricPromptableSegmenter) and model.roi_size == (32, 32, 8)
    assert model.adapter_names and all(".adapter3d." in name for name in model.adapter_names)
    with torch.no_grad():
        logits, iou = model(torch.rand(1, 1, 32, 32, 8), Prompts(point_coords=[[[5.0, 6.0, 2.0]]], point_labels=[[1]]))
    assert logits.shape == (1, 1, 32, 32, 8) and iou.shape == (1, 1)


def test_config_adapter_choice_on_the_command_line_wins():
    cfg = _compose([*TINY_OVERRIDES, "adapter=lora"])
    assert cfg.hydra.runtime.choices.adapter == "lora" and cfg.model.adapter.method == "lora"


def test_slice_axis_picks_the_axis_the_vit_slices_along():
    """slice_axis=0 on a (B, C, Z, X, Y) volume gives the features of slice_axis=2 on (B, C, X, Y, Z), moved."""
    x = volume((1, 1, 32, 32, 8))
    axial = tiny(slice_axis=2)
    first = tiny(slice_axis=0, roi_size=[8, 32, 32])
    moved = x.permute(0, 1, 4, 2, 3)
    assert torch.allclose(_slice_features(first, moved), _slice_features(axial, x).permute(0, 1, 4, 2, 3), atol=1e-5)
    with torch.no_grad():
        logits, _ = first(
            moved, Prompts(box=[[1.0, 2.0, 3.0, 6.0, 20.0, 25.0]], prev_mask=torch.zeros(1, 1, 8, 32, 32))
        )
    assert logits.shape == (1, 1, 8, 32, 32)
