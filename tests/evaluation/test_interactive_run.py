"""Native-grid interactive evaluation: RAS reorientation without interpolation, settings, summary completeness."""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.data.prepare import synthetic
from medseg.errors import ConfigError
from medseg.evaluation import build_summary, write_summary
from medseg.evaluation.interactive import dice, summarize_interactive
from medseg.evaluation.interactive_run import InteractiveSettings, evaluate_case_3d, load_native_case, volume_predictor
from medseg.evaluation.metrics import EvaluationError
from medseg.evaluation.summary import interactive_per_case, is_complete
from medseg.inference.volumetric import window_starts
from medseg.prompts.contract import Prompts


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = synthetic.build(tmp_path_factory.mktemp("phantoms"), seed=1, num_train=1, num_test=2, shape=(20, 16, 8))
    return sorted((root / "imagesTs").glob("*_0000.nii.gz")), root / "labelsTs"


def test_native_case_is_the_files_voxels_in_ras_order_and_back(phantoms):
    images, labels = phantoms
    seen = set()
    for image in images:
        case_id = image.name[: -len("_0000.nii.gz")]
        reference = labels / f"{case_id}.nii.gz"
        case = load_native_case(case_id, [image], reference)
        source = nib.load(reference)
        canonical = nib.as_closest_canonical(source)
        seen.add(nib.aff2axcodes(source.affine))
        assert np.array_equal(case.label, np.asarray(canonical.dataobj).round().astype(np.int64))  # no interpolation
        np.testing.assert_allclose(case.spacing, canonical.header.get_zooms()[:3], rtol=1e-5)
        assert np.array_equal(case.native(case.label), np.asarray(source.dataobj).round())  # back to the file's order
        assert case.image.shape == (1, *case.label.shape)
    assert ("R", "A", "S") in seen and len(seen) == 2  # one RAS and one reoriented (LPS) test case


def test_settings_reject_unknown_keys_and_impossible_k():
    assert InteractiveSettings.from_mapping({"max_clicks": 5, "dice_k": 5}).max_clicks == 5
    with pytest.raises(ConfigError, match="max_click"):
        InteractiveSettings.from_mapping({"max_click": 5})
    with pytest.raises(ConfigError, match="dice_k"):
        InteractiveSettings.from_mapping({"max_clicks": 3, "dice_k": 5})


def test_summary_with_an_interactive_section_is_complete_only_when_it_covers_every_case(tmp_path):
    labels = {"background": 0, "liver": 1}
    metrics = {"liver": {"dice": 0.5, "hd95": 3.0, "nsd": 0.4, "n_ref": 10, "n_pred": 12}}
    per_case = [{"case_id": c, "metrics": metrics} for c in ("a", "b")]
    obj = {"class": "liver", "component": None, "dice_at_k": [0.4, 0.8], "noc85": 3, "noc90": 3, "box_dice": 0.6}
    full = summarize_interactive({"a": [obj], "b": [dict(obj, dice_at_k=[0.6, 0.9])]}, max_clicks=3)
    path = write_summary(tmp_path / "summary.json", build_summary(per_case, labels, {"interactive": full}))
    assert is_complete(path)
    table = interactive_per_case(build_summary(per_case, labels, {"interactive": full}))
    assert table["b"]["dice_at_k"] == [0.6, 0.9] and table["a"]["noc85"] == 3
    partial = summarize_interactive({"a": [obj]}, max_clicks=3)
    path = write_summary(tmp_path / "partial.json", build_summary(per_case, labels, {"interactive": partial}))
    assert not is_complete(path)
    with pytest.raises(EvaluationError, match="interactive"):
        interactive_per_case(build_summary(per_case, labels))


class _BoxEcho(torch.nn.Module):
    """A 3-D 'model' whose mask is its (window-clipped) box prompt, or a blob of 3 voxels around each positive click."""

    spatial_dims = 3
    roi_size = (8, 8, 4)

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.encodes = 0

    def encode(self, window):
        self.encodes += 1
        return SimpleNamespace(
            image=window, expand=lambda n: SimpleNamespace(image=window.expand(n, *window.shape[1:]))
        )

    def decode(self, embeddings, prompts, multimask=False):
        n = prompts.batch_size
        logits = torch.full((n, 1, *self.roi_size), -10.0)
        for b in range(n):
            if prompts.box is not None:
                lo, hi = prompts.box[b, :3].long(), prompts.box[b, 3:].long()
                logits[b, 0, lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = 10.0
            if prompts.point_coords is not None:
                for c, lab in zip(prompts.point_coords[b].round().long(), prompts.point_labels[b]):
                    if lab == 1:
                        logits[b, 0, c[0] - 1 : c[0] + 2, c[1] - 1 : c[1] + 2, c[2] - 1 : c[2] + 2] = 10.0
        return logits, torch.ones(n, 1)


def test_3d_predictor_maps_prompts_through_windows_and_zoom_and_encodes_each_window_once():
    model = _BoxEcho()
    volume = torch.rand(1, 20, 12, 10)
    box = Prompts(box=torch.tensor([[2.0, 3.0, 1.0, 15.0, 9.0, 7.0]]))
    native = volume_predictor(model, volume)(box, None)
    expected = np.zeros((20, 12, 10), dtype=bool)
    expected[2:16, 3:10, 1:8] = True
    assert np.array_equal(native.numpy() > 0.5, expected)  # the box crosses several windows, each given its part
    encodes = model.encodes
    # on a grid twice as coarse (the training spacing), the box is mapped there and the mask zoomed back
    predict = volume_predictor(model, volume, model_shape=(10, 6, 5))
    zoomed = predict(box, None).numpy() > 0.5
    assert zoomed.shape == (20, 12, 10) and dice(zoomed, expected) > 0.8
    click = Prompts(point_coords=torch.tensor([[[10.0, 6.0, 5.0]]]), point_labels=torch.tensor([[1]]))
    before = model.encodes
    assert predict(click, None).numpy()[10, 6, 5] > 0.5  # a click lands on its own voxel after the zoom
    assert model.encodes == before  # the windows were encoded by the first call already
    assert model.encodes - encodes <= len(window_starts((10, 8, 5), model.roi_size, 0.25))
    assert model.training  # the sliding window gives the mode back


def test_3d_case_evaluation_scores_clicks_and_3d_box_and_leaves_propagation_null(phantoms):
    images, labels = phantoms
    case_id = images[0].name[: -len("_0000.nii.gz")]
    case = load_native_case(case_id, [images[0]], labels / f"{case_id}.nii.gz")
    names = {"background": 0, **{f"c{v}": int(v) for v in np.unique(case.label) if v}}
    settings = InteractiveSettings(max_clicks=3, dice_k=3, max_objects=2, propagation=None)
    objects, label_map = evaluate_case_3d(_BoxEcho().eval(), case, names, settings)
    assert len(objects) == 2 and label_map.shape == case.label.shape
    for obj in objects:
        assert obj["box_dice"] == pytest.approx(
            dice(_box_mask(case.label == names[obj["class"]]), case.label == names[obj["class"]])
        )
        assert obj["propagation_dice"] is None and len(obj["dice_at_k"]) == 3 and 1 <= obj["clicks"] <= 3
        assert (label_map == names[obj["class"]]).any()  # the box-prompt mask is painted into the label map


def _box_mask(mask):
    out = np.zeros_like(mask)
    idx = np.nonzero(mask)
    out[tuple(slice(a.min(), a.max() + 1) for a in idx)] = True
    return out
