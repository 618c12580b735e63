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


def _large_casts(fn) -> list[tuple]:
    """Shapes of the dtype conversions of tensors of 4096 elements or more that ``fn()`` runs."""
    from torch.profiler import profile

    with profile(record_shapes=True) as prof:
        fn()
    return [
        tuple(e.input_shapes[0])
        for e in prof.events()
        if e.name == "aten::_to_copy" and e.input_shapes and e.input_shapes[0]
        and int(np.prod(e.input_shapes[0])) >= 4096
    ]  # fmt: skip


def test_bf16_clicks_decode_in_fp32_with_one_cast_of_the_embedding():
    """Under a bf16 autocast the click path casts the bf16 embedding once and nothing else image-sized: autocast
    used to convert every image-side activation and product of the decoder (many small kernels on a GPU)."""
    from medseg.models.promptable import build_promptable
    from medseg.prompts.contract import Prompts

    torch.manual_seed(0)
    model = build_promptable(
        "sam_vit_b", pretrained=False, img_size=256, arch={"depth": 2, "embed_dim": 32, "num_heads": 2,
                                                           "global_attn_indexes": (1,)},
    ).eval()  # fmt: skip
    prompts = Prompts(box=[[40.0, 50.0, 180.0, 200.0]])
    with torch.inference_mode():
        embedding = model.encode(torch.rand(1, 1, 256, 256))  # (1, 256, 16, 16): 65536 elements
        reference, _ = model.decode(embedding, prompts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = embedding.to(torch.bfloat16)  # what a bf16 encoder hands over
            casts = _large_casts(lambda: model.decode(low, prompts))
            logits, iou = model.decode(low, prompts)
        same_values = model.decode(low.float(), prompts)[0]  # the bf16 embedding's values, decoded in fp32
    assert casts == [(1, 256, 16, 16)], casts
    assert logits.dtype == iou.dtype == torch.float32
    torch.testing.assert_close(logits, same_values, rtol=1e-4, atol=1e-4)
    assert (logits > 0).ne(reference > 0).float().mean() < 0.01  # rounding the embedding alone moves few pixels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_predict_encodes_in_batches_and_decodes_in_fp32(blob, tmp_path):
    """medseg predict -m litemedsam on CUDA: flat boxes are encoded 8 slices per call by default, the encoder runs
    in bf16 and the decoder in fp32, and the masks agree with fp32 ones (Dice > 0.99)."""
    from medseg.inference.predictor import PredictOptions, predict_cases
    from medseg.workflows.models import load_model

    volume, mask = blob(depth=12)
    nifti = tmp_path / "blob.nii.gz"
    nib.save(nib.Nifti1Image(np.round(volume).astype(np.int16), np.eye(4)), nifti)
    boxes = []
    for k in range(volume.shape[2]):
        rows, cols = np.nonzero(mask[..., k])
        if len(rows):
            boxes.append([int(rows.min()) - 2, int(cols.min()) - 2, k, int(rows.max()) + 2, int(cols.max()) + 2, k])
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"space": "voxel", "objects": [{"label": 1, "boxes": boxes}]}))
    loaded = load_model("litemedsam", device="cuda")
    model, calls = loaded.model, []
    encode, decode = model.encode, model.decode

    def counting_encode(images):
        out = encode(images)
        calls.append((int(images.shape[0]), out.dtype))
        return out

    def checking_decode(*args, **kwargs):
        logits, iou = decode(*args, **kwargs)
        assert logits.dtype == torch.float32
        return logits, iou

    model.encode, model.decode = counting_encode, checking_decode
    labels = {}
    for precision in ("fp32", "bf16"):
        calls.clear()
        report = predict_cases(loaded, nifti, tmp_path / precision, prompts, PredictOptions(precision=precision))
        assert report.ok, report.failed
        assert max(size for size, _ in calls) == min(8, len(boxes)) and sum(s for s, _ in calls) == len(boxes)
        assert {dtype for _, dtype in calls} == {torch.float32 if precision == "fp32" else torch.bfloat16}
        labels[precision] = np.asarray(nib.load(tmp_path / precision / "blob.nii.gz").dataobj) == 1
    overlap = 2 * (labels["fp32"] & labels["bf16"]).sum() / (labels["fp32"].sum() + labels["bf16"].sum())
    assert overlap > 0.99
