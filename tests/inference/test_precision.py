"""``--precision``: names checked against the device, autocast applied, and kept apart in the embedding cache."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.errors import ConfigError
from medseg.inference.cache import embedding_key
from medseg.inference.precision import (
    check_precision,
    inference_precision,
    numerics_signature,
    prepare_model,
    resolve_precision,
)


def test_names_are_checked_against_the_device():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="not one of"):
        check_precision("half", "cpu")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        check_precision("fp16", "cpu")


def test_bf16_autocasts_the_block_and_changes_the_cache_key():
    layer, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    slice_2d = np.arange(16, dtype=np.uint8).reshape(4, 4)
    plain_key = embedding_key(slice_2d, "w", "p")
    with inference_precision("fp32", "cpu"):
        assert layer(x).dtype == torch.float32 and numerics_signature() == "fp32"
        assert embedding_key(slice_2d, "w", "p") == plain_key
    with inference_precision("bf16", "cpu"):
        assert layer(x).dtype == torch.bfloat16
        assert numerics_signature() == "autocast=cpu:bfloat16"
        assert embedding_key(slice_2d, "w", "p") != plain_key  # a bf16 embedding never answers an fp32 lookup
    assert numerics_signature() == "fp32"


def test_prepare_model_uses_channels_last_only_off_fp32():
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3))
    prepare_model(conv, "fp32")
    assert conv[0].weight.is_contiguous()
    prepare_model(conv, "bf16")
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_litemedsam_in_bf16_agrees_with_fp32(blob, tmp_path):
    """The real model on one slice of the blob: bf16 masks equal fp32 ones to Dice > 0.99 (the bench's criterion)."""
    from medseg.inference.predictor import PredictOptions, predict_cases
    from medseg.workflows.models import load_model

    volume, mask = blob(depth=1)
    nifti = tmp_path / "blob.nii.gz"
    nib.save(nib.Nifti1Image(np.round(volume).astype(np.int16), np.eye(4)), nifti)
    rows, cols = np.nonzero(mask[..., 0])
    box = [int(rows.min()) - 2, int(cols.min()) - 2, 0, int(rows.max()) + 2, int(cols.max()) + 2, 0]
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"space": "voxel", "objects": [{"label": 1, "boxes": [box]}]}))
    loaded = load_model("litemedsam", device="cpu")  # its own copy: bf16 turns the weights channels-last
    original, embeddings = loaded.model.encode, []

    def encode(images):
        embeddings.append(original(images).float())
        return embeddings[-1]

    loaded.model.encode = encode
    labels = {}
    for precision in ("fp32", "bf16"):
        report = predict_cases(loaded, nifti, tmp_path / precision, prompts, PredictOptions(precision=precision))
        assert report.ok, report.failed
        labels[precision] = np.asarray(nib.load(tmp_path / precision / "blob.nii.gz").dataobj) == 1
    overlap = 2 * (labels["fp32"] & labels["bf16"]).sum() / (labels["fp32"].sum() + labels["bf16"].sum())
    truth = 2 * (labels["bf16"] & mask).sum() / (labels["bf16"].sum() + mask.sum())
    fp32, bf16 = embeddings
    error = float((bf16 - fp32).norm() / fp32.norm())
    assert 0 < error < 0.1, error  # the encoder did run in bf16 (no cached fp32 embedding), and close to fp32
    print(f"bf16 vs fp32 Dice {overlap:.4f}; bf16 vs truth {truth:.4f}")
    assert overlap > 0.99 and truth > 0.8
