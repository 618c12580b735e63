"""Native-grid interactive evaluation: RAS reorientation without interpolation, settings, summary completeness."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.data.prepare import synthetic
from medseg.errors import ConfigError
from medseg.evaluation import build_summary, write_summary
from medseg.evaluation.interactive import dice, summarize_interactive
from medseg.evaluation.interactive_run import InteractiveSettings, evaluate_case_3d, load_native_case
from medseg.evaluation.metrics import EvaluationError
from medseg.evaluation.nnunet_metrics import nnunet_case
from medseg.evaluation.summary import interactive_per_case, is_complete


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
    mask = np.ones((2, 2, 2), dtype=np.uint8)
    per_case = [
        {"case_id": c, "metrics": metrics, "nnunet": nnunet_case(mask, mask, labels, f"{c}.nii.gz", f"{c}.nii.gz")}
        for c in ("a", "b")
    ]
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


def test_3d_case_evaluation_scores_clicks_and_3d_box_and_leaves_propagation_null(phantoms, box_echo):
    images, labels = phantoms
    case_id = images[0].name[: -len("_0000.nii.gz")]
    case = load_native_case(case_id, [images[0]], labels / f"{case_id}.nii.gz")
    names = {"background": 0, **{f"c{v}": int(v) for v in np.unique(case.label) if v}}
    settings = InteractiveSettings(max_clicks=3, dice_k=3, max_objects=2, propagation=None)
    objects, label_map = evaluate_case_3d(box_echo.eval(), case, names, settings)
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


class Sam2Holder(torch.nn.Module):
    """What a fine-tuned SAM 2 run's model is to the evaluation: a module holding the ``SAM2Base`` as ``sam2``."""

    def __init__(self, sam2: torch.nn.Module) -> None:
        super().__init__()
        self.sam2 = sam2


def test_a_sam2_model_clicks_on_one_slice_and_propagates_by_memory(phantoms, monkeypatch):
    """Tiny ``sam2`` architecture with random weights (object-presence head raised): the wiring, not the quality. The
    clicks run on the object's middle slice, the box then propagates through the volume, every slice encoded once."""
    pytest.importorskip("sam2")
    from medseg.backbones.sam2 import build_sam2_components
    from medseg.evaluation.interactive_run import evaluate_case

    torch.manual_seed(0)
    tiny = {"embed_dim": 16, "stages": [1, 1, 2, 1], "global_att_blocks": [3], "num_heads": 1}
    sam2 = build_sam2_components("sam2_hiera_t", pretrained=False, img_size=64, arch=tiny).model.eval()
    with torch.no_grad():
        sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    encoded, forward_image = [], sam2.forward_image
    monkeypatch.setattr(sam2, "forward_image", lambda images: encoded.append(len(images)) or forward_image(images))
    images, labels = phantoms
    case_id = images[0].name[: -len("_0000.nii.gz")]
    case = load_native_case(case_id, [images[0]], labels / f"{case_id}.nii.gz")
    names = {"background": 0, **{f"c{v}": int(v) for v in np.unique(case.label) if v}}
    rules = {"min_iou": None, "min_area": None, "max_area": None}
    settings = InteractiveSettings(max_clicks=2, dice_k=2, max_objects=1, propagation=rules)
    [obj], label_map = evaluate_case(Sam2Holder(sam2), case, names, settings)
    assert len(obj["dice_at_k"]) == 2 and 1 <= obj["clicks"] <= 2 and 0.0 <= obj["box_dice"] <= 1.0
    assert isinstance(obj["propagation_dice"], float)
    reached = np.flatnonzero(np.any(label_map == names[obj["class"]], axis=(0, 1)))
    assert obj["slice"] in reached and len(reached) == case.label.shape[2]  # no stop rules: every slice
    assert sum(encoded) == case.label.shape[2]  # the click loop and the propagation share the frames
