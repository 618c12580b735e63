"""``Sam2Session``, the napari widget's SAM 2 logic, without Qt: slices, memory per object, corrections, painting.

The model is a tiny SAM 2 (the ``sam2`` architecture, 16-wide Hiera at 64 px) with random weights and the
object-presence head's bias raised: the assertions are on mechanics (which slices are painted and replaced, what is
encoded, which objects survive), not on segmentation quality.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.backbones.sam2 import build_sam2_components
from medseg.backbones.sam2_configs import MISSING_EXTRA, require_sam2
from medseg.errors import ConfigError, InputShapeError
from medseg.inference.loaded import LoadedModel
from medseg.inference.propagate import PropagationConfig
from medseg.inference.sam2_session import Sam2Session

try:
    require_sam2()
except ConfigError:
    pytest.skip(MISSING_EXTRA, allow_module_level=True)

TINY = {"embed_dim": 16, "stages": [1, 1, 2, 1], "global_att_blocks": [3], "num_heads": 1}
NO_RULES = PropagationConfig(min_iou=None, min_area=None, max_area=None, batch_size=1)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.manual_seed(0)
    model = build_sam2_components("sam2_hiera_t", pretrained=False, img_size=64, arch=TINY).model.eval()
    with torch.no_grad():  # random SAM 2.1 weights blank every mask through the occlusion head
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    return LoadedModel(model=model, kind="promptable", source="tiny sam2")


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """``(32, 36, 6)`` 0-255 integers (slices along axis 2): a bright square drifting along ``j``."""
    rng = np.random.default_rng(2)
    data = rng.integers(0, 60, (32, 36, 6)).astype(np.float32)
    for k in range(6):
        data[8:24, 8 + k : 24 + k, k] = 230
    return data


def test_a_click_paints_its_slice_and_refines_with_its_logits(loaded, volume):
    session = Sam2Session(loaded, volume, propagation=NO_RULES)
    assert session.recipe.intensity == "none" and session.depth == 6 and session.label == 1
    first = session.segment_slice(2, box=(8, 10, 23, 25))
    assert first.mask.shape == (32, 36) and np.isfinite(first.iou) and first.logits.shape == (1, 1, 16, 16)
    assert np.array_equal(session.labels[..., 2] == 1, first.mask) and not session.labels[..., [0, 1, 3, 4, 5]].any()
    assert session.encoded == 1 and session.is_embedded(2) and not session.is_embedded(3)
    again = session.segment_slice(2, box=(8, 10, 23, 25), points=[[15, 17]], point_labels=[0])
    assert not torch.equal(again.logits, first.logits) and session.encoded == 1  # no second encoding
    fresh = session.segment_slice(2, box=(8, 10, 23, 25), refine=False)
    assert torch.equal(fresh.logits, first.logits)  # starting over gives the box's own mask back


def test_volume_then_a_correction_replaces_only_the_slices_onward(loaded, volume):
    session = Sam2Session(loaded, volume, propagation=NO_RULES)
    result = session.segment_volume(2, box=(8, 10, 23, 25))
    assert (result.first, result.last) == (0, 5) and result.encoded == 6 and result.mask.shape == volume.shape
    before = session.labels.copy()
    session.segment_volume(4, points=[[15, 20]], point_labels=[0])
    assert np.array_equal(session.labels[..., :4], before[..., :4])  # slices before the correction kept
    tracker = session._trackers[1]
    assert sorted(tracker.outputs["cond_frame_outputs"]) == [2, 4] and session.encoded == 6

    first_object = session.labels == 1
    assert session.next_object() == 2
    session.segment_volume(1, box=(0, 0, 10, 10))
    assert (session.labels == 2).any() and np.array_equal(session.labels == 1, first_object)  # painted around it
    session.clear_object()
    assert not (session.labels == 2).any() and 2 not in session._trackers and (session.labels == 1).any()


def test_embeddings_ahead_are_shared_with_a_later_session(loaded, volume, tmp_path):
    session = Sam2Session(loaded, volume, propagation=NO_RULES)
    steps = list(session.iter_embeddings(batch_size=4))
    assert steps == [(0, 6), (4, 6), (6, 6)] and session.encoded == 6
    later = Sam2Session(loaded, volume, cache=session.cache)
    later.segment_volume(3, box=(8, 10, 23, 25))
    assert later.cache is session.cache and later.encoded == 0
    other_axis = Sam2Session(loaded, volume, axis=0, cache=session.cache)
    assert other_axis.cache is not session.cache and other_axis.depth == 32
    path = later.save(tmp_path / "labels.nii.gz", np.diag([2.0, 2.0, 3.0, 1.0]))
    written = nib.load(path)
    assert np.array_equal(np.asarray(written.dataobj), later.labels) and written.affine[2, 2] == 3.0


def test_models_and_inputs_that_do_not_fit_are_refused(loaded, volume):
    with pytest.raises(ConfigError, match="Linear is not a SAM 2 model"):
        Sam2Session(torch.nn.Linear(2, 2), volume)
    with pytest.raises(ConfigError, match="dense model"):
        Sam2Session(LoadedModel(model=loaded.model, kind="dense", source="x"), volume)
    with pytest.raises(InputShapeError, match="3-D"):
        Sam2Session(loaded, volume[..., 0])
    session = Sam2Session(loaded, volume)
    with pytest.raises(ConfigError, match="box or at least one point"):
        session.segment_slice(1)
    with pytest.raises(ConfigError, match="outside 0..5"):
        session.segment_volume(6, box=(0, 0, 3, 3))


def _stored(array: np.ndarray) -> np.ndarray:
    """The RAS ``volume`` as another file would store it: axes x and y swapped, y and z reversed (as a DICOM series
    is next to the NIfTI of the same scan); ``STORED_AFFINE`` is that file's voxel-to-RAS affine."""
    return np.ascontiguousarray(array.transpose(1, 0, 2)[::-1, :, ::-1])


STORED_AFFINE = np.array([[0, 1, 0, 0], [-1, 0, 0, 35], [0, 0, -1, 5], [0, 0, 0, 1]], dtype=float)  # (32, 36, 6)


def _box_on(block: np.ndarray, index: int) -> tuple[int, int, int, int]:
    (i0, j0), (i1, j1) = (lambda w: (w.min(0), w.max(0)))(np.argwhere(block[:, :, index]))
    return int(i0), int(j0), int(i1), int(j1)


def test_with_its_affine_a_file_in_another_order_gets_the_masks_of_its_ras_copy(loaded, volume):
    """The same scan stored transposed and flipped, with its affine, is segmented voxel for voxel as the RAS volume
    (in world space): SAM 2 sees the same frames (the RAS copy's features serve it, nothing is encoded again) and
    walks them in the same order; indices, prompts, labels and the reported slice range stay in the file's order."""
    assert np.array_equal(nib.as_closest_canonical(nib.Nifti1Image(_stored(volume), STORED_AFFINE)).dataobj, volume)
    block = np.zeros(volume.shape, dtype=bool)
    block[8:24, 10:26, 2] = True  # the box (8, 10, 23, 25) on RAS slice 2 is slice 3 of the file
    point = np.zeros(volume.shape, dtype=bool)
    point[15, 20, 4] = True  # a correction on RAS slice 4, file slice 1
    stored_box, (stored_point,) = _box_on(_stored(block), 3), np.argwhere(_stored(point))[:, :2].tolist()
    reference = Sam2Session(loaded, volume, propagation=NO_RULES, affine=np.eye(4))
    given = np.zeros((36, 32, 6), dtype=np.uint16)  # the widget's Labels data, painted in place
    stored = Sam2Session(loaded, _stored(volume), propagation=NO_RULES, cache=reference.cache, labels=given,
                         affine=STORED_AFFINE)  # fmt: skip
    assert stored.cache is reference.cache and stored.slicing.reversed

    expected = reference.segment_slice(2, box=(8, 10, 23, 25))
    result = stored.segment_slice(3, box=stored_box)
    assert expected.mask.any() and np.array_equal(result.mask, expected.mask.T[::-1])
    assert np.array_equal(stored.labels, _stored(reference.labels)) and stored.labels is given
    expected = reference.segment_slice(2, box=(8, 10, 23, 25), points=[[15, 17]], point_labels=[0])
    result = stored.segment_slice(3, box=stored_box, points=[[35 - 17, 15]], point_labels=[0])
    assert np.array_equal(result.mask, expected.mask.T[::-1]) and torch.equal(result.logits, expected.logits)

    expected = reference.segment_volume(2, box=(8, 10, 23, 25))
    result = stored.segment_volume(3, box=stored_box)
    assert np.array_equal(result.mask, _stored(expected.mask)) and np.array_equal(given, _stored(reference.labels))
    assert (result.first, result.last) == (5 - expected.last, 5 - expected.first)
    expected = reference.segment_volume(4, points=[[15, 20]], point_labels=[0])
    result = stored.segment_volume(1, points=[stored_point], point_labels=[0])
    assert np.array_equal(given, _stored(reference.labels))
    assert (result.first, result.last) == (5 - expected.last, 5 - expected.first)
    assert reference.cache.encoded == 6 and stored.is_embedded(0)  # each frame encoded once for both sessions
    assert sorted(stored._trackers[1].masks) == sorted(reference._trackers[1].masks)  # the same frames, grid order

    plain = Sam2Session(loaded, _stored(volume), propagation=NO_RULES, cache=reference.cache)
    assert plain.cache is not reference.cache  # without the affine its frames are the file's own slices
