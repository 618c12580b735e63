"""Checkpoint failures of the SAM and LiteMedSAM families: each one a WeightsError that names the file at fault."""

from __future__ import annotations

import re

import pytest
import torch

from medseg.backbones import create_backbone
from medseg.backbones.litemedsam import locate_litemedsam_weights
from medseg.backbones.sam import build_sam_components
from medseg.errors import MedsegError, WeightsError

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "global_attn_indexes": (1,)}


def tiny_sam_vit_b(**kwargs):
    return create_backbone("sam_vit_b", img_size=64, arch=TINY, **kwargs)


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory):
    """A random tiny SAM saved in the official full-SAM layout, and the encoder it holds."""
    components = build_sam_components("sam_vit_b", pretrained=False, img_size=64, arch=TINY)
    state = {f"{part}.{k}": v for part, module in components._asdict().items() for k, v in module.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    return path, components.image_encoder


def test_missing_explicit_file_names_it_and_the_official_file(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsError, match=re.escape(str(missing))) as info:
        tiny_sam_vit_b(checkpoint=missing)
    assert "sam_vit_b_01ec64.pth" in str(info.value)


def test_missing_file_in_weights_folder_says_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsError) as info:
        create_backbone("sam_vit_l")
    message = str(info.value)
    assert "sam_vit_l_0b3195.pth" in message
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth" in message
    assert str(tmp_path.resolve()) in message and "MEDSEG_WEIGHTS" in message
    assert isinstance(info.value, MedsegError)


def test_file_in_weights_folder_is_found(sam_file, tmp_path, monkeypatch):
    path, encoder = sam_file
    (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("MEDSEG_WEIGHTS", str(tmp_path))
    model = tiny_sam_vit_b()
    assert torch.equal(model.image_encoder.patch_embed.proj.weight, encoder.patch_embed.proj.weight)


def test_wrapped_and_prefixed_files_load(sam_file, tmp_path):
    path, encoder = sam_file
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in torch.load(path, weights_only=True).items()}}, wrapped)
    model = tiny_sam_vit_b(checkpoint=wrapped)
    assert torch.equal(model.image_encoder.neck[0].weight, encoder.neck[0].weight)


def test_dinov2_style_file_is_rejected_with_the_file_name(tmp_path):
    fake = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(
        {
            "cls_token": torch.zeros(1, 1, 64),
            "pos_embed": torch.zeros(1, 17, 64),
            "patch_embed.proj.weight": torch.zeros(64, 3, 14, 14),
            "blocks.0.attn.qkv.weight": torch.zeros(192, 64),
        },
        fake,
    )
    with pytest.raises(WeightsError, match=r"dinov2_vitb14_pretrain\.pth") as info:
        tiny_sam_vit_b(checkpoint=fake)
    assert "Missing" in str(info.value) and "sam_vit_b_01ec64.pth" in str(info.value)


def test_litemedsam_file_is_rejected_by_sam():
    path = locate_litemedsam_weights()
    with pytest.raises(WeightsError, match=r"lite_medsam\.pth"):
        tiny_sam_vit_b(checkpoint=path)
    with pytest.raises(WeightsError, match=r"lite_medsam\.pth"):
        build_sam_components("sam_vit_b", checkpoint=path, img_size=64, arch=TINY)


def test_sam_file_is_rejected_by_litemedsam(sam_file):
    path, _ = sam_file
    with pytest.raises(WeightsError, match=r"sam_vit_b_01ec64\.pth"):
        create_backbone("litemedsam", checkpoint=path)


def test_truncated_file_is_reported_as_such(sam_file, tmp_path):
    path, _ = sam_file
    data = path.read_bytes()
    truncated = tmp_path / "sam_vit_b_01ec64.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupted") as info:
        tiny_sam_vit_b(checkpoint=truncated)
    assert str(truncated) in str(info.value)
    with pytest.raises(WeightsError, match="truncated or corrupted"):
        build_sam_components("sam_vit_b", checkpoint=truncated, img_size=64, arch=TINY)


def test_truncated_litemedsam_file_is_reported(tmp_path):
    data = locate_litemedsam_weights().read_bytes()
    truncated = tmp_path / "lite_medsam.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=re.escape(str(truncated))):
        create_backbone("litemedsam", checkpoint=truncated)


def test_components_require_all_three_parts(sam_file, tmp_path):
    path, _ = sam_file
    encoder_only = tmp_path / "encoder_only.pth"
    state = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in state.items() if k.startswith("image_encoder.")}, encoder_only)
    assert tiny_sam_vit_b(checkpoint=encoder_only) is not None  # the backbone needs the encoder only
    with pytest.raises(WeightsError, match=r"Missing \d+ keys: mask_decoder"):
        build_sam_components("sam_vit_b", checkpoint=encoder_only, img_size=64, arch=TINY)
