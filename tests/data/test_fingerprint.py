"""Dataset fingerprint: RAS geometry medians, foreground intensity statistics, label counts, caching, summary."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from medseg.data import fingerprint as fingerprint_module
from medseg.data.fingerprint import (
    CACHE_NAME,
    Fingerprint,
    compute_fingerprint,
    load_or_compute_fingerprint,
    print_dataset_summary,
    ras_spacing_and_shape,
)
from medseg.data.formats import load_dataset_info, write_dataset_json
from medseg.errors import DatasetError

# Three cases with known RAS geometry. Case b stores the same grid as case a with axes 0 and 2 swapped (axis 0 runs
# along z), case c is flipped left-right and front-back (LPS-like). Without reorientation the medians would differ.
_CASES = {
    "a": ((10, 12, 14), np.diag([1.0, 2.0, 3.0, 1.0])),
    "b": ((14, 12, 10), np.array([[0, 0, 1.0, 0], [0, 2.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])),
    "c": ((8, 8, 8), np.diag([-1.5, -2.0, 4.0, 1.0])),
}


@pytest.fixture
def geometry_dataset(tmp_path, nifti_writer):
    root = tmp_path / "Dataset995_Geometry"
    rng = np.random.default_rng(1)
    for case_id, (shape, affine) in _CASES.items():
        label = np.zeros(shape, np.uint8)
        label[2:6, 2:6, 2:6] = 1
        label[3:5, 3:5, 3:5] = 2
        image = rng.normal(50.0, 20.0, size=shape).astype(np.float32)
        nifti_writer(root / "imagesTr" / f"{case_id}_0000.nii.gz", image, affine=affine)
        nifti_writer(root / "labelsTr" / f"{case_id}.nii.gz", label, affine=affine)
    write_dataset_json(root, {0: "MRI"}, {"background": 0, "x": 1, "y": 2}, len(_CASES))
    return load_dataset_info(root)


def _foreground(info, channel=0):
    """Foreground voxels of one channel over all training cases, read independently with nibabel."""
    values = []
    for case in info.training:
        label = np.asanyarray(nib.load(str(case.label)).dataobj)
        if len(case.images) == 1 and info.num_channels > 1:
            image = np.asanyarray(nib.load(str(case.images[0])).dataobj)[..., channel]
        else:
            image = np.asanyarray(nib.load(str(case.images[channel])).dataobj)
        values.append(image[label > 0].astype(np.float64))
    return np.concatenate(values)


def test_median_spacing_and_shape_after_reorientation(geometry_dataset):
    fingerprint = compute_fingerprint(geometry_dataset)
    assert fingerprint.num_cases == 3
    assert fingerprint.spacings == [(1.0, 2.0, 3.0), (1.0, 2.0, 3.0), (1.5, 2.0, 4.0)]
    assert fingerprint.shapes == [(10, 12, 14), (10, 12, 14), (8, 8, 8)]
    assert fingerprint.median_spacing == (1.0, 2.0, 3.0)
    assert fingerprint.median_shape == (10, 12, 14)


def test_ras_geometry_matches_nibabel_as_closest_canonical(geometry_dataset):
    for case in geometry_dataset.training:
        image = nib.load(str(case.images[0]))
        canonical = nib.as_closest_canonical(image)
        spacing, shape = ras_spacing_and_shape(image.affine, image.shape)
        np.testing.assert_allclose(spacing, canonical.header.get_zooms()[:3], rtol=1e-6)
        assert shape == canonical.shape


def test_label_voxel_counts(geometry_dataset):
    fingerprint = compute_fingerprint(geometry_dataset)
    expected = {0: 0, 1: 0, 2: 0}
    for case in geometry_dataset.training:
        values, counts = np.unique(np.asanyarray(nib.load(str(case.label)).dataobj), return_counts=True)
        for v, n in zip(values, counts):
            expected[int(v)] += int(n)
    assert fingerprint.label_voxels == expected
    assert fingerprint.label_voxels[2] == 3 * 8


def test_intensity_equals_numpy_when_all_foreground_fits(geometry_dataset):
    fingerprint = compute_fingerprint(geometry_dataset, max_samples_per_case=10_000)
    values = _foreground(geometry_dataset)
    stats = fingerprint.intensity[0]
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-9)
    assert stats["p00_5"] == pytest.approx(np.percentile(values, 0.5), rel=1e-9)
    assert stats["p99_5"] == pytest.approx(np.percentile(values, 99.5), rel=1e-9)
    assert stats["median"] == pytest.approx(np.median(values), rel=1e-9)
    assert (stats["min"], stats["max"]) == (pytest.approx(values.min()), pytest.approx(values.max()))


def test_sampled_intensity_is_close_seeded_and_keeps_exact_extremes(make_nnunet_dataset):
    info = load_dataset_info(make_nnunet_dataset(num_training=3, shape=(30, 30, 20)))
    values = _foreground(info)
    first = compute_fingerprint(info, max_samples_per_case=2_000, seed=0).intensity[0]
    again = compute_fingerprint(info, max_samples_per_case=2_000, seed=0).intensity[0]
    other = compute_fingerprint(info, max_samples_per_case=2_000, seed=1).intensity[0]
    assert values.size > 3 * 2_000  # sampling really happens
    assert first == again and first != other
    assert first["mean"] == pytest.approx(values.mean(), rel=0.02)
    assert first["std"] == pytest.approx(values.std(), rel=0.05)
    assert first["min"] == pytest.approx(values.min()) and first["max"] == pytest.approx(values.max())


def test_msd_4d_channels_have_their_own_statistics(make_msd_dataset):
    info = load_dataset_info(make_msd_dataset(modalities=("T2", "ADC")))
    intensity = compute_fingerprint(info).intensity
    assert sorted(intensity) == [0, 1]
    for channel in (0, 1):
        assert intensity[channel]["mean"] == pytest.approx(_foreground(info, channel).mean(), rel=1e-6)
    assert intensity[1]["mean"] - intensity[0]["mean"] == pytest.approx(5.0, abs=1e-3)  # the factory's offset


def test_json_roundtrip(geometry_dataset, tmp_path):
    fingerprint = compute_fingerprint(geometry_dataset)
    data = fingerprint.to_json(tmp_path / "fp.json")
    assert json.loads(json.dumps(data)) == data
    assert Fingerprint.from_json(data) == fingerprint
    assert Fingerprint.from_json(tmp_path / "fp.json") == fingerprint


def test_cache_is_used_then_invalidated_by_a_changed_file(geometry_dataset, monkeypatch):
    first = load_or_compute_fingerprint(geometry_dataset)
    cache = geometry_dataset.root / CACHE_NAME
    assert cache.is_file()

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although nothing changed")

    monkeypatch.setattr(fingerprint_module, "compute_fingerprint", fail)
    assert load_or_compute_fingerprint(geometry_dataset) == first
    monkeypatch.undo()

    label_path = geometry_dataset.training[0].label
    label = nib.load(str(label_path))
    data = np.asanyarray(label.dataobj).copy()
    data[0, 0, 0] = 2
    nib.save(nib.Nifti1Image(data, label.affine), str(label_path))
    stat = label_path.stat()
    os.utime(label_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    second = load_or_compute_fingerprint(geometry_dataset)
    assert second.label_voxels[2] == first.label_voxels[2] + 1
    assert Fingerprint.from_json(json.loads(cache.read_text())["fingerprint"]) == second


def test_incomplete_case_raises_pointing_to_validate(geometry_dataset):
    geometry_dataset.training[1].label.unlink()
    with pytest.raises(DatasetError, match="medseg validate"):
        compute_fingerprint(load_dataset_info(geometry_dataset.root))


def test_summary_is_readable(geometry_dataset):
    from rich.console import Console

    fingerprint = compute_fingerprint(geometry_dataset)
    console = Console(record=True, width=140)
    print_dataset_summary(geometry_dataset, fingerprint, console=console)
    text = console.export_text()
    total = sum(fingerprint.label_voxels.values())
    assert "Dataset995_Geometry" in text and "nnunetv2" in text and "0 MRI" in text
    assert f"2 y: {100 * 24 / total:.2f} % of voxels" in text
    assert "3 training, 0 test" in text
    assert "10 × 12 × 14 voxels" in text and "1 × 2 × 3 mm" in text
    assert f"{fingerprint.intensity[0]['p99_5']:.4g}" in text
