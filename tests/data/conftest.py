"""Fixtures that write tiny real datasets (NIfTI files, dataset.json) into ``tmp_path``.

Factories rather than ready datasets, so that each test states the property it needs (a second channel, an MSD
layout, a test split with labels) and then breaks exactly one thing. Use them from any test in ``tests/data/``:

    def test_x(make_nnunet_dataset):
        root = make_nnunet_dataset(channels=("T2", "ADC"), num_test=1)
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

DEFAULT_LABELS = {"background": 0, "organ": 1, "tumour": 2}


def write_nifti(
    path: Path,
    data: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    affine: np.ndarray | None = None,
) -> Path:
    """Write ``data`` as NIfTI with a diagonal affine of ``spacing`` (mm), or with ``affine`` when given."""
    if affine is None:
        affine = np.diag([*spacing, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def synthetic_case(shape: Sequence[int], index: int, num_labels: int, rng: np.random.Generator):
    """A label map with nested boxes (values 1..num_labels-1) shifted by ``index``, and an image brighter inside."""
    label = np.zeros(shape, dtype=np.uint8)
    for value in range(1, num_labels):
        lo = [value + (index % 2) for _ in shape]
        hi = [max(lo_ + 1, s - 2 * value) for lo_, s in zip(lo, shape)]
        label[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    image = (rng.normal(0.0, 10.0, size=shape) + 100.0 * label).astype(np.float32)
    return image, label


@pytest.fixture
def nifti_writer() -> Callable[..., Path]:
    """The :func:`write_nifti` helper."""
    return write_nifti


def header_only_nifti(path: Path, shape: Sequence[int], dtype=np.float32) -> Path:
    """A gzipped NIfTI holding a header that declares ``shape`` of ``dtype`` and no voxel data (a few hundred bytes)."""
    header = nib.Nifti1Header()
    header.set_data_shape(tuple(shape))
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    header.set_qform(np.eye(4), code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    return path


@pytest.fixture
def header_only_writer() -> Callable[..., Path]:
    """The :func:`header_only_nifti` helper."""
    return header_only_nifti


@pytest.fixture
def no_voxel_reads(monkeypatch):
    """Make any read of NIfTI voxel data (nibabel's array proxy, MONAI's LoadImage) fail the test.

    A header check must refuse a bad file from its header alone; reading the voxels first is what allocated
    gigabytes for a header declaring 1000^3 voxels.
    """
    from nibabel.arrayproxy import ArrayProxy

    def refuse(*args, **kwargs):
        raise AssertionError("voxel data was read before the header was checked")

    for name in ("__array__", "get_unscaled", "_get_scaled"):
        monkeypatch.setattr(ArrayProxy, name, refuse)
    monkeypatch.setattr("monai.transforms.LoadImage.__call__", refuse)


@pytest.fixture
def make_nnunet_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory of nnU-Net v2 datasets ``tmp_path/<name>``; returns the dataset folder."""

    def make(
        name: str = "Dataset990_Synthetic",
        channels: Sequence[str] = ("CT",),
        labels: dict[str, int] | None = None,
        num_training: int = 3,
        num_test: int = 0,
        test_labels: bool = False,
        shape: Sequence[int] = (12, 10, 8),
        spacing: Sequence[float] = (0.8, 0.8, 2.5),
        seed: int = 0,
    ) -> Path:
        labels = dict(DEFAULT_LABELS if labels is None else labels)
        root = tmp_path / name
        rng = np.random.default_rng(seed)
        splits = [("Tr", f"case_{i:03d}", i) for i in range(num_training)]
        splits += [("Ts", f"test_{i:03d}", i) for i in range(num_test)]
        for split, case_id, index in splits:
            image, label = synthetic_case(shape, index, len(labels), rng)
            for c in range(len(channels)):
                write_nifti(root / f"images{split}" / f"{case_id}_{c:04d}.nii.gz", image + 5.0 * c, spacing)
            if split == "Tr" or test_labels:
                write_nifti(root / f"labels{split}" / f"{case_id}.nii.gz", label, spacing)
        root.mkdir(parents=True, exist_ok=True)
        (root / "imagesTr").mkdir(exist_ok=True)
        (root / "labelsTr").mkdir(exist_ok=True)
        dataset = {
            "channel_names": {str(i): c for i, c in enumerate(channels)},
            "labels": labels,
            "numTraining": num_training,
            "file_ending": ".nii.gz",
            "name": name,
        }
        (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
        return root

    return make


@pytest.fixture
def make_msd_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory of MSD datasets (``modality``, inverted ``labels``, ``training``/``test`` lists); 4D when multi-modal."""

    def make(
        name: str = "Task05_Prostate",
        modalities: Sequence[str] = ("T2", "ADC"),
        labels: dict[str, str] | None = None,
        num_training: int = 2,
        num_test: int = 1,
        shape: Sequence[int] = (10, 9, 6),
        spacing: Sequence[float] = (0.6, 0.6, 3.6),
        seed: int = 0,
    ) -> Path:
        labels = dict(labels or {"0": "background", "1": "PZ", "2": "TZ"})
        root = tmp_path / name
        rng = np.random.default_rng(seed)
        training, test = [], []
        for i in range(num_training + num_test):
            image, label = synthetic_case(shape, i, len(labels), rng)
            if len(modalities) > 1:
                image = np.stack([image + 5.0 * c for c in range(len(modalities))], axis=-1)
            case_id = f"prostate_{i:02d}"
            split = "Tr" if i < num_training else "Ts"
            write_nifti(root / f"images{split}" / f"{case_id}.nii.gz", image, spacing)
            if split == "Tr":
                write_nifti(root / "labelsTr" / f"{case_id}.nii.gz", label, spacing)
                training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
            else:
                test.append(f"./imagesTs/{case_id}.nii.gz")
        dataset = {
            "name": name.split("_", 1)[-1],
            "modality": {str(i): m for i, m in enumerate(modalities)},
            "labels": labels,
            "numTraining": num_training,
            "numTest": num_test,
            "training": training,
            "test": test,
        }
        (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
        return root

    return make
