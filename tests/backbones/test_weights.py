"""Checkpoint failures of the SAM and LiteMedSAM families, and of the runs' Lightning checkpoints: each one a
WeightsError that names the file at fault; a checkpoint holding a pickled object is refused before it can run."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

from medseg.backbones import create_backbone
from medseg.backbones.litemedsam import locate_litemedsam_weights
from medseg.backbones.sam import build_sam_components
from medseg.backbones.weights import load_checkpoint, read_checkpoint, read_lightning_state
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


class _WritesMarker:
    """Pickled, it makes the unpickler call ``open(marker, "w")``: a file that appears only if the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _load_into_task(path):
    from medseg.tasks.checkpointing import load_weights

    task = torch.nn.Module()
    task.model = torch.nn.Linear(2, 1)
    load_weights(task, path)
    return task.state_dict()


LOADERS = {
    "read_lightning_state": read_lightning_state,
    "read_checkpoint": read_checkpoint,
    "evaluate.load_weights": _load_into_task,
}


@pytest.mark.parametrize("layout", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("load", LOADERS.values(), ids=LOADERS.keys())
def test_pickle_payload_is_refused_and_never_runs(tmp_path, layout, load):
    marker, path = tmp_path / "marker", tmp_path / "evil.ckpt"
    payload = {
        "state_dict": {"model.weight": torch.zeros(1, 2), "model.bias": torch.zeros(1)},
        "x": _WritesMarker(marker),
    }
    if layout == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=layout == "zip")
    with pytest.raises(WeightsError, match="is not a plain-weights checkpoint") as info:
        load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    if layout != "pickle":  # torch.save's pickle names what it would have called
        assert "(io.open)" in str(info.value)
    assert not marker.exists(), "the pickle ran"


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", b"PK\x03\x04truncated zip"])
def test_unreadable_bytes_are_a_weights_error(tmp_path, content):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    for load in (load_checkpoint, read_checkpoint):
        with pytest.raises(WeightsError, match=re.escape(str(path))) as info:
            load(path)
        assert "\n" not in str(info.value)


def _metatensor_score(tmp_path):
    """A validation score as ModelCheckpoint kept it before training stopped saving MONAI objects: a MetaTensor whose
    meta data (from a NIfTI read by MONAI) holds NumPy arrays and MONAI enum values."""
    import nibabel as nib
    import numpy as np
    from monai.data import MetaTensor
    from monai.transforms import LoadImage

    path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 3), np.float32), np.diag([1.5, 1.5, 3.0, 1.0])), path)
    score = LoadImage(image_only=True)(path).mean()
    assert isinstance(score, MetaTensor) and isinstance(score.meta["spatial_shape"], np.ndarray)
    return score


@pytest.mark.parametrize("score", ["metatensor", "tensor"])
def test_lightning_checkpoints_old_and_new_load_weights_only(tmp_path, score):
    weights = {"model.weight": torch.randn(1, 2), "model.bias": torch.randn(1)}
    value = _metatensor_score(tmp_path) if score == "metatensor" else torch.tensor(0.5)
    callback = {"monitor": "val/dice", "best_model_score": value, "best_k_models": {"best.ckpt": value}}
    checkpoint = {
        "epoch": 1, "global_step": 2, "pytorch-lightning_version": "2.5.0", "state_dict": weights,
        "callbacks": {"ModelCheckpoint{'monitor': 'val/dice'}": callback,
                      "RandomStateCheckpoint": {"numpy": ("MT19937", np.arange(4, dtype=np.uint32), 1, 0, 0.0)}},
        "optimizer_states": [], "lr_schedulers": [],
    }  # fmt: skip
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    state = read_lightning_state(path)
    assert sorted(state) == sorted(weights) and all(torch.equal(state[k], weights[k]) for k in weights)
    loaded = _load_into_task(path)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_checkpoint_without_state_dict_is_named(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"model.weight": torch.zeros(1, 2)}, path)
    with pytest.raises(WeightsError, match=rf"{re.escape(str(path))} is not a Lightning checkpoint"):
        read_lightning_state(path)
