"""Prompts file -> label map with SAM 2 memory (``medseg.inference.sam2_run``), and ``medseg predict`` with an
official-layout SAM 2 checkpoint file written by the test.

No SAM 2 weights can be downloaded here: models are the ``sam2`` architecture with random weights (the object-presence
head's bias raised so that masks are not blanked), so every assertion is on mechanics: which slices an object
reaches, geometry, labels and files, never on segmentation quality.
"""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.backbones.sam2 import build_sam2_components
from medseg.backbones.sam2_configs import MISSING_EXTRA, SAM2_MODELS, require_sam2
from medseg.errors import ConfigError
from medseg.inference.predictor import PredictOptions, predict_cases
from medseg.inference.propagate import PropagationConfig
from medseg.inference.recipe import SliceRecipe
from medseg.inference.sam2_run import segment_objects_sam2, tracker_plans
from medseg.inference.sources import load_sam2_file
from medseg.prompts.files import ObjectPrompts, PromptFileError

try:
    require_sam2()
except ConfigError:
    pytest.skip(MISSING_EXTRA, allow_module_level=True)

TINY = {"embed_dim": 16, "stages": [1, 1, 2, 1], "global_att_blocks": [3], "num_heads": 1}
NO_RULES = PropagationConfig(min_iou=None, min_area=None, max_area=None)


def present(model: torch.nn.Module) -> torch.nn.Module:
    """Random SAM 2.1 weights blank every mask through the occlusion head; declare the object present."""
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    return model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return present(build_sam2_components("sam2_hiera_t", pretrained=False, img_size=64, arch=TINY).model.eval())


@pytest.fixture(scope="module")
def tube() -> np.ndarray:
    """``(36, 40, 8)`` MR-like volume (slices along the last axis): a bright disc drifting along ``j``."""
    rng = np.random.default_rng(1)
    volume = rng.normal(100, 10, (36, 40, 8)).astype(np.float32)
    ii, jj = np.mgrid[:36, :40]
    for k in range(8):
        volume[..., k][(ii - 18) ** 2 + (jj - 16 - k) ** 2 < 64] = 400
    return volume


def obj(label: int, boxes=(), points=(), point_labels=()) -> ObjectPrompts:
    return ObjectPrompts(
        label, np.asarray(boxes, np.float32).reshape(-1, 6), np.asarray(points, np.float32).reshape(-1, 3),
        np.asarray(point_labels, np.int64),
    )  # fmt: skip


def test_tracker_plans_put_an_objects_slices_into_one_memory():
    two_boxes = obj(3, [[2, 2, 1, 9, 9, 1], [3, 3, 6, 8, 8, 6]], [[5, 5, 4], [6, 6, 6]], [1, 0]).to_prompts()
    [(slices, lo, hi)] = tracker_plans(two_boxes, axis=2, depth=8)
    assert list(slices) == [1, 6, 4] and (lo, hi) == (0, 7)  # the first box's slice leads
    assert slices[6].box.tolist() == [[3, 3, 8, 8]] and slices[6].point_coords.tolist() == [[[6, 6]]]
    assert slices[4].box is None and slices[4].point_labels.tolist() == [[1]]

    box3d = obj(1, [[2, 2, 1, 9, 9, 5]], [[5, 5, 2], [5, 5, 7]], [1, 1]).to_prompts()
    [(slices, lo, hi)] = tracker_plans(box3d, axis=2, depth=8)
    assert list(slices) == [3, 2] and (lo, hi) == (1, 5)  # the box's middle slice; a click outside it is not used

    clicks = obj(2, points=[[1, 1, 5], [2, 2, 5], [3, 3, 0]], point_labels=[1, 1, 1]).to_prompts()
    [(slices, _, _)] = tracker_plans(clicks, axis=2, depth=8)
    assert list(slices) == [5, 0]  # most positive clicks lead
    with pytest.raises(PromptFileError, match="only negative points"):
        tracker_plans(obj(4, points=[[1, 1, 1]], point_labels=[0]).to_prompts(), axis=2, depth=8)


def test_a_key_slice_box_reaches_the_volume_and_a_3d_box_stays_in_its_slices(model, tube):
    flat = obj(2, [[10, 8, 4, 26, 30, 4]])
    result = segment_objects_sam2(model, tube, [flat], recipe=SliceRecipe("mr"), propagation=NO_RULES)
    assert result.labels.shape == tube.shape and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) == {0, 2}
    assert all(result.labels[..., k].any() for k in range(8)) and result.encoded == 8

    boxed = obj(5, [[10, 8, 2, 26, 30, 5]])
    result = segment_objects_sam2(model, tube, [boxed], recipe=SliceRecipe("mr"), propagation=NO_RULES)
    reached = [k for k in range(8) if result.labels[..., k].any()]
    assert reached == [2, 3, 4, 5] and result.encoded <= 4 + 3  # look-ahead never leaves the box by more than a batch


def test_mni_volume_from_one_slices_box(model):
    """The real MNI152 2009a template (nilearn, offline) from one axial slice's box through a 3-D box's slice range.

    Random tiny weights: the assertion is on mechanics (the slices reached, the label map's geometry, no crash), not
    on how well the brain is segmented.
    """
    from nilearn.datasets import load_mni152_template

    volume = np.asarray(load_mni152_template(resolution=2).get_fdata(), dtype=np.float32)
    k = volume.shape[2] // 2
    rows, cols = np.nonzero(volume[..., k] > 0.3 * volume.max())
    box = [rows.min(), cols.min(), k - 3, rows.max(), cols.max(), k + 3]
    config = PropagationConfig(min_iou=0.5)
    result = segment_objects_sam2(model, volume, [obj(1, [box])], recipe=SliceRecipe("mr"), propagation=config)
    assert result.labels.shape == volume.shape
    reached = [z for z in range(volume.shape[2]) if result.labels[..., z].any()]
    assert k in reached and reached == list(range(reached[0], reached[-1] + 1)) and k - 3 <= reached[0] <= k + 3
    assert k - 3 <= reached[-1] <= k + 3 and result.encoded <= 7 + 3


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A Hiera-T SAM2Base saved in the official layout (``{"model": state_dict}``), named as MedSAM2's file."""
    torch.manual_seed(0)
    model = present(build_sam2_components("medsam2", pretrained=False, img_size=128).model)
    path = tmp_path_factory.mktemp("weights") / "MedSAM2_latest.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture
def small_medsam2(monkeypatch):
    """MedSAM2 run at 128 px instead of 512 (CPU time); the file's layout and its strict loading are the official."""
    monkeypatch.setitem(SAM2_MODELS, "medsam2", replace(SAM2_MODELS["medsam2"], image_size=128))


def scan(tmp_path, volume: np.ndarray) -> str:
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), path)
    return str(path)


def test_predict_writes_a_label_map_with_an_official_file(official_file, small_medsam2, tube, tmp_path):
    loaded = load_sam2_file(official_file, "cpu")
    assert loaded.kind == "promptable" and loaded.extras["sam2"] == "medsam2" and loaded.model.image_size == 128
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"space": "voxel", "objects": [{"label": 3, "boxes": [[10, 8, 3, 26, 30, 3]]}]}))
    source = scan(tmp_path, tube[..., :5])
    report = predict_cases(loaded, source, tmp_path / "out", prompts, PredictOptions(precision="fp32"))
    assert not report.failed
    written = nib.load(tmp_path / "out" / "case.nii.gz")
    labels = np.asarray(written.dataobj)
    assert labels.shape == (36, 40, 5) and set(np.unique(labels)) <= {0, 3} and labels[..., 3].any()
    assert np.allclose(written.affine, nib.load(source).affine)


def test_predict_cli_with_an_official_file(official_file, small_medsam2, tube, tmp_path, capsys):
    from medseg.cli import main

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"space": "voxel", "objects": [{"label": 1, "boxes": [[10, 8, 2, 26, 30, 2]]}]}))
    source = scan(tmp_path, tube[..., :4])
    code = main(["predict", "-m", str(official_file), "-i", source, "-o", str(tmp_path / "out"),
                 "--prompts", str(prompts), "--device", "cpu", "--no-progress"])  # fmt: skip
    assert code == 0 and "medsam2 (MedSAM2_latest.pt" in capsys.readouterr().out
    labels = np.asarray(nib.load(tmp_path / "out" / "case.nii.gz").dataobj)
    assert labels.shape == (36, 40, 4) and labels[..., 2].any()


def test_sam2_prompts_refuse_multichannel_images(official_file, small_medsam2):
    from monai.data import MetaTensor

    from medseg.errors import InputShapeError
    from medseg.inference.sam2_run import predict_sam2_prompts

    loaded = load_sam2_file(official_file, "cpu")
    with pytest.raises(InputShapeError, match="one-channel volumes"):
        predict_sam2_prompts(loaded, MetaTensor(torch.zeros(2, 4, 4, 4)), [obj(1, [[0, 0, 1, 3, 3, 1]])])


class Sam2Holder(torch.nn.Module):
    """What a fine-tuned SAM 2 run's model is to prediction: a module holding the ``SAM2Base`` as ``sam2``."""

    def __init__(self, sam2: torch.nn.Module) -> None:
        super().__init__()
        self.sam2 = sam2


def test_a_fine_tuned_run_predicts_on_its_ras_grid_and_returns_the_files_order(model, tube):
    """A run's volume is reoriented to RAS (flips here: an LPS affine) and its labels come back in the file's order."""
    from monai.data import MetaTensor
    from omegaconf import OmegaConf

    from medseg.inference.loaded import LoadedModel
    from medseg.inference.sam2_run import predict_sam2_prompts

    rules = {"min_iou": None, "min_area": None, "max_area": None}
    config = {"data": {"preprocess": [], "num_channels": 1}, "task": {"inference": {"slice_axis": 2}}}
    config["task"]["evaluation"] = {"propagation": rules}
    loaded = LoadedModel(Sam2Holder(model), "promptable", OmegaConf.create(config), source="sam2 run")
    image = MetaTensor(torch.from_numpy(tube[None, ..., :5]), affine=torch.diag(torch.tensor([-1.5, -1.5, 3.0, 1.0])))
    result = predict_sam2_prompts(loaded, image, [obj(4, [[10, 8, 2, 26, 30, 2]])], slice_axis=0)
    assert len(result.ignored) == 1 and result.ignored[0].startswith("--slice-axis 0 not used")
    flipped = np.flip(tube[..., :5], (0, 1))
    box = [36 - 1 - 26, 40 - 1 - 30, 2, 36 - 1 - 10, 40 - 1 - 8, 2]  # the same box on the RAS grid
    direct = segment_objects_sam2(model, flipped, [obj(4, [box])], recipe=SliceRecipe("none"), propagation=NO_RULES)
    assert np.array_equal(result.labels, np.flip(direct.labels, (0, 1))) and result.labels[..., 2].any()


def test_an_official_file_gives_a_scan_the_same_masks_in_any_array_order(official_file, small_medsam2, tube):
    """The official path slices the RAS-oriented grid: a file and its flipped (LPS) copy agree voxel for voxel."""
    from monai.data import MetaTensor

    from medseg.inference.sam2_run import predict_sam2_prompts

    loaded = load_sam2_file(official_file, "cpu")
    volume = tube[..., :5]
    ras = MetaTensor(torch.from_numpy(volume[None].copy()), affine=torch.diag(torch.tensor([1.5, 1.5, 3.0, 1.0])))
    lps_affine = torch.diag(torch.tensor([-1.5, -1.5, 3.0, 1.0]))
    lps_affine[:2, 3] = torch.tensor([35 * 1.5, 39 * 1.5])  # the same world position for every voxel
    lps = MetaTensor(torch.from_numpy(np.flip(volume, (0, 1))[None].copy()), affine=lps_affine)
    box = [10, 8, 2, 26, 30, 2]
    flipped_box = [35 - 26, 39 - 30, 2, 35 - 10, 39 - 8, 2]
    first = predict_sam2_prompts(loaded, ras, [obj(2, [box])]).labels
    second = predict_sam2_prompts(loaded, lps, [obj(2, [flipped_box])]).labels
    assert first[..., 2].any() and np.array_equal(first, np.flip(second, (0, 1)))
