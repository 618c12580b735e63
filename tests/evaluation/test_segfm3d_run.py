"""The SegFM3D protocol with medseg's models on native test cases: stand-in models, then tiny real runs end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from medseg.config import CONFIG_DIR, instantiate
from medseg.data.prepare import synthetic
from medseg.errors import ConfigError
from medseg.evaluation import is_complete
from medseg.evaluation import segfm3d as protocol
from medseg.evaluation.interactive import dice
from medseg.evaluation.interactive_run import InteractiveSettings, load_native_case
from medseg.evaluation.segfm3d import protocol_per_case
from medseg.evaluation.segfm3d_run import evaluate_case_segfm3d, protocol_classes
from medseg.workflows.evaluation import evaluate_model

SEGFM3D = {"protocol": "segfm3d", "max_objects": 2}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.build(tmp_path_factory.mktemp("segfm3d"), seed=7, num_train=2, num_test=2, shape=(32, 32, 12))


@pytest.fixture
def clicks_seen(monkeypatch):
    """Every click the protocol simulates, with the reference and the label map it corrected."""
    seen, rule = [], protocol.challenge_click

    def recording(reference, prediction):
        click = rule(reference, prediction)
        seen.append((np.asarray(reference, bool), np.asarray(prediction, bool), click))
        return click

    monkeypatch.setattr(protocol, "challenge_click", recording)
    return seen


def _case(root, index=0):
    image = sorted((root / "imagesTs").glob("*_0000.nii.gz"))[index]
    case_id = image.name[: -len("_0000.nii.gz")]
    return load_native_case(case_id, [image], root / "labelsTs" / f"{case_id}.nii.gz")


def _names(case):
    return {"background": 0, **{f"c{v}": int(v) for v in np.unique(case.label) if v}}


def _check_case(result, label_map, case):
    """Six steps, final = last step, AUCs of the curves, and the last label map is what was scored."""
    assert len(result["dsc"]) == len(result["nsd"]) == len(result["step_seconds"]) == 6
    assert result["final_dsc"] == result["dsc"][-1] and result["final_nsd"] == result["nsd"][-1]
    assert result["dsc_auc"] == pytest.approx(protocol.auc(result["dsc"]))
    assert result["nsd_auc"] == pytest.approx(protocol.auc(result["nsd"]))
    assert result["seconds_per_step"] > 0 and result["total_seconds"] >= result["seconds_per_step"]
    values = {name: int(name[1:]) for name in result["classes"]}
    last = np.mean([dice(label_map == v, case.label == v) for v in values.values()])
    assert result["final_dsc"] == pytest.approx(last)


def _check_clicks(seen):
    assert seen
    for reference, prediction, click in seen:
        if click is None:
            assert np.array_equal(reference, prediction)
            continue
        coord, label = click
        assert prediction[coord] != reference[coord]  # on a voxel the last label map got wrong ...
        assert label == int(reference[coord])  # ... positive where the class was missed, negative where it was not


def test_a_3d_model_gets_the_challenge_box_then_clicks(root, box_echo, clicks_seen, monkeypatch):
    case = _case(root)
    names = _names(case)
    settings = InteractiveSettings(**SEGFM3D)
    windows, encode = [], box_echo.encode

    def recording(window):
        windows.append(window.numpy().tobytes())
        return encode(window)

    monkeypatch.setattr(box_echo, "encode", recording)
    result, label_map = evaluate_case_segfm3d(box_echo.eval(), case, names, settings)
    _check_case(result, label_map, case)
    _check_clicks(clicks_seen)
    assert len(result["classes"]) == 2 and box_echo.encodes > 0
    assert len(set(windows)) == len(windows)  # each window encoded once for both classes and all six steps
    for name in result["classes"]:
        box = result["per_class"][name]["box"]  # BoxEcho answers a box with the box itself
        filled = np.zeros(case.label.shape, dtype=bool)
        filled[box[0] : box[3] + 1, box[1] : box[4] + 1, box[2] : box[5] + 1] = True
        value = int(name[1:])
        assert result["per_class"][name]["dsc"][0] == pytest.approx(dice(filled, case.label == value), abs=0.02)


def test_a_2d_model_propagates_from_the_box_and_from_each_click(root, bright_in_box, clicks_seen):
    case = _case(root, 1)
    bright_in_box.spatial_dims = 2
    settings = InteractiveSettings(**SEGFM3D)
    result, label_map = evaluate_case_segfm3d(bright_in_box, case, _names(case), settings)
    _check_case(result, label_map, case)
    _check_clicks(clicks_seen)
    assert bright_in_box.encoded > 0 and result["dsc"][0] > 0  # the box step ran and found part of the objects
    spanned = [int(np.any(label_map == int(n[1:]), axis=(0, 1)).sum()) for n in result["classes"]]
    assert max(spanned) > 1  # propagated beyond the box's own slice


def test_region_classes_are_refused_and_empty_cases_skipped(root, box_echo):
    case = _case(root)
    with pytest.raises(ConfigError, match="region"):
        protocol_classes(case.label, {"background": 0, "both": [1, 2]})
    assert list(protocol_classes(case.label, _names(case), max_objects=1)) == ["c1"]
    case.label = np.zeros_like(case.label)
    result, label_map = evaluate_case_segfm3d(box_echo.eval(), case, {"background": 0, "c1": 1}, InteractiveSettings())
    assert result["classes"] == [] and not label_map.any()


def test_settings_take_the_protocol_and_refuse_an_unknown_one():
    assert InteractiveSettings.from_mapping({"protocol": "segfm3d"}).protocol == "segfm3d"
    assert InteractiveSettings.from_mapping({}).protocol == "dice_at_k"  # today's protocol stays the default
    with pytest.raises(ConfigError, match="protocol"):
        InteractiveSettings.from_mapping({"protocol": "segfm"})
    with pytest.raises(ConfigError, match="segfm3d"):
        InteractiveSettings.from_mapping({"protocol": "segfm3d", "segfm3d": {"clicks": 0}})


def _tiny_task(experiment, root):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        overrides = [f"experiment={experiment}", "data.num_workers=0", "data.cache=none", "data.num_folds=2"]
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.data_dir = str(root.parent)
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.num_channels)
    task = instantiate(cfg.task, model=model, label_names=datamodule.label_names)
    task.evaluation.update(SEGFM3D)
    return task, datamodule


@pytest.mark.parametrize("experiment", ["promptable_synthetic_3d", "promptable_synthetic"])
def test_a_tiny_run_is_evaluated_under_the_protocol_into_summary_json(experiment, root, tmp_path, one_thread):
    task, datamodule = _tiny_task(experiment, root)
    summary = evaluate_model(task, datamodule, tmp_path, max_cases=1, device="cpu")
    section = summary["protocol"]
    assert "interactive" not in summary and section["name"] == "segfm3d" and section["mean"]["n_cases"] == 1
    ((case_id, result),) = section["per_case"].items()
    assert len(result["dsc"]) == 6 and result["final_dsc"] == result["dsc"][-1] and len(result["classes"]) == 2
    assert set(protocol_per_case(summary)[case_id]) == {"dsc_auc", "nsd_auc", "final_dsc", "final_nsd",
                                                        "seconds_per_step"}  # fmt: skip
    assert section["mean"]["final_dsc"] == result["final_dsc"]
    assert (tmp_path / "predictions" / f"{case_id}.nii.gz").is_file() and is_complete(tmp_path / "summary.json")


class Sam2Holder(torch.nn.Module):
    """What a fine-tuned SAM 2 run's model is to the protocol: a module holding the ``SAM2Base`` as ``sam2``."""

    def __init__(self, sam2: torch.nn.Module) -> None:
        super().__init__()
        self.sam2 = sam2


def tiny_sam2() -> torch.nn.Module:
    """The ``sam2`` architecture, 16-wide Hiera at 64 px, random weights (object-presence head raised so that masks
    are not blanked): mechanics only, no segmentation quality."""
    from medseg.backbones.sam2 import build_sam2_components

    torch.manual_seed(0)
    tiny = {"embed_dim": 16, "stages": [1, 1, 2, 1], "global_att_blocks": [3], "num_heads": 1}
    model = build_sam2_components("sam2_hiera_t", pretrained=False, img_size=64, arch=tiny).model.eval()
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    return model


def test_a_sam2_model_propagates_by_memory_from_the_box_and_each_click(root, clicks_seen, monkeypatch):
    """Each class: the box on its median slice within the box's slices, then every click re-propagates from its slice;
    the slices are encoded once for both classes and all six steps."""
    from medseg.inference.sam2_propagation import Sam2Tracker

    pytest.importorskip("sam2")
    case = _case(root)
    sam2 = tiny_sam2()
    encoded, forward_image = [], sam2.forward_image
    monkeypatch.setattr(sam2, "forward_image", lambda images: encoded.append(len(images)) or forward_image(images))
    calls, correct = [], Sam2Tracker.correct

    def recording(self, index, prompts, lo=0, hi=None):
        calls.append((id(self), index, lo, hi))
        return correct(self, index, prompts, lo, hi)

    monkeypatch.setattr(Sam2Tracker, "correct", recording)
    settings = InteractiveSettings(**SEGFM3D)
    result, label_map = evaluate_case_segfm3d(Sam2Holder(sam2), case, _names(case), settings)
    _check_case(result, label_map, case)
    _check_clicks(clicks_seen)
    assert 0 < sum(encoded) <= case.label.shape[2]  # 12 slices, shared by both classes
    trackers = list(dict.fromkeys(tracker for tracker, *_ in calls))
    assert len(trackers) == 2
    for tracker, name in zip(trackers, result["classes"], strict=True):
        mine = [(index, lo, hi) for who, index, lo, hi in calls if who == tracker]
        target = case.label == int(name[1:])
        box = result["per_class"][name]["box"]
        assert mine[0] == (protocol.challenge_box(target).mid, box[2], box[5])
        clicks = [c for reference, _, c in clicks_seen if c is not None and np.array_equal(reference, target)]
        assert [index for index, _, _ in mine[1:]] == [coord[2] for coord, _ in clicks]  # each click: its own slice
