"""The VISTA3D-style prompt contract: shapes and labels are checked where prompts are made; padding and collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.errors import MedsegError
from medseg.prompts import PromptError, Prompts, collate_prompts, pad_points


def points(b=2, n=3, d=3):
    coords = torch.arange(b * n * d, dtype=torch.float32).reshape(b, n, d)
    labels = torch.ones(b, n, dtype=torch.long)
    return coords, labels


def test_valid_prompts_normalise_dtypes_and_report_batch_and_dims():
    coords, labels = points()
    prompts = Prompts(point_coords=coords.double(), point_labels=labels.int(), box=np.array([[0, 0, 0, 4, 4, 4]] * 2))
    assert prompts.point_coords.dtype == torch.float32 and prompts.point_labels.dtype == torch.long
    assert prompts.box.dtype == torch.float32
    assert (prompts.batch_size, prompts.spatial_dims) == (2, 3)
    assert set(prompts.as_dict()) == {"point_coords", "point_labels", "box"}
    assert Prompts(class_vector=[[3]]).spatial_dims is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "at least one"),
        ({"point_coords": torch.zeros(1, 2, 3)}, "go together"),
        ({"point_coords": torch.zeros(1, 2, 4), "point_labels": torch.zeros(1, 2)}, r"\[B, N, 2\]"),
        ({"point_coords": torch.zeros(1, 2, 3), "point_labels": torch.zeros(1, 3)}, "pad_points"),
        ({"point_coords": torch.zeros(1, 2, 3), "point_labels": torch.tensor([[1, 2]])}, r"\[2\]"),
        ({"point_coords": torch.full((1, 1, 3), float("nan")), "point_labels": torch.ones(1, 1)}, "NaN"),
        ({"box": torch.zeros(1, 5)}, r"\[B, 6\]"),
        ({"box": torch.tensor([[5.0, 0, 0, 4, 4, 4]])}, "hi >= lo"),
        (
            {"box": torch.tensor([[0.0, 0, 0, 4, 4, 4], [0, 0, 0, 4, float("inf"), 4]])},
            r"box \[0\.0, .*inf.* NaN or inf",
        ),
        ({"box": torch.tensor([[float("nan"), 0, 0, 4, 4, 4]])}, "NaN or infinite"),
        ({"box": torch.zeros(1, 4), "point_coords": torch.zeros(1, 1, 3), "point_labels": torch.ones(1, 1)}, "2D"),
        ({"class_vector": torch.zeros(3)}, r"\[B, K\]"),
        ({"box": torch.zeros(1, 6), "prev_mask": torch.zeros(1, 2, 4, 4, 4)}, "prev_mask"),
        ({"box": torch.zeros(1, 6), "prev_mask": torch.zeros(1, 1, 4, 4)}, "2D but"),
        ({"box": torch.zeros(2, 6), "class_vector": torch.zeros(3, 1)}, "same batch size"),
    ],
)
def test_malformed_prompts_raise_a_medseg_error_naming_the_problem(kwargs, message):
    with pytest.raises(PromptError, match=message) as info:
        Prompts(**kwargs)
    assert isinstance(info.value, MedsegError)


def test_check_bounds_ignores_padding_and_names_the_point_and_shape():
    prompts = Prompts(point_coords=[[[1, 2, 3], [99, 99, 99]]], point_labels=[[1, -1]], box=[[0, 0, 0, 9, 9, 4]])
    prompts.check_bounds((10, 10, 5))
    with pytest.raises(PromptError, match=r"box .* \(10, 10, 4\)"):
        prompts.check_bounds((10, 10, 4))
    outside = Prompts(point_coords=[[[1, 2, 5]]], point_labels=[[0]])
    with pytest.raises(PromptError, match=r"point \[1.0, 2.0, 5.0\] .* \(10, 10, 5\)"):
        outside.check_bounds((10, 10, 5))


def test_pad_points_pads_ragged_items_with_label_minus_one():
    coords, labels = pad_points([[[1, 2]], [[3, 4], [5, 6], [7, 8]], np.zeros((0, 2))], [[1], [1, 0, 1], []])
    assert coords.shape == (3, 3, 2) and labels.shape == (3, 3)
    assert labels.tolist() == [[1, -1, -1], [1, 0, 1], [-1, -1, -1]]
    assert coords[1].tolist() == [[3, 4], [5, 6], [7, 8]]
    assert pad_points([[[1, 2, 3]]], [[1]], length=4)[1].tolist() == [[1, -1, -1, -1]]
    with pytest.raises(PromptError, match="2 points but 1"):
        pad_points([[[1, 2], [3, 4]]], [[1]])
    with pytest.raises(PromptError, match="shorter"):
        pad_points([[[1, 2], [3, 4]]], [[1, 1]], length=1)


def test_collate_pads_points_and_stacks_the_rest():
    a = Prompts(point_coords=[[[1, 1, 1]]], point_labels=[[1]], box=[[0, 0, 0, 2, 2, 2]], class_vector=[[1]])
    b = Prompts(
        point_coords=[[[2, 2, 2], [3, 3, 3]]], point_labels=[[1, 0]], box=[[1, 1, 1, 3, 3, 3]], class_vector=[[2]]
    )
    batch = collate_prompts([a, b])
    assert batch.batch_size == 2
    assert batch.point_labels.tolist() == [[1, -1], [1, 0]]
    assert batch.box[1].tolist() == [1, 1, 1, 3, 3, 3]
    assert batch.class_vector.tolist() == [[1], [2]]
    with pytest.raises(PromptError, match="same fields"):
        collate_prompts([a, Prompts(point_coords=[[[1, 1, 1]]], point_labels=[[1]])])


def test_to_moves_every_tensor_and_from_batch_round_trips():
    coords, labels = points(1, 2)
    prompts = Prompts(point_coords=coords, point_labels=labels, prev_mask=torch.zeros(1, 1, 4, 4, 4))
    moved = prompts.to("meta")
    assert moved.point_coords.device.type == "meta" and moved.prev_mask.device.type == "meta"
    assert prompts.point_coords.device.type == "cpu"
    again = Prompts.from_batch({"image": None, **prompts.as_dict()})
    assert torch.equal(again.point_coords, coords) and again.box is None


def test_single_builds_one_prompt_set_from_plain_coordinates_and_items_index_a_batch():
    one = Prompts.single(box=(1, 2, 5, 7), points=[(3.0, 4.0), (2.0, 6.0)], point_labels=[1, 0])
    assert one.batch_size == 1 and one.spatial_dims == 2
    assert one.box.tolist() == [[1.0, 2.0, 5.0, 7.0]] and one.point_labels.tolist() == [[1, 0]]
    assert Prompts.single(points=[(3, 4, 5)]).point_labels.tolist() == [[1]]  # clicks are positive by default
    with pytest.raises(PromptError, match="at least one"):
        Prompts.single()
    batch = collate_prompts([Prompts.single(box=(0, 0, 0, 1, 1, 1)), Prompts.single(box=(2, 2, 2, 3, 3, 3))])
    assert batch[1].box.tolist() == [[2.0, 2.0, 2.0, 3.0, 3.0, 3.0]] and batch[-1].batch_size == 1
    with pytest.raises(IndexError):
        batch[2]
