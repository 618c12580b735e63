"""Predictions come back on the input's exact grid: the CT preprocessing inverted, then written as NIfTI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose
from omegaconf import OmegaConf

from medseg.data.io import LoadCased
from medseg.data.prepare.synthetic import LABELS, make_phantom
from medseg.data.prepare.writing import write_nifti
from medseg.data.transforms import build_transforms
from medseg.inference import InferenceError, native_label_map, to_native, write_label_map

CT_PRESET = Path(__file__).resolve().parents[2] / "conf" / "data" / "preprocess" / "ct.yaml"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """An oblique (15 deg), LPS, anisotropic phantom in air, through the CT preset (RAS, 1.5x1.5x2.5 mm, crop)."""
    folder = tmp_path_factory.mktemp("native")
    image, label, affine = make_phantom(
        3, shape=(56, 52, 22), spacing=(2.1, 1.9, 3.2), orientation="LPS", oblique_degrees=15.0
    )
    image_path = write_nifti(image, affine, folder / "case_0000.nii.gz", dtype=np.int16)
    label_path = write_nifti(label, affine, folder / "case.nii.gz", dtype=np.uint8)
    config = OmegaConf.create({"data": {"preprocess": OmegaConf.load(CT_PRESET)}})
    config.data.preprocess.spacing = [1.5, 1.5, 2.5]
    transform = Compose([LoadCased(keys=["image", "label"]), *build_transforms(config.data.preprocess.transforms)])
    item = transform({"image": [str(image_path)], "label": str(label_path), "case_id": "case"})
    return {"item": item, "transform": transform, "label": label, "affine": affine, "image_path": image_path}


def test_the_case_really_is_resampled_and_cropped(case):
    item = case["item"]
    assert tuple(item["image"].shape[1:]) != case["label"].shape
    operations = [op["class"] for op in item["image"].applied_operations]
    assert operations[:3] == ["Orientation", "SpatialResample", "CropForeground"]
    assert any(item["image"].applied_operations[2]["extra_info"]["cropped"])  # air around the body was cropped


def check_written(path: Path, case, labels: np.ndarray) -> None:
    written, source = nib.load(path), nib.load(case["image_path"])
    assert written.shape == source.shape
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    np.testing.assert_allclose(written.get_qform(), source.get_qform(), atol=1e-5)
    np.testing.assert_allclose(written.get_sform(), source.get_sform(), atol=1e-5)
    assert int(written.header["qform_code"]) == int(source.header["qform_code"])
    assert int(written.header["sform_code"]) == int(source.header["sform_code"])
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)


def test_label_map_inverted_with_nearest_and_written(case, tmp_path):
    prediction = torch.as_tensor(case["item"]["label"]).to(torch.int64)  # the preprocessed label as "prediction"
    native = to_native(prediction, case["item"], case["transform"])
    assert tuple(native.shape) == (1, *case["label"].shape) and native.dtype == torch.int64
    np.testing.assert_allclose(native.affine.numpy(), case["affine"], atol=1e-4)
    labels = native[0].numpy()
    for value in range(1, len(LABELS)):
        assert dice(labels == value, case["label"] == value) > 0.9, value
    path = write_label_map(native, case["image_path"], tmp_path / "pred" / "case.nii.gz")
    check_written(path, case, labels)


def test_scores_inverted_then_argmax(case, tmp_path):
    label = torch.as_tensor(case["item"]["label"])[0].long()
    logits = torch.nn.functional.one_hot(label, len(LABELS)).movedim(-1, 0).float() * 8.0
    native = native_label_map(logits, case["item"], case["transform"])
    assert tuple(native.shape) == case["label"].shape
    np.testing.assert_allclose(native.affine.numpy(), case["affine"], atol=1e-4)
    labels = native.numpy()
    for value in range(1, len(LABELS)):
        assert dice(labels == value, case["label"] == value) > 0.9, value
    check_written(write_label_map(labels, case["image_path"], tmp_path / "case.nii.gz"), case, labels)


def test_datamodule_test_cases_come_back_on_their_files(tmp_path):
    """The datamodule's own items and transform instances, on the synthetic dataset's reoriented/oblique cases."""
    from medseg.data.datamodule import SegmentationDataModule
    from medseg.data.prepare.synthetic import build

    root = build(tmp_path, seed=1, num_train=2, num_test=3, shape=(40, 36, 16))
    config = OmegaConf.create({"data": {"preprocess": OmegaConf.load(CT_PRESET)}})
    config.data.preprocess.spacing = [2.0, 2.0, 3.0]
    preprocess = OmegaConf.to_container(config.data.preprocess.transforms, resolve=True)
    module = SegmentationDataModule(str(root), num_folds=2, preprocess=preprocess, cache="none")
    dataset = module.dataset_for("test")
    for index in range(len(dataset)):
        item = dataset[index]
        logits = torch.nn.functional.one_hot(torch.as_tensor(item["label"])[0].long(), 5).movedim(-1, 0).float()
        labels = native_label_map(logits, item, module.deterministic_transform)
        image_path = root / "imagesTs" / f"{item['case_id']}_0000.nii.gz"
        reference = np.asanyarray(nib.load(root / "labelsTs" / f"{item['case_id']}.nii.gz").dataobj)
        written = nib.load(write_label_map(labels, image_path, tmp_path / "pred" / f"{item['case_id']}.nii.gz"))
        assert written.shape == reference.shape
        np.testing.assert_allclose(written.affine, nib.load(image_path).affine, atol=1e-5)
        for value in range(1, 5):
            assert dice(np.asanyarray(written.dataobj) == value, reference == value) > 0.9, (item["case_id"], value)


def test_prediction_off_the_grid_is_refused(case):
    with pytest.raises(InferenceError, match="not on the grid"):
        to_native(torch.zeros(1, 5, 5, 5, dtype=torch.int64), case["item"], case["transform"])
    with pytest.raises(InferenceError, match="MetaTensor"):
        to_native(torch.zeros(1, 5, 5, 5), {"image": torch.zeros(1, 5, 5, 5)}, case["transform"])
