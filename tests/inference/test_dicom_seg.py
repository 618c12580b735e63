"""A DICOM SEG puts every segment pixel where the NIfTI output of the same labels puts the voxel of that label.

Series are written by :func:`medseg.data.dicom.write_dicom_series` (oblique and anisotropic; one with a gantry tilt,
whose slices are sheared; one with the slice axis reversed against the patient axis), read by medseg as predict
reads them, and labelled with several labels, one of them absent. The SEG is read back twice: with pydicom alone
(positions from the per-frame functional groups, so highdicom's own reader is not trusted to check highdicom's
writer) and with highdicom (segments, codes, algorithm, references, pixels per source image).
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medseg.atomic import is_orphan
from medseg.data.dicom import write_dicom_series
from medseg.data.dicom_series import scan_file
from medseg.data.io import load_image
from medseg.errors import ConfigError, ReaderError
from medseg.inference.cases import Case, discover_cases
from medseg.inference.dicom_seg import (
    GENERIC_CODE,
    SegAlgorithm,
    parse_label_codes,
    seg_algorithm,
    source_series,
    write_dicom_seg,
    write_seg_for_case,
)
from medseg.inference.loaded import LoadedModel
from medseg.inference.preflight import OutputError
from medseg.inference.sliding import InferenceError
from medseg.inference.writers import write_label_map

NAMES = {0: "background", 1: "liver", 2: "spleen", 3: "kidney", 5: "tumour"}  # kidney (3) never predicted
CODES = {"liver": {"category": ["123037004", "SCT", "Anatomical Structure"], "type": ["10200004", "SCT", "Liver"]}}


def _rotation(a: float, b: float) -> np.ndarray:
    about_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return about_z @ about_x


def _series(tmp_path: Path, kind: str) -> Path:
    """A 9 x 7 x 6 series: ``oblique`` (rotated, anisotropic), ``reversed`` (slices run feet-ward), or ``tilt``."""
    affine = np.eye(4)
    affine[:3, 3] = [-101.3, 55.7, -300.25]
    if kind == "oblique":
        affine[:3, :3] = _rotation(0.3, 0.2) @ np.diag([0.7, 0.9, 2.5])
    elif kind == "reversed":
        affine[:3, :3] = np.diag([0.8, 0.6, -3.0])
    else:
        affine[:3, :3] = np.diag([0.8, 0.9, 2.0])
    folder = write_dicom_series(np.zeros((9, 7, 6)), affine, tmp_path / kind)
    if kind == "tilt":  # the gantry tilts the image plane about x; the table still moves along z
        tilt = np.deg2rad(15.0)
        for path in sorted(folder.iterdir()):
            ds = pydicom.dcmread(str(path))
            ds.ImageOrientationPatient = ["1", "0", "0", "0", f"{np.cos(tilt):.10f}", f"{-np.sin(tilt):.10f}"]
            ds.GantryDetectorTilt = "15"
            ds.save_as(str(path))
    return folder


def _labels(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice([0, 0, 0, 1, 2, 5], size=shape).astype(np.uint8)


def _world_by_label_from_nifti(path: Path) -> dict[int, np.ndarray]:
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    return {int(v): np.argwhere(data == v) @ image.affine[:3, :3].T + image.affine[:3, 3] for v in np.unique(data) if v}


def _world_by_segment_from_pydicom(path: Path) -> dict[int, np.ndarray]:
    """Every set pixel of every frame at its RAS+ position, from the SEG's functional groups alone."""
    seg = pydicom.dcmread(str(path))
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    between_rows, between_columns = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=float)
    found: dict[int, list[np.ndarray]] = {}
    for frame, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        position = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        identification = group if "SegmentIdentificationSequence" in group else shared  # shared for one segment
        number = int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        rows, columns = np.nonzero(pixels[frame])
        lps = position + np.outer(columns * between_columns, orientation[:3]) + np.outer(rows * between_rows,
                                                                                         orientation[3:])  # fmt: skip
        found.setdefault(number, []).append(lps * [-1.0, -1.0, 1.0])
    return {number: np.concatenate(points) for number, points in found.items()}


def _same_points(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    order_a, order_b = np.lexsort(np.round(a, 3).T), np.lexsort(np.round(b, 3).T)
    np.testing.assert_allclose(a[order_a], b[order_b], atol=1e-3)


@pytest.mark.parametrize("kind", ["oblique", "reversed", "tilt"])
def test_every_segment_pixel_lies_where_the_nifti_output_puts_its_label(tmp_path, kind):
    folder = _series(tmp_path, kind)
    image = load_image(folder)  # as medseg predict reads the case
    labels = _labels(image.shape[1:])
    _, sources = source_series(folder)
    seg = write_dicom_seg(labels, sources, NAMES, tmp_path / "out" / "case.dcm", "m", "1", affine=image.affine)
    nifti = write_label_map(labels, image.affine, tmp_path / "out" / "case.nii.gz")

    expected = _world_by_label_from_nifti(nifti)
    found = _world_by_segment_from_pydicom(seg)
    assert sorted(found) == [1, 2, 4]  # liver, spleen, tumour; kidney (segment 3) has no frame
    for number, value in ((1, 1), (2, 2), (4, 5)):
        _same_points(found[number], expected[value])
    if kind == "tilt":  # the shear is real: the slices step along z, not along the tilted normal
        columns = np.asarray(image.affine)[:3, :3]
        assert abs(float(columns[:, 1] @ columns[:, 2])) > 0.1


def test_highdicom_reads_segments_codes_algorithm_references_and_pixels(tmp_path):
    folder = _series(tmp_path, "oblique")
    image = load_image(folder)
    labels = _labels(image.shape[1:], seed=1)
    labels[:, :, 4] = 0  # a slice without any label: no frame for it
    checked, sources = source_series(folder)
    path = write_dicom_seg(labels, sources, NAMES, tmp_path / "case.dcm", "liver-net", "2.1.0", CODES, affine=None)
    seg = hd.seg.segread(str(path))

    assert [d.segment_label for d in seg.SegmentSequence] == ["liver", "spleen", "kidney", "tumour"]
    liver, spleen = seg.get_segment_description(1), seg.get_segment_description(2)
    assert (liver.segmented_property_type.value, liver.segmented_property_type.meaning) == ("10200004", "Liver")
    assert spleen.segmented_property_type.value == GENERIC_CODE.value  # no code given: the generic one
    algorithm = liver.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("liver-net", "2.1.0")
    assert liver.algorithm_type.value == "AUTOMATIC"
    first = sources[0]
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID and seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID

    uids = [ds.SOPInstanceUID for ds in sources]
    per_source = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    to_number = {0: 0, 1: 1, 2: 2, 3: 3, 5: 4}
    expected = np.vectorize(to_number.get)(labels).transpose(2, 1, 0)
    np.testing.assert_array_equal(per_source, expected)
    with_content = sum(int((labels[:, :, k] == v).any()) for k in range(labels.shape[2]) for v in (1, 2, 5))
    assert int(seg.NumberOfFrames) == with_content  # only frames with content
    assert [ds.filename for ds in sources] == [str(f) for f in checked.files]  # the files load_image stacks


def test_an_empty_label_map_is_still_a_seg_of_every_segment(tmp_path):
    folder = _series(tmp_path, "reversed")
    _, sources = source_series(folder)
    path = write_dicom_seg(np.zeros((9, 7, 6), np.uint8), sources, {1: "liver"}, tmp_path / "e.dcm", "m", "1")
    seg = pydicom.dcmread(str(path))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver"]
    assert not seg.pixel_array.any()


def test_a_single_real_ct_slice_gets_its_seg(tmp_path):
    path = get_testdata_file("CT_small.dcm")
    checked, sources = source_series(path)
    assert checked.files == scan_file(path).files == (Path(path),) and checked.slice_affine is not None
    labels = np.zeros((128, 128, 1), np.uint8)
    labels[40:60, 10:30, 0] = 1
    seg = write_dicom_seg(labels, sources, {1: "lesion"}, tmp_path / "ct.dcm", "m", "1", affine=checked.slice_affine)
    nifti = write_label_map(labels, checked.slice_affine, tmp_path / "ct.nii.gz")
    _same_points(_world_by_segment_from_pydicom(seg)[1], _world_by_label_from_nifti(nifti)[1])


def test_sources_in_another_order_or_on_another_grid_are_refused(tmp_path):
    folder = _series(tmp_path, "oblique")
    image = load_image(folder)
    labels = _labels(image.shape[1:])
    _, sources = source_series(folder)
    target = tmp_path / "out" / "case.dcm"
    with pytest.raises(InferenceError, match="is not slice 0 of the label map") as caught:
        write_dicom_seg(labels, sources[::-1], NAMES, target, "m", "1", affine=image.affine)
    assert "\n" not in str(caught.value)
    with pytest.raises(InferenceError, match="is not slice 3 of the label map"):  # without an affine: uneven steps
        write_dicom_seg(labels, [*sources[:3], sources[4], sources[3], sources[5]], NAMES, target, "m", "1")
    with pytest.raises(InferenceError, match="has 5 slices but 6 source images"):
        write_dicom_seg(labels[:, :, :5], sources, NAMES, target, "m", "1")
    with pytest.raises(InferenceError, match="is 9x7 .* label map's slices are 7x9"):
        write_dicom_seg(labels.transpose(1, 0, 2), sources, NAMES, target, "m", "1")
    del sources[2].FrameOfReferenceUID
    with pytest.raises(ReaderError, match="FrameOfReferenceUID"):
        write_dicom_seg(labels, sources, NAMES, target, "m", "1")
    assert not target.parent.exists() or not any(target.parent.iterdir())


def test_malformed_codes_name_the_entry():
    with pytest.raises(ConfigError, match=r"label_codes\['liver'\]\.type must be \[CodeValue"):
        parse_label_codes({"liver": {"category": ["1", "SCT", "A"], "type": ["10200004", "SCT"]}})
    with pytest.raises(ConfigError, match=r"label_codes\['liver'\] must be"):
        parse_label_codes({"liver": ["10200004", "SCT", "Liver"]})
    dict_form = {"CodeValue": "10200004", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Liver"}
    assert parse_label_codes({"liver": {"category": dict_form, "type": dict_form}})["liver"].type.meaning == "Liver"


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    folder = _series(tmp_path, "reversed")
    _, sources = source_series(folder)

    def fail(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", fail)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"cannot write .*case\.dcm \(No space left on device\)"):
        write_dicom_seg(_labels((9, 7, 6)), sources, NAMES, out / "case.dcm", "m", "1")
    assert [p for p in out.iterdir() if p.name == "case.dcm" or is_orphan(p)] == []


def test_write_seg_for_case_is_what_predict_calls(tmp_path):
    folder = _series(tmp_path, "oblique")
    (case,) = discover_cases(folder)
    image = load_image(folder)
    labels = _labels(image.shape[1:], seed=2)
    loaded = LoadedModel(
        model=None, kind="dense", label_names=NAMES, source="release liver-net 2.1.0 (/x)", weights_id="abc123",
        extras={"name": "liver-net", "version": "2.1.0"},
    )  # fmt: skip
    algorithm = seg_algorithm(loaded, prompted=True, codes=json.loads(json.dumps(CODES)))
    assert algorithm == SegAlgorithm("liver-net", "2.1.0", NAMES, parse_label_codes(CODES), True, "abc123")
    path = write_seg_for_case(case, labels, algorithm, tmp_path / "out", affine=image.affine)
    assert path == tmp_path / "out" / f"{case.name}.dcm"
    seg = hd.seg.segread(str(path))
    assert seg.get_segment_description(1).algorithm_type.value == "SEMIAUTOMATIC"
    assert seg.DeviceSerialNumber == "abc123"
    nifti = tmp_path / "out" / f"{case.name}.nii.gz"
    write_label_map(labels, image.affine, nifti)
    _same_points(_world_by_segment_from_pydicom(path)[4], _world_by_label_from_nifti(nifti)[5])
    with pytest.raises(ConfigError, match="not a DICOM input"):
        write_seg_for_case(Case("x", tmp_path / "x.nii.gz", False), labels, algorithm, tmp_path / "out")


def test_a_single_dicom_slice_is_predicted_and_written_as_seg_and_nifti(litemedsam_model, tmp_path):
    """One .dcm file through predict (LiteMedSAM, a box) to a SEG and a NIfTI that agree voxel for voxel."""
    from medseg.inference.predictor import PredictOptions, predict_case

    path = get_testdata_file("CT_small.dcm")
    prompts = tmp_path / "box.json"
    prompts.write_text('{"space": "voxel", "objects": [{"label": 1, "boxes": [[30, 30, 0, 90, 90, 0]]}]}')
    options = PredictOptions(window="40:400", output_format="both")
    seg, nifti = predict_case(litemedsam_model, path, tmp_path / "out", prompts, options)  # the SEG, then the NIfTI
    assert (seg.name, nifti.name) == ("CT_small.dcm", "CT_small.nii.gz")
    labels = np.asarray(nib.load(str(nifti)).dataobj)
    assert labels.shape == (128, 128, 1) and (labels == 1).any()
    _same_points(_world_by_segment_from_pydicom(seg)[1], _world_by_label_from_nifti(nifti)[1])
