"""Merged releases load with safetensors and the builder their config names, strictly, nothing else."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file

from medseg.backbones import create_backbone
from medseg.models import build_segmenter
from medseg.release.load import load_release
from medseg.release.spec import read_release_config
from medseg.release.weights import export_tensors, merged_layout

ARCH = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}


def _image() -> torch.Tensor:
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))


def test_merged_release_loads_with_safetensors_and_its_config(tiny_releases):
    folder = tiny_releases["merged"]
    config = read_release_config(folder)  # the checked config; the builder is Hydra's plain instantiate
    model = instantiate(config.model).eval()
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.equal(model(_image()), load_release(folder).model(_image()))


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    torch.manual_seed(1)
    backbone = create_backbone("mae_vit_base", pretrained=False, arch=ARCH, img_size=64)
    path = tmp_path_factory.mktemp("merged_base") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.vit.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("adapter", "layout"),
    [
        ({"method": "lora", "rank": 4}, "plain"),
        ({"method": "dora", "rank": 4}, "plain"),
        ({"method": "ssf"}, "plain"),
        ({"method": "adaptformer"}, "adapters"),
        ({"methods": [{"method": "lora"}, {"method": "adaptformer"}]}, "adapters"),
    ],
)
def test_merged_tensors_strictly_fit_the_architecture_the_config_builds(base_file, adapter, layout):
    options = {"backbone": "mae_vit_base", "decoder": "unetr", "num_classes": 3, "in_channels": 1, "img_size": 64,
               "arch": ARCH, "feature_size": 4}  # fmt: skip
    trained = build_segmenter(**options, pretrained=True, checkpoint=str(base_file), adapter=adapter).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in (p for p in trained.parameters() if p.requires_grad):
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        reference = trained(_image())
    assert merged_layout(trained) == layout
    tensors = export_tensors(trained, "merged")
    architecture = None if layout == "plain" else adapter  # plain: what a merged config.yaml builds
    rebuilt = build_segmenter(**options, pretrained=False, checkpoint=None, adapter=architecture)
    rebuilt.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(_image()), reference, atol=1e-5)
