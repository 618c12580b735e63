"""Zero-shot LiteMedSAM from a prompts file: boxes and points, voxel and world, NIfTI and DICOM, one shared cache.

The real encoder costs seconds per slice on CPU, so every test works on the same 3-slice blob and shares one
embedding cache: only the first test runs the encoder (3 slices); the others must not run it at all, which is itself
the check that a second prompt on the same image skips the encoder.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.data import get_testdata_file

from medseg.data.dicom import write_dicom_series
from medseg.errors import ConfigError
from medseg.inference.cache import EmbeddingCache
from medseg.inference.predictor import PredictOptions, predict_case
from medseg.inference.prompted import recipe_for, segment_objects, window_from_text
from medseg.prompts.files import PromptFileError, parse_prompts
from medseg.prompts.geometry import box_voxel_to_world

AFFINE = np.array([[-0.8, 0, 0, 20.5], [0, -0.9, 0, -7.0], [0, 0, 3.0, -33.0], [0, 0, 0, 1]])  # LPS, anisotropic


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def scene(blob):
    volume, mask = blob(depth=3)
    volume = np.round(volume)  # integer values, as the NIfTI (int16) and DICOM copies store them
    rows, cols = np.nonzero(mask.any(axis=2))
    box = [int(rows.min()), int(cols.min()), 0, int(rows.max()), int(cols.max()), 2]
    return {"volume": volume, "mask": mask, "box": box, "cache": EmbeddingCache()}


def objects_of(document, shape=(64, 64, 3)):
    return parse_prompts(document, AFFINE, shape)


def test_3d_box_propagates_then_a_second_prompt_skips_the_encoder(scene, litemedsam_model, encoder_counter):
    model = litemedsam_model.model
    counter = encoder_counter(model)
    objects = objects_of({"space": "voxel", "objects": [{"label": 3, "boxes": [scene["box"]]}]})
    first = segment_objects(model, scene["volume"], objects, recipe=recipe_for(None), cache=scene["cache"])
    score = dice(first.labels == 3, scene["mask"])
    print(f"3-D box: Dice {score:.4f}, encoded {first.encoded} slices")
    assert first.labels.dtype == np.uint8 and set(np.unique(first.labels)) == {0, 3}
    assert score > 0.8
    assert first.encoded == counter["images"] == 3  # propagation stays inside the box's 3 slices

    # a second object with a 2-D box on slice 1 and a click: every slice is cached, the encoder does not run
    r0, c0, _, r1, c1, _ = scene["box"]
    two = objects_of({"space": "voxel", "objects": [
        {"label": 3, "boxes": [scene["box"]]},
        {"label": 7, "boxes": [[r0, c0, 1, r1, c1, 1]]},
    ]})  # fmt: skip
    second = segment_objects(model, scene["volume"], two, recipe=recipe_for(None), cache=scene["cache"])
    assert second.encoded == 0 and counter["images"] == 3
    assert dice(second.labels[:, :, 1] == 7, scene["mask"][:, :, 1]) > 0.8
    assert not (second.labels[:, :, [0, 2]] == 7).any()  # a 2-D box segments its own slice only
    np.testing.assert_array_equal(second.labels[:, :, [0, 2]], first.labels[:, :, [0, 2]])


class BrightTracker(torch.nn.Module):
    """A stand-in promptable model that segments the bright pixels inside the box (or anywhere, given only points):
    enough to see which slices the prompts and the propagation reach, without LiteMedSAM's cost."""

    image_size = 64

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def encode(self, images):
        return images[:, :1] * self.scale

    def decode(self, embeddings, prompts, multimask=False):
        bright = embeddings > 0.5
        if prompts.box is not None:
            inside = torch.zeros_like(bright)
            i0, j0, i1, j1 = (int(v) for v in prompts.box[0])
            inside[..., i0 : i1 + 1, j0 : j1 + 1] = True
            bright &= inside
        return torch.where(bright, 10.0, -10.0).float(), torch.ones(embeddings.shape[0], 1)


def test_points_alone_propagate_through_the_volume(scene, encoder_counter):
    model = BrightTracker()
    counter = encoder_counter(model)
    objects = objects_of({"space": "voxel", "objects": [
        {"label": 2, "points": [[30, 34, 1], [29, 36, 1], [5, 5, 1], [30, 34, 0]], "point_labels": [1, 1, 0, 1]},
    ]})  # fmt: skip
    result = segment_objects(model, scene["volume"], objects, recipe=recipe_for(None))
    score = dice(result.labels == 2, scene["mask"])
    assert score > 0.9, score
    assert counter["images"] == 3 and result.encoded == 3
    assert (result.labels == 2)[:, :, [0, 2]].any(), "points on a 2-D model must propagate to other slices"
    assert result.ignored and "1 point(s) off slice 1" in result.ignored[0]
    along_rows = segment_objects(model, scene["volume"], objects_of({"space": "voxel", "objects": [
        {"label": 2, "points": [[30, 34, 1]], "point_labels": [1]}]}), slice_axis=0)  # fmt: skip
    assert 3 < counter["images"] < 3 + 64  # slices of (64, 3) pixels along rows, stopping past the blob's ends
    assert dice(along_rows.labels == 2, scene["mask"]) > 0.8


def write_prompts(path, document):
    path.write_text(json.dumps(document))
    return path


def test_world_and_voxel_prompts_give_the_same_masks_on_nifti_and_dicom(scene, litemedsam_model, tmp_path):
    """A world (RAS mm) box hits the same voxels as its voxel box, in the NIfTI file and in a DICOM series (LPS) of
    the same scan; the written label maps have each input's geometry."""
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(scene["volume"].astype(np.int16), AFFINE), nifti)
    series = write_dicom_series(scene["volume"], AFFINE, tmp_path / "scan_dicom")
    r0, c0, _, r1, c1, _ = scene["box"]
    flat = [r0, c0, 1, r1, c1, 1]
    world = box_voxel_to_world(flat, AFFINE).tolist()
    assert world != flat
    voxel_file = write_prompts(tmp_path / "voxel.json", {"space": "voxel", "objects": [{"label": 1, "boxes": [flat]}]})
    world_file = write_prompts(tmp_path / "world.json", {"space": "world", "objects": [{"label": 1, "boxes": [world]}]})
    out = tmp_path / "out"
    cache = scene["cache"]
    predict_case(litemedsam_model, nifti, out / "voxel", voxel_file, cache=cache)
    predict_case(litemedsam_model, nifti, out / "world", world_file, cache=cache)
    predict_case(litemedsam_model, series, out / "dicom", world_file, PredictOptions(output_format="nifti"), cache)
    by_voxel = nib.load(out / "voxel" / "scan.nii.gz")
    by_world = nib.load(out / "world" / "scan.nii.gz")
    from_dicom = nib.load(out / "dicom" / "scan_dicom.nii.gz")
    labels = np.asarray(by_voxel.dataobj)
    assert dice(labels[:, :, 1] == 1, scene["mask"][:, :, 1]) > 0.8 and not labels[:, :, [0, 2]].any()
    np.testing.assert_array_equal(np.asarray(by_world.dataobj), labels)
    np.testing.assert_array_equal(np.asarray(from_dicom.dataobj), labels)
    np.testing.assert_allclose(from_dicom.affine, AFFINE, atol=1e-4)
    np.testing.assert_array_equal(by_voxel.affine, nib.load(nifti).affine)


def test_bad_prompts_fail_before_the_model_runs_and_leave_no_file(scene, litemedsam_model, tmp_path, encoder_counter):
    counter = encoder_counter(litemedsam_model.model)
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(scene["volume"].astype(np.int16), AFFINE), nifti)
    outside = write_prompts(tmp_path / "outside.json", {"space": "voxel", "objects": [
        {"label": 1, "boxes": [[10, 10, 1, 80, 30, 1]]}]})  # fmt: skip
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"space": "voxel", "objects": [{"label": 1, "boxes": [[1, 2, 0, 5, 6, 0]],}]}')
    negative = write_prompts(tmp_path / "negative.json", {"space": "voxel", "objects": [
        {"label": 1, "points": [[3, 3, 1]], "point_labels": [0]}]})  # fmt: skip
    expected = {outside: "outside the volume", malformed: "not valid JSON at line 1", negative: "only negative"}
    for prompts, text in expected.items():
        with pytest.raises(PromptFileError, match=text) as caught:
            predict_case(litemedsam_model, nifti, tmp_path / "out", prompts, cache=scene["cache"])
        assert prompts.name in str(caught.value) or "label 1" in str(caught.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert counter["images"] == 0
    inside = write_prompts(tmp_path / "inside.json", {"space": "voxel", "objects": [
        {"label": 1, "boxes": [[10, 10, 1, 30, 30, 1]]}]})  # fmt: skip
    with pytest.raises(ConfigError, match="tta"):
        predict_case(litemedsam_model, nifti, tmp_path / "out", inside, PredictOptions(tta=True))


def test_window_option():
    assert window_from_text("40:400") == (40.0, 400.0)
    assert window_from_text("lung") == (-600.0, 1500.0)
    assert recipe_for("50:350").window == (50.0, 350.0) and recipe_for("50:350").intensity == "ct"
    assert recipe_for(None).intensity == "mr"
    for bad in ("40", "abc:1", "40:-5", "nope"):
        with pytest.raises(ConfigError, match="window"):
            window_from_text(bad)


def test_disk_cache_lets_a_second_run_skip_the_encoder(scene, encoder_counter, tmp_path):
    from medseg.inference.loaded import LoadedModel
    from medseg.inference.predictor import predict_cases

    model = BrightTracker()
    loaded = LoadedModel(model=model, kind="promptable", source="tracker", extras={"recipe": "litemedsam"})
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(scene["volume"].astype(np.int16), AFFINE), nifti)
    prompts = write_prompts(tmp_path / "p.json", {"space": "voxel", "objects": [{"label": 1, "boxes": [scene["box"]]}]})
    counter = encoder_counter(model)
    first = predict_cases(loaded, nifti, tmp_path / "a", prompts, cache_dir=tmp_path / "cache")
    assert first.ok and counter["images"] == 3
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    second = predict_cases(loaded, nifti, tmp_path / "b", prompts, cache_dir=tmp_path / "cache")  # a new memory cache
    assert second.ok and counter["images"] == 3
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "a" / "scan.nii.gz").dataobj),
        np.asarray(nib.load(tmp_path / "b" / "scan.nii.gz").dataobj),
    )


def test_flat_boxes_are_embedded_in_batches_with_the_same_masks(scene):
    """``batch_size`` slices go through the encoder together (the GPU lever); the masks do not change."""
    r0, c0, _, r1, c1, _ = scene["box"]
    objects = objects_of({"space": "voxel", "objects": [
        {"label": 1, "boxes": [[r0, c0, k, r1, c1, k] for k in (2, 0)]},
        {"label": 2, "boxes": [[r0, c0, 1, r1, c1, 1], [r0, c0, 0, r1, c1, 0]]},
    ]})  # fmt: skip
    results, calls = {}, {}
    for batch_size in (1, 3):
        model = BrightTracker()
        original, sizes = model.encode, []
        model.encode = lambda images, original=original, sizes=sizes: sizes.append(len(images)) or original(images)
        results[batch_size] = segment_objects(model, scene["volume"], objects, batch_size=batch_size)
        calls[batch_size] = sizes
    assert calls == {1: [1, 1, 1], 3: [3]}  # slices 2, 0, 1 once each; slice 0 again from the cache
    np.testing.assert_array_equal(results[3].labels, results[1].labels)
    assert set(np.unique(results[1].labels)) == {0, 1, 2}


def test_a_dicom_series_and_the_nifti_of_the_same_scan_give_the_same_labels(litemedsam_model, tmp_path):
    """A real MR scan (pydicom's emri_small) as a DICOM series stored LPS with slices top-down, and as the NIfTI that
    SimpleITK converts it to, then in RAS order (nibabel's canonical form, as many converters store it): every axis
    of the NIfTI runs the other way. World prompts on the series and voxel prompts on the NIfTI give the same labels
    in world space, and the NIfTI runs no slice through the encoder: the model saw the very same slices. Slicing each
    file as stored gave world Dice 0.70 with the in-plane flips alone, and 0 with the slices reversed too (the box's
    middle slice, where propagation starts, was another slice)."""
    frames = pydicom.dcmread(get_testdata_file("emri_small.dcm")).pixel_array  # (10, 64, 64): frame, row, column
    volume = frames.transpose(2, 1, 0).astype(np.float32)  # as a DICOM series is read: (column, row, slice)
    affine = np.array([[-0.9, 0, 0, 30.0], [0, -0.9, 0, 25.0], [0, 0, -2.0, 10.0], [0, 0, 0, 1]])
    series = write_dicom_series(volume, affine, tmp_path / "scan_dicom", modality="MR")
    sitk.WriteImage(sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series))), tmp_path / "x.nii.gz")
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.as_closest_canonical(nib.load(tmp_path / "x.nii.gz")), nifti)
    stored = nib.load(nifti)
    np.testing.assert_array_equal(np.asarray(stored.dataobj), volume[::-1, ::-1, ::-1])  # every axis reversed

    box = [30, 8, 3, 60, 45, 6]  # the bright ventricle on slices 3-6 (an even count: the middle slice is 4, not 5)
    world = box_voxel_to_world(box, affine).tolist()
    flipped = [63 - box[3], 63 - box[4], 9 - box[5], 63 - box[0], 63 - box[1], 9 - box[2]]
    world_file = write_prompts(tmp_path / "w.json", {"space": "world", "objects": [{"label": 4, "boxes": [world]}]})
    voxel_file = write_prompts(tmp_path / "v.json", {"space": "voxel", "objects": [{"label": 4, "boxes": [flipped]}]})
    cache = EmbeddingCache()
    predict_case(litemedsam_model, series, tmp_path / "dicom", world_file, PredictOptions(output_format="nifti"), cache)
    encoded = cache.misses
    predict_case(litemedsam_model, nifti, tmp_path / "nifti", voxel_file, cache=cache)
    from_dicom = np.asarray(nib.load(tmp_path / "dicom" / "scan_dicom.nii.gz").dataobj)
    from_nifti = np.asarray(nib.load(tmp_path / "nifti" / "scan.nii.gz").dataobj)
    assert cache.misses == encoded > 0  # the NIfTI case encoded nothing: its slices were the DICOM case's
    assert int((from_dicom == 4).sum()) > 200 and not from_dicom[:, :, [0, 1, 2, 7, 8, 9]].any()
    np.testing.assert_array_equal(from_nifti[::-1, ::-1, ::-1], from_dicom)  # the same voxels in world space
