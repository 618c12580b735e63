"""The Qt-free controller behind the widget: real LiteMedSAM on a two-blob volume, and a stand-in for mechanics."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.errors import ConfigError, InputShapeError
from medseg.inference.cache import EmbeddingCache
from medseg.inference.loaded import LoadedModel
from medseg.inference.recipe import SliceRecipe
from medseg.inference.session import SegmentationSession, guess_intensity


@pytest.fixture(scope="module")
def shared_cache() -> EmbeddingCache:
    """One cache for this module's LiteMedSAM sessions: each of the 3 slices goes through the encoder once."""
    return EmbeddingCache()


# --- real LiteMedSAM ------------------------------------------------------------------------------------------------


def test_a_box_segments_the_blob_and_a_second_click_skips_the_encoder(litemedsam, blobs, shared_cache, tight_box, dice):
    volume, truth = blobs
    session = SegmentationSession(litemedsam, volume, axis=2, cache=shared_cache)
    assert session.recipe.intensity == "mr"  # float MR-like intensities
    first = truth[:, :, 1] == 1
    result = session.segment_slice(1, box=tight_box(first))
    assert dice(result.mask, first) > 0.8
    assert np.array_equal(session.labels[:, :, 1] == 1, result.mask) and not session.labels[:, :, [0, 2]].any()

    encoded, hits = session.encoded, shared_cache.hits
    decode, seen = litemedsam.decode, []

    def recording(embeddings, prompts, multimask=False):
        seen.append(prompts.prev_mask)
        return decode(embeddings, prompts, multimask=multimask)

    litemedsam.decode = recording
    try:
        centre = tuple(float(v) for v in np.argwhere(first).mean(axis=0))
        again = session.segment_slice(1, box=tight_box(first), points=[centre], point_labels=[1])
    finally:
        del litemedsam.decode
    assert session.encoded == encoded and shared_cache.hits == hits + 1  # the cached embedding, no encoder run
    assert seen[0] is not None and seen[0].shape == (1, 1, 256, 256)  # the previous logits were fed back
    assert dice(again.mask, first) > 0.8


def test_propagation_fills_the_neighbouring_slices(litemedsam, blobs, shared_cache, tight_box, dice):
    volume, truth = blobs
    session = SegmentationSession(litemedsam, volume, axis=2, cache=shared_cache)
    result = session.segment_volume(1, box=tight_box(truth[:, :, 1] == 1))
    assert (result.first, result.last) == (0, 2)
    for k in range(3):
        assert dice(session.labels[:, :, k] == 1, truth[:, :, k] == 1) > 0.8, k
    assert session.encoded <= 3


def test_a_second_object_gets_the_next_label_and_keeps_the_first(litemedsam, blobs, shared_cache, tight_box, dice):
    volume, truth = blobs
    session = SegmentationSession(litemedsam, volume, axis=2, cache=shared_cache)
    session.segment_slice(1, box=tight_box(truth[:, :, 1] == 1))
    kept = session.labels.copy()
    assert session.next_object() == 2
    second = truth[:, :, 1] == 2
    session.segment_slice(1, box=tight_box(second))
    assert dice(session.labels[:, :, 1] == 2, second) > 0.8
    assert np.array_equal(session.labels[kept == 1], kept[kept == 1])  # object 1 is never painted over


def test_with_its_affine_a_file_in_another_order_is_segmented_as_its_ras_copy(litemedsam, blobs, tight_box):
    """A file whose axes are swapped and one reversed (as a DICOM series is next to the NIfTI of the same scan) gives,
    with its affine, the masks the RAS volume gives, without running the encoder again: the model saw the same
    slices. Without the affine it sees the file's own slice, which the encoder has not seen."""
    volume, truth = blobs  # the RAS volume (identity affine)
    stored = np.ascontiguousarray(volume.transpose(1, 0, 2)[::-1])  # file axis 0: y reversed, axis 1: x
    stored_truth = truth.transpose(1, 0, 2)[::-1]
    affine = np.array([[0, 1, 0, 0], [-1, 0, 0, volume.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    cache = EmbeddingCache()
    reference = SegmentationSession(litemedsam, volume, cache=cache, affine=np.eye(4))
    expected = reference.segment_slice(1, box=tight_box(truth[:, :, 1] == 1))
    session = SegmentationSession(litemedsam, stored, cache=cache, affine=affine)
    result = session.segment_slice(1, box=tight_box(stored_truth[:, :, 1] == 1))
    assert cache.misses == 1
    np.testing.assert_array_equal(result.mask, expected.mask.T[::-1])
    np.testing.assert_array_equal(session.labels, reference.labels.transpose(1, 0, 2)[::-1])
    SegmentationSession(litemedsam, stored, cache=cache).segment_slice(1, box=tight_box(stored_truth[:, :, 1] == 1))
    assert cache.misses == 2


# --- mechanics, with a stand-in model -----------------------------------------------------------------------------


def squares(depth: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(32, 32, depth) zeros with a 10 x 8 square of 200 on every slice (the stand-in segments bright pixels)."""
    truth = np.zeros((32, 32, depth), bool)
    truth[6:16, 10:18] = True
    return np.where(truth, 200.0, 0.0).astype(np.float32), truth


def test_compute_embeddings_reports_progress_and_serves_later_clicks(bright_in_box):
    volume, truth = squares(depth=5)
    session = SegmentationSession(LoadedModel(bright_in_box, "promptable"), volume, recipe=SliceRecipe("none"))
    steps = []
    assert session.compute_embeddings(batch_size=2, progress=lambda done, total: steps.append((done, total))) == 5
    assert steps == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert bright_in_box.encoded == 5 and all(session.is_embedded(k) for k in range(5))
    session.segment_slice(3, box=(6, 10, 15, 17))
    session.segment_volume(2, box=(6, 10, 15, 17))
    assert bright_in_box.encoded == 5 and session.encoded == 5  # clicks and propagation reuse every embedding
    assert np.array_equal(session.labels > 0, truth)
    assert session.compute_embeddings() == 0


def test_slices_follow_the_session_axis(bright_in_box):
    volume, truth = squares(depth=4)
    volume, truth = np.moveaxis(volume, 2, 0), np.moveaxis(truth, 2, 0)  # (4, 32, 32): slices along axis 0
    session = SegmentationSession(bright_in_box, volume, axis=0, recipe=SliceRecipe("none"))
    session.segment_slice(2, box=(6, 10, 15, 17))
    assert np.array_equal(session.labels[2] == 1, truth[2]) and not session.labels[[0, 1, 3]].any()
    session.segment_volume(2, box=(6, 10, 15, 17))
    assert np.array_equal(session.labels == 1, truth)


def test_with_an_affine_indices_boxes_points_and_labels_stay_in_the_files_order(bright_in_box):
    """The file (4, 32, 32) slices along axis 0, which its affine reverses (and swaps the other two): prompts and
    label maps are the file's, only the model's slices are the RAS grid's."""
    volume, truth = squares(depth=4)
    volume, truth = np.moveaxis(volume, 2, 0)[::-1].copy(), np.moveaxis(truth, 2, 0)[::-1].copy()
    truth[:, 6:16, 10:12] = False  # not symmetric: a transposed or flipped mask would not fit
    volume[~truth] = 0.0
    affine = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [-1, 0, 0, 3], [0, 0, 0, 1]], dtype=float)  # axes (z-, y, x)
    session = SegmentationSession(bright_in_box, volume, axis=0, recipe=SliceRecipe("none"), affine=affine)
    assert session.slice(0).shape == (32, 32) and np.array_equal(session.slice(0) > 0, truth[0].T)
    result = session.segment_slice(2, box=(6, 12, 15, 17), points=[(10, 14)], point_labels=[1])
    assert np.array_equal(result.mask, truth[2]) and np.array_equal(session.labels[2] == 1, truth[2])
    assert not session.labels[[0, 1, 3]].any()
    volume_result = session.segment_volume(1, box=(6, 12, 15, 17))
    assert np.array_equal(session.labels == 1, truth) and (volume_result.first, volume_result.last) == (0, 3)
    assert session.compute_embeddings(indices=[3]) == 0 and session.is_embedded(3)


def test_refining_feeds_back_only_the_same_objects_logits(bright_in_box):
    volume, _ = squares()
    session = SegmentationSession(bright_in_box, volume, recipe=SliceRecipe("none"))
    session.segment_slice(1, box=(6, 10, 15, 17))
    session.segment_slice(1, points=[(10.0, 12.0)], point_labels=[1])
    session.segment_slice(2, box=(6, 10, 15, 17))
    session.next_object()
    session.segment_slice(1, box=(6, 10, 15, 17))
    session.segment_slice(1, box=(6, 10, 15, 17), refine=False)
    fed_back = [mask is not None for mask in bright_in_box.prev_masks]
    assert fed_back == [False, True, False, False, False]


def test_clear_select_and_save(bright_in_box, tmp_path):
    volume, truth = squares()
    session = SegmentationSession(bright_in_box, volume, recipe=SliceRecipe("none"))
    session.select_object(7)
    session.segment_volume(0, box=(6, 10, 15, 17))
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    written = session.save(tmp_path / "labels.nii.gz", affine)
    saved = nib.load(written)
    assert np.array_equal(np.asarray(saved.dataobj), np.where(truth, 7, 0)) and np.allclose(saved.affine, affine)
    session.clear_object()
    assert not session.labels.any()
    with pytest.raises(ConfigError, match="label values"):
        session.select_object(0)


def test_user_errors_name_the_fix(bright_in_box):
    volume, _ = squares()
    with pytest.raises(ConfigError, match="takes no box or point prompts"):
        SegmentationSession(LoadedModel(torch.nn.Conv3d(1, 2, 1), "dense", source="a UNet run"), volume)
    with pytest.raises(InputShapeError, match="3-D"):
        SegmentationSession(bright_in_box, volume[..., 0])
    with pytest.raises(InputShapeError, match="do not match"):
        SegmentationSession(bright_in_box, volume, labels=np.zeros((2, 2, 2), np.uint16))
    session = SegmentationSession(bright_in_box, volume, recipe=SliceRecipe("none"))
    with pytest.raises(ConfigError, match="draw one first"):
        session.segment_slice(0)
    with pytest.raises(ConfigError, match="outside"):
        session.segment_slice(9, box=(0, 0, 3, 3))


def test_intensity_guess():
    assert guess_intensity(np.array([-1000.0, 40.0, 300.0])) == "ct"
    assert guess_intensity(np.array([0.0, 17.0, 255.0])) == "none"
    assert guess_intensity(np.array([0.0, 17.5, 2000.0])) == "mr"


def test_compile_compiles_the_click_path_of_a_promptable_model_only(bright_in_box):
    from medseg.models.promptable import build_promptable

    volume, _ = squares()
    with pytest.raises(ConfigError, match="compile_decoder"):
        SegmentationSession(bright_in_box, volume, compile=True)
    arch = {"depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}
    model = build_promptable("sam_vit_b", pretrained=False, img_size=64, arch=arch)
    keys = model.state_dict().keys()
    session = SegmentationSession(model, volume, compile=True)
    assert session.model.compiled_mode == "default"  # plain torch.compile on CPU (reduce-overhead is CUDA graphs)
    assert session.model.mask_decoder._compiled_call_impl is not None and session.model.state_dict().keys() == keys
