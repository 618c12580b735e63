"""DINOv2: official key layout and numerics, position-embedding resampling, registry, configs and errors.

The reference is a minimal re-implementation of the official ``dinov2.models.vision_transformer.
DinoVisionTransformer`` forward (patch embedding, class and register tokens, ``interpolate_pos_encoding`` with its
0.1 offset, blocks with LayerScale, MLP or fused SwiGLU, final norm) with the official parameter names, so a random
state dict saved from it is a checkpoint in the official layout. It is independent of timm and of medseg.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import _convert_dinov2
from torch import nn

from medseg.backbones import create_backbone, list_backbones
from medseg.backbones.dinov2 import convert_dinov2_checkpoint
from medseg.errors import InputShapeError, WeightsError

CONF = Path(__file__).resolve().parents[2] / "conf" / "backbone"
TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3, "img_size": 56}  # a 4 x 4 grid of 14 px patches
PATCH = 14
ATOL = 1e-5


# --- reference: the official DinoVisionTransformer, reduced to what the forward pass uses -------------------------
class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwiGLUFFNFused(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn: type[nn.Module]) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), _Attention(dim, num_heads), _LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), ffn(dim, 4 * dim), _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class OfficialDinoV2(nn.Module):
    """``DinoVisionTransformer`` with the hub defaults ``interpolate_offset=0.1``, ``interpolate_antialias=False``."""

    def __init__(self, swiglu: bool = False, num_register_tokens: int = 0) -> None:
        super().__init__()
        dim, grid = TINY["embed_dim"], TINY["img_size"] // PATCH
        self.num_register_tokens = num_register_tokens
        self.patch_embed = _PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        ffn = _SwiGLUFFNFused if swiglu else _Mlp
        self.blocks = nn.ModuleList(_Block(dim, TINY["num_heads"], ffn) for _ in range(TINY["depth"]))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // PATCH, h // PATCH
        m = int(math.sqrt(n))
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=False,
            scale_factor=(float(w0 + 0.1) / m, float(h0 + 0.1) / m),
        )
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        b, _, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.num_register_tokens:
            x = torch.cat((x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]), dim=1)
        blocks = []
        for block in self.blocks:
            x = block(x)
            blocks.append(x)
        x_norm = self.norm(x)
        skip = 1 + self.num_register_tokens

        def to_map(t: torch.Tensor) -> torch.Tensor:  # get_intermediate_layers(reshape=True)
            return t[:, skip:].reshape(b, w // PATCH, h // PATCH, -1).permute(0, 3, 1, 2)

        return {
            "cls": x_norm[:, 0],
            "patch": to_map(x_norm),
            "blocks": [to_map(t) for t in blocks],
            "blocks_normed": [to_map(self.norm(t)) for t in blocks],
        }


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values everywhere; LayerScale and norms far from their init so every parameter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            base = 1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight" else 0
            param.copy_(base + (0.5 if "gamma" in name else 0.1) * noise)
    return model.eval()


VARIANTS = {  # registry name -> reference configuration
    "dinov2_vits14": {},
    "dinov2_vits14_reg": {"num_register_tokens": 4},
    "dinov2_vitg14": {"swiglu": True},
    "dinov2_vitg14_reg": {"swiglu": True, "num_register_tokens": 4},
}


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict[str, tuple[OfficialDinoV2, Path]]:
    """Per variant: (reference model, path of its state dict saved as the official hub files are: flat)."""
    out = {}
    folder = tmp_path_factory.mktemp("dinov2")
    for seed, (name, options) in enumerate(VARIANTS.items()):
        model = randomise(OfficialDinoV2(**options), seed)
        path = folder / f"{name}.pth"
        torch.save(model.state_dict(), path)
        out[name] = (model, path)
    return out


def tiny(name: str, checkpoint: Path | None = None, **kwargs):
    return create_backbone(name, pretrained=checkpoint is not None, checkpoint=checkpoint, arch=TINY, **kwargs).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# (H, W) in pixels: native 4 x 4 grid, shrunk 3 x 3, grown and non-square 5 x 7, mixed 2 x 6
SIZES = [(56, 56), (42, 42), (70, 98), (28, 84)]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_official_checkpoint_reproduces_official_forward(official, name):
    reference, path = official[name]
    model = tiny(name, path)
    torch.manual_seed(1)
    for size in SIZES:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref, out = reference(x), model.forward_features(x, layers=[0, -1])
        assert max_diff(out.features, ref["patch"]) <= ATOL, size
        assert max_diff(out.cls_token, ref["cls"]) <= ATOL, size
        for got, want in zip(out.intermediates, [ref["blocks"][0], ref["blocks"][-1]], strict=True):
            assert max_diff(got, want) <= ATOL, size


def test_intermediate_norm_matches_get_intermediate_layers_with_norm(official):
    reference, path = official["dinov2_vits14_reg"]
    model = tiny("dinov2_vits14_reg", path, intermediate_norm=True)
    x = torch.randn(1, 3, 70, 56)
    with torch.no_grad():
        ref, out = reference(x), model.forward_features(x, layers=[0])
    assert max_diff(out.intermediates[0], ref["blocks_normed"][0]) <= ATOL


def test_timm_dynamic_resampling_would_not_match_official(official):
    """Why medseg resamples itself: timm's dynamic_img_size (antialias, no 0.1 offset) differs from the official."""
    reference, path = official["dinov2_vits14"]
    vit = tiny("dinov2_vits14", path).vit
    for size, should_match in (((56, 56), True), ((42, 42), False), ((70, 98), False)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            timm_tokens = vit.forward_features(x)[:, 1:]
            ref = reference(x)["patch"].flatten(2).transpose(1, 2)
        assert (max_diff(timm_tokens, ref) <= ATOL) == should_match, size


def test_one_channel_input_is_the_grey_image_seen_as_rgb(official):
    reference, path = official["dinov2_vits14"]
    model = tiny("dinov2_vits14", path, in_channels=1)
    grey = torch.randn(2, 1, 42, 56)
    with torch.no_grad():
        rgb = TF.normalize(grey.expand(-1, 3, -1, -1), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        out, ref = model(grey), reference(rgb)
    assert max_diff(out.features, ref["patch"]) <= ATOL
    projected = tiny("dinov2_vits14", path, in_channels=2, channel_mode="project")
    assert projected(torch.randn(1, 2, 56, 56)).features.shape == (1, 48, 4, 4)


def test_chunked_block_keys_load_like_flat_ones(official, tmp_path):
    """Checkpoints saved with ``block_chunks=2`` name block N of chunk C ``blocks.C.N.``."""
    _, path = official["dinov2_vitg14"]
    state = torch.load(path, weights_only=True)
    chunked = {re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.\1.", k): v for k, v in state.items()}
    assert any(k.startswith("blocks.1.1.") for k in chunked)
    torch.save(chunked, tmp_path / "chunked.pth")
    flat, split = tiny("dinov2_vitg14", path), tiny("dinov2_vitg14", tmp_path / "chunked.pth")
    for key, value in flat.state_dict().items():
        assert torch.equal(value, split.state_dict()[key]), key


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov2_vitg14"])
def test_key_mapping_agrees_with_timm_filter(official, name):
    _, path = official[name]
    state = torch.load(path, weights_only=True)
    vit = tiny(name).vit
    ours, timms = convert_dinov2_checkpoint(dict(state), vit), _convert_dinov2(dict(state), vit)
    assert ours.keys() == timms.keys()
    assert all(torch.equal(ours[k], timms[k]) for k in ours)


def test_scratch_twin_has_same_names_and_shapes_but_other_values(official):
    _, path = official["dinov2_vits14_reg"]
    pretrained, scratch = tiny("dinov2_vits14_reg", path).state_dict(), tiny("dinov2_vits14_reg").state_dict()
    assert {k: v.shape for k, v in pretrained.items()} == {k: v.shape for k, v in scratch.items()}
    assert not any(torch.equal(pretrained[k], scratch[k]) for k in pretrained)
    assert torch.all(scratch["vit.blocks.0.ls1.gamma"] == 1e-5)  # DINOv2's LayerScale initialisation


def test_checkpoint_found_in_medseg_weights_under_its_official_name(official, tmp_path, monkeypatch):
    reference, path = official["dinov2_vits14_reg"]
    (tmp_path / "dinov2_vits14_reg4_pretrain.pth").write_bytes(path.read_bytes())
    monkeypatch.setenv("MEDSEG_WEIGHTS", str(tmp_path))
    model = create_backbone("dinov2_vits14_reg", arch=TINY).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert max_diff(model.forward_features(x).cls_token, reference(x)["cls"]) <= ATOL


def test_missing_file_names_the_official_file_url_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        create_backbone("dinov2_vitb14_reg")
    message = str(err.value)
    assert "dinov2_vitb14_reg4_pretrain.pth" in message
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth" in message
    assert "MEDSEG_WEIGHTS" in message and str(tmp_path) in message


def test_wrong_files_are_rejected_with_the_file_named(official, tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    mae = VisionTransformer(img_size=56, patch_size=14, embed_dim=48, depth=2, num_heads=3, num_classes=0)
    torch.save({"model": {**mae.state_dict(), "decoder_embed.weight": torch.zeros(32, 48)}}, tmp_path / "mae.pth")
    with pytest.raises(WeightsError, match=r"ls1\.gamma") as err:
        tiny("dinov2_vits14", tmp_path / "mae.pth")
    assert str(tmp_path / "mae.pth") in str(err.value) and "MAE" in str(err.value)
    _, plain = official["dinov2_vits14"]
    with pytest.raises(WeightsError, match="reg_token") as err:  # a file without registers for a register model
        tiny("dinov2_vits14_reg", plain)
    assert str(plain) in str(err.value)
    _, giant = official["dinov2_vitg14"]
    with pytest.raises(WeightsError, match=r"mlp\.fc2\.weight"):  # SwiGLU file for an MLP model: shapes differ
        tiny("dinov2_vits14", giant)


def test_output_interface_and_input_checks(official):
    model = tiny("dinov2_vits14")
    out = model(torch.randn(2, 1, 84, 70), layers=[1, 0, -2])
    assert out.features.shape == (2, 48, 6, 5) and out.cls_token.shape == (2, 48)
    assert [t.shape for t in out.intermediates] == [(2, 48, 6, 5)] * 3
    assert torch.equal(out.intermediates[1], out.intermediates[2])  # block 0 asked twice, as 0 and -2
    assert (model.embed_dim, model.block_dim, model.patch_size, model.num_blocks) == (48, 48, 14, 2)
    with pytest.raises(ValueError, match="multiples of its patch size 14"):
        model(torch.randn(1, 1, 64, 56))
    with pytest.raises(IndexError):
        model(torch.randn(1, 1, 56, 56), layers=[2])


# --- production names: official hyperparameters ------------------------------------------------------------------
# DINOv2 paper, Table 17 / official hub: width, depth, heads; all patch 14, 518 px (37 x 37) position embeddings.
OFFICIAL = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}


def expected_parameters(dim: int, depth: int, registers: bool, swiglu: bool) -> int:
    """Parameters of the official DinoVisionTransformer without ``mask_token`` (dropped: unused when encoding).

    Register models hold one ``dim`` fewer: the class token's position embedding is folded into the class token.
    """
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
    ffn = dim * 2 * hidden + 2 * hidden + hidden * dim + dim if swiglu else 2 * dim * hidden + hidden + dim
    block = 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + dim + 2 * dim + ffn + dim
    tokens = dim + (37 * 37 + 4) * dim if registers else dim + (1 + 37 * 37) * dim
    embed = 3 * PATCH * PATCH * dim + dim + tokens
    return embed + depth * block + 2 * dim


@pytest.mark.parametrize("name", sorted(f"dinov2_vit{s}14{r}" for s in OFFICIAL for r in ("", "_reg")))
def test_production_names_have_official_hyperparameters(name):
    with torch.device("meta"):  # no memory, no init time: ViT-g has 1.1 B parameters
        model = create_backbone(name, pretrained=False)
    dim, depth, heads = OFFICIAL[name[len("dinov2_vit")]]
    assert (model.embed_dim, model.num_blocks, model.patch_size) == (dim, depth, 14)
    assert model.vit.blocks[0].attn.num_heads == heads
    assert model.input_spec.image_size == 518 and model.vit.patch_embed.grid_size == (37, 37)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_parameters(dim, depth, name.endswith("_reg"), "vitg" in name)


def test_vits14_parameter_count_is_the_published_one():
    model = create_backbone("dinov2_vits14", pretrained=False)  # a real build, on CPU
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 22.06


def test_registry_lists_every_dinov2_name():
    assert list_backbones("dinov2") == sorted(f"dinov2_vit{s}14{r}" for s in OFFICIAL for r in ("", "_reg"))


# --- Hydra configs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(f"dinov2_vit{s}14{r}" for s in OFFICIAL for r in ("", "_reg")))
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
    # one block at full width keeps even ViT-g quick while going through the real builder
    model = hydra.utils.instantiate(cfg, pretrained=False, arch={"depth": 1})
    assert model.name == name and model.num_blocks == 1
    assert model(torch.randn(1, 1, 28, 42)).features.shape == (1, OFFICIAL[name[len("dinov2_vit")]][0], 2, 3)


def test_img_size_sets_the_advertised_input_size_only(official):
    reference, path = official["dinov2_vits14"]
    model = tiny("dinov2_vits14", path, img_size=70)
    assert model.input_spec.image_size == 70 and model.vit.patch_embed.grid_size == (4, 4)
    x = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        assert max_diff(model.forward_features(x).features, reference(x)["patch"]) <= ATOL
    with pytest.raises(InputShapeError, match="image_size 64"):
        tiny("dinov2_vits14", img_size=64)
