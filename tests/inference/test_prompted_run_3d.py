"""``medseg predict`` on a 3-D promptable run: the 3-D evaluation's preparation, the file's grid, world boxes.

The run is a tiny volumetric SAM trained for a few steps: these tests check plumbing and geometry (what predict
gives equals what the evaluation's ``volume_predictor`` gives for the same prompt), not accuracy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from omegaconf import OmegaConf

from medseg.config import instantiate
from medseg.data.transforms import target_spacing
from medseg.evaluation.interactive_run import load_native_case
from medseg.inference.cases import read_case
from medseg.inference.prepared import intensity_transforms, model_grid
from medseg.inference.recipe import minmax_per_image
from medseg.inference.volumetric import volume_predictor
from medseg.prompts.contract import Prompts
from medseg.prompts.files import load_prompts
from medseg.workflows.models import load_model

# The 3-D smoke experiment (2 ViT blocks of width 32, roi 32 x 32 x 16, target spacing 1.5 x 1.5 x 3 mm), 10 steps.
TINY_PROMPTABLE_3D = [
    "experiment=promptable_synthetic_3d",
    "logger=csv",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.max_steps=10",
    "trainer.check_val_every_n_epoch=1000",
    "data.batch_size=1",
    "data.sampling.num_samples=1",
    "data.cache=none",
    "task.num_iterations=2",
    "evaluate=false",
    "seed=0",
]
LABEL = 3


@pytest.fixture(scope="module")
def run_3d(one_thread, run_folder_trainer, tmp_path_factory) -> Path:
    """A run folder of ``medseg train experiment=promptable_synthetic_3d`` (checkpoint + ``.hydra/config.yaml``)."""
    root, run_dir = tmp_path_factory.mktemp("promptable_3d_data"), tmp_path_factory.mktemp("promptable_3d_run")
    return run_folder_trainer(TINY_PROMPTABLE_3D, root, run_dir, data_seed=6, shape=(48, 48, 24))


def _tight_box(label: np.ndarray) -> list[int]:
    where = np.argwhere(label > 0)
    return [*where.min(0).tolist(), *where.max(0).tolist()]


def _evaluation_labels(run: Path, path: Path, box: list[int]) -> np.ndarray:
    """The label map ``evaluate_case_3d`` paints for one object prompted by ``box`` (file order), in file order.

    Built from the evaluation's own pieces (its datamodule's transforms and target spacing, ``load_native_case``,
    ``volume_predictor``); the box goes to the RAS grid by reorienting its mask, independently of the code under test.
    """
    run_cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    datamodule = instantiate(run_cfg.data)
    datamodule.setup("test")  # as evaluate_promptable_model: its deterministic transform and target spacing
    transform = datamodule.deterministic_transform
    native = load_native_case("oblique_ct", [path], path, intensity_transforms(transform))  # image as its reference
    model = load_model(run, device="cpu").model
    volume = minmax_per_image(torch.from_numpy(native.image).float()[None])[0]
    shape = model_grid(native.label.shape, native.spacing, target_spacing(datamodule))
    assert shape != native.label.shape  # the run resamples: the zoom to its spacing is exercised
    predict = volume_predictor(model, volume, shape, float(run_cfg.task.inference.overlap))
    mask = np.zeros(nib.load(path).shape, dtype=bool)
    mask[box[0] : box[3] + 1, box[1] : box[4] + 1, box[2] : box[5] + 1] = True
    to_ras = ornt_transform(io_orientation(nib.load(path).affine), axcodes2ornt("RAS"))
    ras_box = np.argwhere(apply_orientation(mask, to_ras))
    prompts = Prompts(box=np.asarray([[*ras_box.min(0), *ras_box.max(0)]], dtype=np.float32))
    with torch.no_grad():
        labels = np.where((predict(prompts, None) > 0.5).numpy(), LABEL, 0)
    return native.native(labels)


def test_3d_run_voxel_box_writes_the_evaluations_mask_on_the_files_grid(predict_cli, run_3d, phantom_scan, tmp_path):
    path = phantom_scan["path"]
    box = _tight_box(phantom_scan["label"])
    started = time.perf_counter()
    written = predict_cli(
        run_3d, path, {"space": "voxel", "objects": [{"label": LABEL, "boxes": [box]}]}, tmp_path / "v"
    )
    seconds = time.perf_counter() - started
    source = nib.load(path)
    assert written.shape == source.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(written.affine, source.affine)
    for mine, theirs in ((written.get_qform(coded=True), source.get_qform(coded=True)),
                         (written.get_sform(coded=True), source.get_sform(coded=True))):  # fmt: skip
        np.testing.assert_allclose(mine[0], theirs[0], atol=1e-5)
        assert int(mine[1]) == int(theirs[1])
    labels = np.asarray(written.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, LABEL}
    expected = _evaluation_labels(run_3d, path, box)
    np.testing.assert_array_equal(labels, expected)  # predict and evaluate agree voxel for voxel
    assert 0 < (labels > 0).sum() < labels.size  # measured 897 of 10800 voxels (seeded): a real mask, not empty
    assert seconds < 60, seconds


def test_3d_run_world_box_gives_the_voxel_box_it_converts_to(predict_cli, run_3d, phantom_scan, tmp_path):
    path = phantom_scan["path"]
    affine = nib.load(path).affine
    box = _tight_box(phantom_scan["label"])
    corners = (affine @ np.array([[*box[:3], 1.0], [*box[3:], 1.0]]).T).T[:, :3]
    world = {"space": "world", "objects": [{"label": LABEL, "boxes": [[*corners.min(0), *corners.max(0)]]}]}
    world = json.loads(json.dumps(world, default=float))
    (tmp_path / "w.json").write_text(json.dumps(world))
    image = read_case(path)
    (converted,) = load_prompts(tmp_path / "w.json", np.asarray(image.affine), tuple(image.shape[1:]))
    voxel_box = converted.boxes[0].tolist()
    lo, hi = np.asarray(voxel_box[:3]), np.asarray(voxel_box[3:])
    assert (lo <= np.asarray(box[:3])).all() and (hi >= np.asarray(box[3:])).all()  # covers the world corners
    by_world = np.asarray(predict_cli(run_3d, path, world, tmp_path / "w").dataobj)
    voxel = {"space": "voxel", "objects": [{"label": LABEL, "boxes": [voxel_box]}]}
    by_voxel = np.asarray(predict_cli(run_3d, path, voxel, tmp_path / "v").dataobj)
    np.testing.assert_array_equal(by_world, by_voxel)


def test_3d_run_paints_objects_in_order_and_takes_points(predict_cli, run_3d, phantom_scan, tmp_path):
    path = phantom_scan["path"]
    label = phantom_scan["label"]
    box = _tight_box(label)
    point = np.argwhere(label > 0)[len(np.argwhere(label > 0)) // 2].tolist()
    first = {"label": 1, "boxes": [box]}
    second = {"label": 2, "points": [point], "point_labels": [1]}  # a click alone: no box
    alone = [np.asarray(predict_cli(run_3d, path, {"space": "voxel", "objects": [o]}, tmp_path / str(i)).dataobj)
             for i, o in enumerate((first, second))]  # fmt: skip
    both = np.asarray(predict_cli(run_3d, path, {"space": "voxel", "objects": [first, second]}, tmp_path / "b").dataobj)
    assert (alone[0] > 0).any() and (alone[1] > 0).any()
    np.testing.assert_array_equal(both, np.where(alone[1] > 0, 2, alone[0]))  # the later object wins
