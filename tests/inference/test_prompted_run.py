"""``medseg predict`` on a promptable run folder: the evaluation's preparation, the file's own grid, world prompts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from omegaconf import OmegaConf

from medseg.config import instantiate
from medseg.errors import ConfigError
from medseg.evaluation.interactive_run import load_native_case
from medseg.inference.cache import EmbeddingCache
from medseg.inference.cases import read_case
from medseg.inference.dense import preprocessing_of
from medseg.inference.loaded import LoadedModel
from medseg.inference.prepared import intensity_transforms, prepare_volume
from medseg.inference.prompted_run import predict_run_prompts
from medseg.inference.propagate import PropagationConfig, propagate
from medseg.inference.recipe import SliceRecipe, slice_predictor
from medseg.prompts.contract import Prompts
from medseg.prompts.files import dump_prompts, load_prompts
from medseg.workflows.models import load_model

# A tiny SAM (2 blocks of width 32 at 64 px), 30 steps: a real promptable run folder, not a good model.
TINY_PROMPTABLE = [
    "experiment=promptable_synthetic",
    "logger=csv",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.max_steps=30",
    "trainer.check_val_every_n_epoch=1000",
    "data.batch_size=1",
    "data.sampling.num_samples=2",
    "data.cache=none",
    "task.num_iterations=2",
    "evaluate=false",
    "seed=0",
]


@pytest.fixture(scope="module")
def promptable_run(one_thread, run_folder_trainer, tmp_path_factory) -> Path:
    """A run folder of ``medseg train experiment=promptable_synthetic`` (checkpoint + ``.hydra/config.yaml``)."""
    root, run_dir = tmp_path_factory.mktemp("promptable_data"), tmp_path_factory.mktemp("promptable_run")
    return run_folder_trainer(TINY_PROMPTABLE, root, run_dir, data_seed=4, shape=(32, 32, 12))


@pytest.fixture(scope="module")
def evaluation_view(promptable_run, phantom_scan):
    """The scan as the run's interactive evaluation sees it (:func:`load_native_case`), with the run's model."""
    run_cfg = OmegaConf.load(promptable_run / ".hydra" / "config.yaml")
    transform = instantiate(run_cfg.data).build_deterministic()  # what evaluate_promptable_model inverts and reads
    path = phantom_scan["path"]
    native = load_native_case("oblique_ct", [path], path, intensity_transforms(transform))  # image as its reference
    to_ras = ornt_transform(io_orientation(phantom_scan["affine"]), axcodes2ornt("RAS"))
    file_axis = int(np.flatnonzero(to_ras[:, 0] == 2)[0])  # the file axis the run's slice axis (RAS 2) comes from
    model = load_model(promptable_run, device="cpu").model
    return SimpleNamespace(native=native, to_ras=to_ras, file_axis=file_axis, model=model, cfg=run_cfg)


def load_prompts_from(data: dict, image) -> list:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.json"
        path.write_text(json.dumps(data))
        return load_prompts(path, np.asarray(image.affine), tuple(image.shape[1:]))


def load_prompts_from_file(path: Path, source: nib.Nifti1Image) -> list:
    return load_prompts(path, source.affine, source.shape)


def _box_in_ras(box: list[int], shape: tuple[int, ...], to_ras: np.ndarray) -> list[int]:
    """A file-order voxel box mapped to the RAS grid by reorienting its mask (independent of the code under test)."""
    mask = np.zeros(shape, dtype=bool)
    mask[box[0] : box[3] + 1, box[1] : box[4] + 1, box[2] : box[5] + 1] = True
    where = np.argwhere(apply_orientation(mask, to_ras))
    return [*where.min(0).tolist(), *where.max(0).tolist()]


def _object_box(label: np.ndarray, axis: int, depth: int | None = None) -> list[int]:
    """Tight box of the phantom's foreground on its fullest slice along ``axis`` (``depth``: that many slices)."""
    counts = (label > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    k = int(counts.argmax())
    where = np.argwhere(np.take(label, k, axis=axis) > 0)
    lo, hi = where.min(0).tolist(), where.max(0).tolist()
    k0, k1 = (k, k) if depth is None else (max(0, k - depth // 2), min(label.shape[axis] - 1, k + depth // 2))
    lo.insert(axis, k0)
    hi.insert(axis, k1)
    return [*lo, *hi]


def test_run_prepares_the_scan_as_its_evaluation_does(evaluation_view, phantom_scan, promptable_run):

    loaded = load_model(promptable_run, device="cpu")
    image = read_case(phantom_scan["path"])
    volume = prepare_volume(image, intensity_transforms(preprocessing_of(loaded)))
    orientation = volume.orientation
    np.testing.assert_array_equal(volume.image, evaluation_view.native.image)
    assert not np.array_equal(volume.image[0], image[0].numpy())  # the run's CT window changed the intensities
    assert orientation.file_axis(2) == evaluation_view.file_axis
    ras = np.arange(np.prod(orientation.native_shape)).reshape(orientation.native_shape)
    np.testing.assert_array_equal(volume.native(apply_orientation(ras, orientation.to_oriented)), ras)  # round trip

    # prompts follow the data: the voxel a prompt names holds the same value on both grids
    label = phantom_scan["label"]
    box = _object_box(label, evaluation_view.file_axis, depth=3)
    point = np.argwhere(label > 0)[7]
    objects = load_prompts_from({"space": "voxel", "objects": [{"label": 2, "boxes": [box], "points": [point.tolist()],
                                                                "point_labels": [1]}]}, image)  # fmt: skip
    (obj,) = objects
    mapped = orientation.prompts(obj.to_prompts())  # the prompt set the path carries, on the RAS grid
    assert mapped.box[0].tolist() == _box_in_ras(box, orientation.native_shape, orientation.to_oriented)
    oriented_ras = apply_orientation(ras, orientation.to_oriented)
    assert oriented_ras[tuple(mapped.point_coords[0, 0].long().tolist())] == ras[tuple(point)]

    # a model that is neither 2-D nor 3-D (a mixed-up run) is refused with a message naming the model configs
    odd = SimpleNamespace(spatial_dims=4)
    with pytest.raises(ConfigError, match="model.spatial_dims is 4.*promptable_2d.*promptable_3d"):
        predict_run_prompts(LoadedModel(odd, "promptable", loaded.config, source="odd run"), image, objects)


def test_2d_box_matches_the_evaluation_predict_fn_on_the_files_grid(
    predict_cli, evaluation_view, phantom_scan, promptable_run, tmp_path
):
    view = evaluation_view
    box = _object_box(phantom_scan["label"], view.file_axis)
    written = predict_cli(promptable_run, phantom_scan["path"], {"space": "voxel", "objects": [{"label": 3,
                       "boxes": [box]}]}, tmp_path / "out")  # fmt: skip
    source = nib.load(phantom_scan["path"])
    assert written.shape == source.shape and written.get_data_dtype() == np.uint8
    assert np.array_equal(written.affine, source.affine)
    assert np.array_equal(written.get_qform(), source.get_qform()) and np.array_equal(
        written.get_sform(), source.get_sform()
    )
    labels = np.asarray(written.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 3}
    off = np.ones(labels.shape, dtype=bool)
    np.moveaxis(off, view.file_axis, 0)[box[view.file_axis]] = False
    assert not labels[off].any()  # a 2-D box segments its slice only

    # the evaluation's predict_fn on the same box, on the RAS grid, brought back to the file's order
    ras_box = _box_in_ras(box, labels.shape, view.to_ras)
    k = ras_box[2]
    predict = slice_predictor(view.model, np.take(view.native.image[0], k, axis=2), EmbeddingCache(), True)
    box_2d = np.array([[ras_box[0], ras_box[1], ras_box[3], ras_box[4]]], dtype=np.float32)
    expected = np.zeros(view.native.label.shape, dtype=np.uint8)
    expected[:, :, k][predict(Prompts(box=box_2d), None)] = 3
    assert (expected > 0).any()  # measured: 24 voxels; an empty mask would make the comparison trivial
    np.testing.assert_array_equal(labels, view.native.native(expected))


def test_3d_box_propagates_inside_its_slices_as_evaluation_propagates(predict_cli, evaluation_view, phantom_scan,
                                                                        promptable_run, tmp_path):  # fmt: skip
    view = evaluation_view
    box = _object_box(phantom_scan["label"], view.file_axis, depth=4)
    labels = np.asarray(predict_cli(promptable_run, phantom_scan["path"], {"space": "voxel", "objects": [{"label": 5,
                        "boxes": [box]}]}, tmp_path / "out").dataobj)  # fmt: skip
    lo, hi = box[view.file_axis], box[view.file_axis + 3]
    outside = np.ones(labels.shape, dtype=bool)
    np.moveaxis(outside, view.file_axis, 0)[lo : hi + 1] = False
    assert not labels[outside].any() and set(np.unique(labels).tolist()) <= {0, 5}

    ras_box = _box_in_ras(box, labels.shape, view.to_ras)
    k0, k1 = ras_box[2], ras_box[5]
    rules = dict(OmegaConf.to_container(view.cfg.task.evaluation, resolve=True).get("propagation") or {})
    result = propagate(
        view.model, view.native.image[0][:, :, k0 : k1 + 1], (k0 + k1) // 2 - k0,
        box=(ras_box[0], ras_box[1], ras_box[3], ras_box[4]), recipe=SliceRecipe("none"),
        config=PropagationConfig(axis=2, **rules),
    )  # fmt: skip
    expected = np.zeros(view.native.label.shape, dtype=np.uint8)
    expected[:, :, k0 : k1 + 1][result.mask] = 5
    assert (expected > 0).any() and result.last > result.first  # measured: 116 voxels on 5 slices
    np.testing.assert_array_equal(labels, view.native.native(expected))


def test_world_prompts_give_the_voxel_prompts_output(
    predict_cli, evaluation_view, phantom_scan, promptable_run, tmp_path
):
    affine = phantom_scan["affine"]
    label = phantom_scan["label"]
    point = np.argwhere(label > 0)[len(np.argwhere(label > 0)) // 2]
    box = _object_box(label, evaluation_view.file_axis, depth=2)
    world_point = (affine @ np.append(point, 1.0))[:3]
    corners = [(affine @ np.append(np.asarray(c, dtype=float), 1.0))[:3] for c in (box[:3], box[3:])]
    world = {"space": "world", "objects": [
        {"label": 1, "points": [world_point.tolist()], "point_labels": [1]},
        {"label": 2, "boxes": [[*corners[0].tolist(), *corners[1].tolist()]]},
    ]}  # fmt: skip
    from_world = np.asarray(predict_cli(promptable_run, phantom_scan["path"], world, tmp_path / "world").dataobj)

    # the same prompts in voxels: the point itself, and the voxel box the world box covers
    source = nib.load(phantom_scan["path"])
    converted = load_prompts_from_file(tmp_path / "world" / "prompts.json", source)
    assert converted[0].points.tolist() == [point.tolist()]
    voxel_file = tmp_path / "voxel.json"
    dump_prompts(converted, voxel_file)
    voxel = json.loads(voxel_file.read_text())
    assert voxel["space"] == "voxel"
    from_voxel = np.asarray(predict_cli(promptable_run, phantom_scan["path"], voxel, tmp_path / "voxel").dataobj)
    np.testing.assert_array_equal(from_world, from_voxel)
    # The box must segment something, or the equality above would be trivial (measured: 150 voxels). The single
    # click's mask depends on how the tiny run happened to train (it was 31 voxels, then empty after the per-sample
    # augmentation seeding changed); its world -> voxel conversion is asserted exactly above.
    assert (from_world == 2).any()
