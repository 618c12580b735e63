"""Prompted sliding-window inference: which windows run, what prompts each window sees, how windows are blended."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.errors import ConfigError
from medseg.evaluation.interactive import dice
from medseg.inference.volumetric import FILL_VALUE, predict_prompted, volume_predictor, window_prompts, window_starts
from medseg.models.volumetric import build_volumetric_promptable
from medseg.prompts.contract import PromptError, Prompts

ROI = (32, 32, 8)
SAM = {"depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_volumetric_promptable(
        "sam_vit_b", pretrained=False, arch=SAM, roi_size=ROI, decoder_dim=32, num_heads=2, layers=[0]
    ).eval()


class Recorder:
    """Counts backbone runs and keeps the prompts each decode received (hooks on the model's own modules)."""

    def __init__(self, model) -> None:
        self.encodes = 0
        self.prompts: list[Prompts] = []
        self.handles = [
            model.backbone.register_forward_hook(self._encoded),
            model.prompt_encoder.register_forward_pre_hook(self._decoded),
        ]

    def _encoded(self, module, args, output) -> None:
        self.encodes += 1

    def _decoded(self, module, args) -> None:
        self.prompts.append(args[0])

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def recorder(model):
    rec = Recorder(model)
    yield rec
    rec.close()


def image(shape, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed))


def test_window_starts_cover_the_volume_on_monai_grid():
    starts = window_starts((40, 40, 20), ROI, overlap=0.25)
    assert sorted({s[0] for s in starts}) == [0, 8] and sorted({s[2] for s in starts}) == [0, 6, 12]
    covered = torch.zeros(40, 40, 20, dtype=torch.bool)
    for i, j, k in starts:
        covered[i : i + 32, j : j + 32, k : k + 8] = True
    assert covered.all() and len(starts) == 12


def test_window_prompts_shift_drop_and_clip():
    prompts = Prompts(
        point_coords=[[[20.0, 21.0, 10.0], [2.0, 3.0, 4.0], [30.0, 30.0, 13.0]]],
        point_labels=[[1, 1, 0]],
        box=[[5.0, 6.0, 9.0, 39.0, 39.0, 19.0]],
    )
    local, active = window_prompts(prompts, (8, 8, 6), ROI)
    assert active.tolist() == [True]
    assert local.point_coords.tolist() == [[[12.0, 13.0, 4.0], [0.0, 0.0, 0.0], [22.0, 22.0, 7.0]]]
    assert local.point_labels.tolist() == [[1, -1, 0]]  # (2, 3, 4) lies before the window: padding
    assert local.box.tolist() == [[0.0, 0.0, 3.0, 31.0, 31.0, 7.0]]  # clipped to the window's 0..31, 0..31, 0..7
    _, outside = window_prompts(prompts, (0, 0, 0), (4, 4, 4))  # the box does not reach this window
    assert outside.tolist() == [False]


def test_only_windows_with_a_prompt_run_and_see_window_coordinates(model, recorder):
    volume = image((40, 40, 20))
    point = torch.tensor([20.0, 20.0, 10.0])  # inside the windows starting at x, y in {0, 8} and z = 6 only
    prompts = Prompts(point_coords=point.reshape(1, 1, 3), point_labels=[[1]])
    logits = predict_prompted(model, volume, prompts)
    assert recorder.encodes == 4 and len(recorder.prompts) == 4
    starts = {(i, j, 6) for i in (0, 8) for j in (0, 8)}
    seen = {tuple((point - p.point_coords[0, 0]).int().tolist()) for p in recorder.prompts}
    assert seen == starts  # the model got global coordinates minus each window's start
    assert logits.shape == (1, 40, 40, 20)
    run = torch.zeros(40, 40, 20, dtype=torch.bool)
    for i, j, k in starts:
        run[i : i + 32, j : j + 32, k : k + 8] = True
    assert (logits[0][~run] == FILL_VALUE).all()
    assert (logits[0][run] > FILL_VALUE / 10).all() and torch.isfinite(logits).all()


def test_each_window_decodes_only_its_objects(model, recorder):
    volume = image((40, 40, 20))
    prompts = Prompts(point_coords=[[[2.0, 2.0, 1.0], [20.0, 2.0, 1.0]], [[37.0, 38.0, 18.0], [0.0, 0.0, 0.0]]],
                      point_labels=[[1, 0], [1, -1]])  # fmt: skip
    logits = predict_prompted(model, volume, prompts)
    # object 0: x in 0..31 -> start 0 only (2 < 8); object 1: start 8 on x and y, 12 on z: one window each
    assert recorder.encodes == 2 and [p.batch_size for p in recorder.prompts] == [1, 1]
    first, second = recorder.prompts
    assert first.point_labels.tolist() == [[1, 0]] and first.point_coords[0, 1].tolist() == [20.0, 2.0, 1.0]
    assert second.point_coords[0, 0].tolist() == [29.0, 30.0, 6.0]
    assert (logits[0, 32:, :, :] == FILL_VALUE).all() and (logits[1, :8] == FILL_VALUE).all()


def test_a_volume_of_the_roi_size_equals_one_forward(model):
    volume = image(ROI, seed=3)
    prompts = Prompts(box=[[4.0, 5.0, 1.0, 20.0, 22.0, 6.0]], point_coords=[[[10.0, 12.0, 3.0]]], point_labels=[[1]])
    logits = predict_prompted(model, volume, prompts)
    with torch.no_grad():
        expected, _ = model(volume[None], prompts)
    assert torch.allclose(logits, expected[:, 0], atol=1e-4)


def test_a_box_runs_every_window_it_meets_and_gaussian_blending_is_a_weighted_mean(model, recorder):
    volume = image((40, 32, 8), seed=4)
    prompts = Prompts(box=[[2.0, 3.0, 1.0, 37.0, 20.0, 6.0]])
    logits = predict_prompted(model, volume, prompts)
    assert recorder.encodes == 2  # x windows at 0 and 8; one window in y and z
    assert [p.box.tolist() for p in recorder.prompts] == [[[2.0, 3.0, 1.0, 31.0, 20.0, 6.0]],
                                                          [[0.0, 3.0, 1.0, 29.0, 20.0, 6.0]]]  # fmt: skip
    with torch.no_grad():
        left = model(volume[None, :, :32], recorder.prompts[0])[0][0, 0]
        right = model(volume[None, :, 8:], recorder.prompts[1])[0][0, 0]
    assert torch.allclose(logits[0, :8], left[:8], atol=1e-4)  # only the first window covers x < 8
    assert torch.allclose(logits[0, 32:], right[24:], atol=1e-4)
    overlap = logits[0, 8:32]
    low = torch.minimum(left[8:], right[:24]) - 1e-4
    high = torch.maximum(left[8:], right[:24]) + 1e-4
    assert ((overlap >= low) & (overlap <= high)).all()  # a convex combination of the two windows


def test_small_volumes_are_padded_and_cropped_back(model):
    volume = image((32, 32, 5), seed=5)
    prompts = Prompts(point_coords=[[[10.0, 10.0, 4.0]]], point_labels=[[1]], prev_mask=torch.zeros(1, 1, 32, 32, 5))
    logits = predict_prompted(model, volume, prompts)
    assert logits.shape == (1, 32, 32, 5) and torch.isfinite(logits).all() and (logits > FILL_VALUE).all()


def test_previous_mask_alone_runs_no_window_and_uncovered_voxels_keep_it(model, recorder):
    volume = image((40, 32, 8), seed=6)
    prev = torch.full((1, 1, 40, 32, 8), -5.0)
    prev[0, 0, 36:39, 10:12, 2:4] = 5.0  # foreground only in the second x window, and no positive click there
    negative = Prompts(point_coords=[[[37.0, 10.0, 3.0]]], point_labels=[[0]], prev_mask=prev)
    logits = predict_prompted(model, volume, negative)
    assert recorder.encodes == 0  # neither previous foreground nor a negative click starts a window
    assert torch.equal(logits, prev[:, 0])  # nothing re-predicted: the previous mask stands
    # a positive click in the first x window (0..31) runs that window only; x >= 32 keeps the previous logits
    clicked = Prompts(point_coords=[[[5.0, 10.0, 3.0], [37.0, 10.0, 3.0]]], point_labels=[[1, 0]], prev_mask=prev)
    logits = predict_prompted(model, volume, clicked)
    assert recorder.encodes == 1
    (seen,) = recorder.prompts
    assert torch.equal(seen.prev_mask, prev[:, :, :32]) and seen.point_labels.tolist() == [[1, -1]]
    assert torch.equal(logits[0, 32:], prev[0, 0, 32:])
    assert not torch.equal(logits[0, :8], prev[0, 0, :8])


def test_bad_requests_raise_medseg_errors(model):
    with pytest.raises(PromptError, match="outside the volume"):
        predict_prompted(model, image((40, 40, 20)), Prompts(point_coords=[[[45.0, 0.0, 0.0]]], point_labels=[[1]]))
    with pytest.raises(ConfigError, match="C, X, Y, Z"):
        predict_prompted(model, torch.rand(40, 40, 20), Prompts(point_coords=[[[1.0, 1.0, 1.0]]], point_labels=[[1]]))
    with pytest.raises(ConfigError, match="overlap"):
        predict_prompted(model, image(ROI), Prompts(box=[[0.0, 0, 0, 3, 3, 3]]), overlap=1.0)


# --- one whole volume, click after click (volume_predictor) -------------------------------------------------------


def test_3d_predictor_maps_prompts_through_windows_and_zoom_and_encodes_each_window_once(box_echo):
    model = box_echo
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
