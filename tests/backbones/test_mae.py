"""MAE: official key layout and numerics, decoder keys dropped, position-embedding resampling, configs and errors.

The MAE repository's encoder is timm-0.3.2's ``VisionTransformer`` (``models_vit.py`` subclasses it; the pretraining
model reuses its ``PatchEmbed`` and ``Block``), and current timm's ``VisionTransformer`` class has the same module
names and forward. So the reference is that class built directly with MAE's hyperparameters, and a random state dict
saved from it, plus the decoder entries of ``models_mae.MaskedAutoencoderViT``, is a checkpoint in the official
layout. At other input sizes the reference is what MAE fine-tuning does: build the model for the new size and resample
the checkpoint with ``util/pos_embed.interpolate_pos_embed`` (re-implemented below).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from medseg.backbones import create_backbone, list_backbones
from medseg.errors import WeightsError

CONF = Path(__file__).resolve().parents[2] / "conf" / "backbone"
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 4}
NATIVE = {"mae_vit_base": (16, 64), "mae_vit_huge": (14, 56)}  # name -> (patch px, tiny native side px): 4 x 4 grid
ATOL = 1e-5


def reference_encoder(patch: int, img_size: int | tuple[int, int]) -> VisionTransformer:
    """The MAE encoder as ``models_vit.VisionTransformer(global_pool=False)`` builds it, tiny."""
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch,
        embed_dim=TINY["embed_dim"],
        depth=TINY["depth"],
        num_heads=TINY["num_heads"],
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=0,
        global_pool="",
    ).eval()


def decoder_state(patch: int, grid: int, dim: int = 32) -> dict[str, torch.Tensor]:
    """The reconstruction-decoder entries of ``MaskedAutoencoderViT.state_dict()`` (random values)."""
    state = {
        "mask_token": torch.randn(1, 1, dim),
        "decoder_embed.weight": torch.randn(dim, TINY["embed_dim"]),
        "decoder_embed.bias": torch.randn(dim),
        "decoder_pos_embed": torch.randn(1, 1 + grid * grid, dim),
        "decoder_norm.weight": torch.randn(dim),
        "decoder_norm.bias": torch.randn(dim),
        "decoder_pred.weight": torch.randn(patch * patch * 3, dim),
        "decoder_pred.bias": torch.randn(patch * patch * 3),
    }
    for i in range(2):
        block = Block(dim, num_heads=4, mlp_ratio=4, qkv_bias=True).state_dict()
        state.update({f"decoder_blocks.{i}.{k}": v for k, v in block.items()})
    return state


def interpolate_pos_embed(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """MAE ``util/pos_embed.interpolate_pos_embed``: bicubic to the new grid, extended here to non-square grids."""
    pos = state["pos_embed"]
    dim, extra = pos.shape[-1], model.pos_embed.shape[-2] - model.patch_embed.num_patches
    orig = int((pos.shape[-2] - extra) ** 0.5)
    new = model.patch_embed.grid_size
    tokens = pos[:, extra:].reshape(-1, orig, orig, dim).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=new, mode="bicubic", align_corners=False)
    return {**state, "pos_embed": torch.cat((pos[:, :extra], tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)}


def randomise(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight" else 0
            param.copy_(base + 0.1 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict[str, tuple[dict[str, torch.Tensor], Path, Path]]:
    """Per name: (encoder state dict, full pretraining file, encoder-only file), both ``{"model": state}``."""
    folder, out = tmp_path_factory.mktemp("mae"), {}
    for seed, (name, (patch, side)) in enumerate(NATIVE.items()):
        encoder = randomise(reference_encoder(patch, side), seed).state_dict()
        full, encoder_only = folder / f"{name}_full.pth", folder / f"mae_pretrain_{name[4:]}.pth"
        torch.save({"model": {**encoder, **decoder_state(patch, side // patch)}}, full)
        torch.save({"model": encoder}, encoder_only)
        out[name] = (encoder, full, encoder_only)
    return out


def reference_at(name: str, encoder: dict[str, torch.Tensor], size: tuple[int, int]) -> VisionTransformer:
    model = reference_encoder(NATIVE[name][0], size)
    model.load_state_dict(interpolate_pos_embed(encoder, model))
    return model


def tiny(name: str, checkpoint: Path | None = None, **kwargs):
    arch = {**TINY, "img_size": NATIVE[name][1]}
    return create_backbone(name, pretrained=checkpoint is not None, checkpoint=checkpoint, arch=arch, **kwargs).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(NATIVE))
def test_official_checkpoint_reproduces_official_encoder(official, name):
    encoder, full, _ = official[name]
    patch = NATIVE[name][0]
    model = tiny(name, full)
    torch.manual_seed(1)
    # native 4 x 4 grid, shrunk 3 x 3, grown 6 x 6, non-square 3 x 5
    for cells in ((4, 4), (3, 3), (6, 6), (3, 5)):
        size = (cells[0] * patch, cells[1] * patch)
        reference, x = reference_at(name, encoder, size), torch.randn(2, 3, *size)
        with torch.no_grad():
            tokens = reference.forward_features(x)  # normed (B, 1 + h*w, D)
            out = model.forward_features(x, layers=[-1])
            raw = reference.blocks(reference.norm_pre(reference._pos_embed(reference.patch_embed(x))))
        want = tokens[:, 1:].transpose(1, 2).reshape(2, -1, *cells)
        assert max_diff(out.features, want) <= ATOL, size
        assert max_diff(out.cls_token, tokens[:, 0]) <= ATOL, size
        assert max_diff(out.intermediates[0], raw[:, 1:].transpose(1, 2).reshape(2, -1, *cells)) <= ATOL, size


def test_decoder_keys_are_dropped_and_encoder_only_files_load_the_same(official):
    _, full, encoder_only = official["mae_vit_base"]
    a, b = tiny("mae_vit_base", full).state_dict(), tiny("mae_vit_base", encoder_only).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("decoder" in k or "mask_token" in k for k in a)


def test_one_channel_input_is_the_grey_image_seen_as_rgb(official):
    encoder, full, _ = official["mae_vit_base"]
    model, reference = tiny("mae_vit_base", full, in_channels=1), reference_at("mae_vit_base", encoder, (64, 64))
    grey = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        rgb = TF.normalize(grey.expand(-1, 3, -1, -1), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        got, want = model(grey).cls_token, reference.forward_features(rgb)[:, 0]
    assert max_diff(got, want) <= ATOL
    projected = tiny("mae_vit_base", full, in_channels=3, channel_mode="project")
    assert projected(torch.randn(1, 3, 32, 48)).features.shape == (1, 64, 2, 3)


def test_scratch_twin_has_same_names_and_shapes_but_other_values(official):
    _, full, _ = official["mae_vit_huge"]
    pretrained, scratch = tiny("mae_vit_huge", full).state_dict(), tiny("mae_vit_huge").state_dict()
    assert {k: v.shape for k, v in pretrained.items()} == {k: v.shape for k, v in scratch.items()}
    assert not any(torch.equal(pretrained[k], scratch[k]) for k in pretrained)


def test_checkpoint_found_in_medseg_weights_under_its_official_name(official, tmp_path, monkeypatch):
    encoder, _, encoder_only = official["mae_vit_base"]
    (tmp_path / "mae_pretrain_vit_base.pth").write_bytes(encoder_only.read_bytes())
    monkeypatch.setenv("MEDSEG_WEIGHTS", str(tmp_path))
    model = create_backbone("mae_vit_base", arch={**TINY, "img_size": 64}).eval()
    assert torch.equal(model.vit.blocks[1].mlp.fc2.weight, encoder["blocks.1.mlp.fc2.weight"])


def test_missing_file_names_the_official_file_url_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        create_backbone("mae_vit_huge")
    message = str(err.value)
    assert "mae_pretrain_vit_huge.pth" in message
    assert "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth" in message
    assert "MEDSEG_WEIGHTS" in message and str(tmp_path) in message


def test_wrong_files_are_rejected_with_the_file_named(official, tmp_path):
    encoder, _, _ = official["mae_vit_base"]
    # a DINOv2 hub file (official layout: LayerScale, mask_token, 14 px patches) of a matching width
    dinov2 = {k: v for k, v in encoder.items() if k not in ("patch_embed.proj.weight",)}
    dinov2["patch_embed.proj.weight"] = torch.randn(64, 3, 14, 14)
    dinov2["mask_token"] = torch.randn(1, 64)
    dinov2.update({f"blocks.{i}.ls{j}.gamma": torch.randn(64) for i in range(2) for j in (1, 2)})
    torch.save(dinov2, tmp_path / "dinov2_vits14_pretrain.pth")
    with pytest.raises(WeightsError, match=r"ls1\.gamma") as err:
        tiny("mae_vit_base", tmp_path / "dinov2_vits14_pretrain.pth")
    assert str(tmp_path / "dinov2_vits14_pretrain.pth") in str(err.value) and "DINOv2" in str(err.value)
    # a fine-tuned MAE file (global pooling: fc_norm + head instead of norm) is not the pretrained encoder
    finetuned = {k.replace("norm.", "fc_norm.") if k.startswith("norm.") else k: v for k, v in encoder.items()}
    torch.save({"model": {**finetuned, "head.weight": torch.randn(1000, 64)}}, tmp_path / "finetuned.pth")
    with pytest.raises(WeightsError, match="fc_norm") as err:
        tiny("mae_vit_base", tmp_path / "finetuned.pth")
    assert str(tmp_path / "finetuned.pth") in str(err.value)
    # the patch-14 huge file for the patch-16 base model
    _, huge, _ = official["mae_vit_huge"]
    with pytest.raises(WeightsError, match=r"patch_embed\.proj\.weight"):
        tiny("mae_vit_base", huge)


def test_output_interface(official):
    model = tiny("mae_vit_base")
    out = model(torch.randn(2, 1, 48, 80), layers=[0, 1])
    assert out.features.shape == (2, 64, 3, 5) and out.cls_token.shape == (2, 64)
    assert [t.shape for t in out.intermediates] == [(2, 64, 3, 5)] * 2
    assert (model.embed_dim, model.block_dim, model.patch_size, model.num_blocks) == (64, 64, 16, 2)
    spec = model.input_spec
    assert (spec.mean, spec.std, spec.value_range) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (0.0, 1.0))
    with pytest.raises(ValueError, match="multiples of its patch size 16"):
        model(torch.randn(1, 1, 56, 64))


# --- production names: official hyperparameters (MAE paper / models_mae.py) --------------------------------------
OFFICIAL = {"mae_vit_base": (768, 12, 12, 16), "mae_vit_large": (1024, 24, 16, 16), "mae_vit_huge": (1280, 32, 16, 14)}


def expected_parameters(dim: int, depth: int, patch: int) -> int:
    """Parameters of the MAE encoder at 224 px: patch embedding, class token and position table, blocks, norm."""
    block = 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim + (8 * dim * dim + 4 * dim + dim)
    grid = 224 // patch
    return 3 * patch * patch * dim + dim + dim + (1 + grid * grid) * dim + depth * block + 2 * dim


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_production_names_have_official_hyperparameters(name):
    with torch.device("meta"):
        model = create_backbone(name, pretrained=False)
    dim, depth, heads, patch = OFFICIAL[name]
    assert (model.embed_dim, model.num_blocks, model.patch_size, model.input_spec.image_size) == (
        dim,
        depth,
        patch,
        224,
    )
    assert model.vit.blocks[0].attn.num_heads == heads
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(dim, depth, patch)


def test_vit_base_parameter_count_is_the_published_one():
    with torch.device("meta"):
        model = create_backbone("mae_vit_base", pretrained=False)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 85.8


def test_registry_lists_every_mae_name():
    assert list_backbones("mae") == sorted(OFFICIAL)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_config_composes_and_instantiates(name):
    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        cfg = compose(overrides=[f"+backbone={name}"]).backbone
    assert OmegaConf.to_container(cfg) == {
        "_target_": "medseg.backbones.create_backbone",
        "name": name,
        "pretrained": True,
        "checkpoint": None,
        "in_channels": 1,
        "channel_mode": "repeat",
        "attention": "fused",
        "activation_checkpointing": "none",
    }
    model = hydra.utils.instantiate(cfg, pretrained=False, arch={"depth": 1})  # one full-width block: quick
    patch = OFFICIAL[name][3]
    assert model.name == name and model.num_blocks == 1
    assert model(torch.randn(1, 1, 2 * patch, 3 * patch)).features.shape == (1, OFFICIAL[name][0], 2, 3)
