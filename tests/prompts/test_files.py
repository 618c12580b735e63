"""The prompts file: voxel and world spaces on an oblique anisotropic volume, the 2D box rule, and every error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.data.prepare.synthetic import make_phantom
from medseg.prompts import PromptError
from medseg.prompts.files import (
    MAX_BOXES,
    MAX_FILE_BYTES,
    MAX_OBJECTS,
    MAX_POINTS,
    PromptFileError,
    check_prompts,
    dump_prompts,
    load_prompts,
    parse_prompts,
)
from medseg.prompts.geometry import box_voxel_to_world, voxel_to_world

SHAPE = (32, 32, 16)
_, LABEL, AFFINE = make_phantom(5, shape=SHAPE, spacing=(3.2, 3.2, 5.0), orientation="LPS", oblique_degrees=14.0)


def write(tmp_path, data) -> str:
    path = tmp_path / "prompts.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_voxel_prompts_load_as_given_and_a_flat_box_is_2d(tmp_path):
    data = {
        "space": "voxel",
        "objects": [
            {
                "label": 2,
                "boxes": [[3, 4, 5, 10, 12, 5], [3, 4, 2, 10, 12, 9]],
                "points": [[5, 6, 5], [0, 0, 0]],
                "point_labels": [1, 0],
            },
            {"label": 1, "points": [[31, 31, 15]], "point_labels": [1]},
        ],
    }
    objects = load_prompts(write(tmp_path, data), AFFINE, SHAPE)
    assert [o.label for o in objects] == [2, 1]
    assert objects[0].boxes.tolist() == [[3, 4, 5, 10, 12, 5], [3, 4, 2, 10, 12, 9]]
    assert objects[0].box_is_2d.tolist() == [True, False]
    assert objects[0].points.tolist() == [[5, 6, 5], [0, 0, 0]] and objects[0].point_labels.tolist() == [1, 0]
    assert objects[1].boxes.shape == (0, 6) and not objects[1].box_is_2d.any()
    prompts = objects[0].to_prompts()
    assert prompts.box.shape == (2, 6) and prompts.point_coords.shape == (2, 2, 3)
    assert prompts.class_vector.tolist() == [[2], [2]]
    path = tmp_path / "again.json"
    dump_prompts(objects, path)
    again = load_prompts(path, AFFINE, SHAPE)
    assert all(np.array_equal(a.boxes, b.boxes) and np.array_equal(a.points, b.points) for a, b in zip(objects, again))


def test_world_prompts_hit_the_intended_voxels_of_an_oblique_anisotropic_volume(tmp_path):
    rng = np.random.default_rng(2)
    organ = np.argwhere(LABEL > 0)
    voxels = organ[rng.choice(len(organ), 12, replace=False)]
    box = np.array([4, 6, 3, 20, 25, 3])  # a 2D box on slice 3
    data = {
        "space": "world",
        "objects": [
            {
                "label": 1,
                "points": voxel_to_world(voxels, AFFINE).tolist(),
                "point_labels": [1] * 12,
                "boxes": [box_voxel_to_world(box, AFFINE).tolist()],
            },
        ],
    }
    (obj,) = load_prompts(write(tmp_path, data), AFFINE, SHAPE)
    assert np.array_equal(obj.points, voxels)
    assert np.array_equal(LABEL[tuple(obj.points.T)], LABEL[tuple(voxels.T)])
    # the covering box of an oblique box's world cover contains the intended box
    assert (obj.boxes[0, :3] <= box[:3]).all() and (obj.boxes[0, 3:] >= box[3:]).all()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('{"space": "voxel", "objects": [}', r"not valid JSON at line 1"),
        ([1, 2], "top level: expected a JSON object"),
        ({"space": "voxel", "objects": [], "extra": 1}, r"unknown keys \['extra'\]"),
        ({"objects": [{"label": 1}]}, r"missing keys \['space'\]"),
        ({"space": "mm", "objects": [{"label": 1}]}, "space: must be 'voxel' or 'world'"),
        ({"space": "voxel", "objects": []}, "objects: must be a non-empty list"),
        ({"space": "voxel", "objects": [{"label": 1, "point": [[1, 2, 3]]}]}, r"object 0: unknown keys \['point'\]"),
        ({"space": "voxel", "objects": [{"label": 0, "boxes": [[0, 0, 0, 1, 1, 1]]}]}, "positive integer"),
        ({"space": "voxel", "objects": [{"label": 1}]}, "object 0: no boxes and no points"),
        ({"space": "voxel", "objects": [{"label": 1, "boxes": [[0, 0, 0, 1, 1]]}]}, r"object 0, boxes\[0\]"),
        ({"space": "voxel", "objects": [{"label": 1, "points": [[1, 2, 3]], "point_labels": []}]}, "1 points but 0"),
        ({"space": "voxel", "objects": [{"label": 1, "points": [[1, 2, 3]], "point_labels": [2]}]}, "0/1"),
        ({"space": "voxel", "objects": [{"label": 1, "points": [[1.5, 2, 3]], "point_labels": [1]}]}, "integers"),
        ({"space": "voxel", "objects": [{"label": 1, "boxes": [[5, 0, 0, 1, 1, 1]]}]}, "end before its start"),
        (
            {
                "space": "voxel",
                "objects": [
                    {"label": 1, "boxes": [[1, 1, 1, 2, 2, 2]]},
                    {"label": 2, "points": [[1, 40, 3]], "point_labels": [1]},
                ],
            },
            r"object 1, point 0 .* shape \(32, 32, 16\)",
        ),
        ({"space": "voxel", "objects": [{"label": 1, "boxes": [[0, 0, 0, 31, 31, 16]]}]}, "object 0, box 0"),
        (
            {"space": "world", "objects": [{"label": 1, "points": [[900.0, 0.0, 0.0]], "point_labels": [1]}]},
            "object 0, point 0 .* outside",
        ),
    ],
)
def test_every_malformed_file_names_the_file_the_object_and_the_fix(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(PromptFileError, match=message) as info:
        load_prompts(path, AFFINE, SHAPE)
    assert str(info.value).startswith(path) and isinstance(info.value, PromptError)


def test_missing_file_and_2d_volume():
    with pytest.raises(PromptFileError, match="cannot read"):
        load_prompts("/nonexistent/prompts.json", AFFINE, SHAPE)
    with pytest.raises(PromptFileError, match="3D"):
        parse_prompts({"space": "voxel", "objects": []}, AFFINE, (32, 32))


def _point(*xyz):
    return {"label": 1, "points": [list(xyz)], "point_labels": [1]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"space": "world", "objects": [{"label": 1, "points": [[NaN, 0, 0]], "point_labels": [1]}]}', "NaN"),
        ('{"space": "voxel", "objects": [{"label": 1, "boxes": [[0, 0, 0, Infinity, 4, 4]]}]}', "infinite"),
        ('{"space": "world", "objects": [{"label": 1, "boxes": [[0, 0, 0, 1e400, 4, 4]]}]}', "infinite"),
    ],
)
def test_nan_and_infinite_coordinates_are_refused_as_such(tmp_path, text, message):
    """Python's JSON reader accepts NaN and Infinity; they used to come back as 'voxel -9.2e18 outside the volume'."""
    path = write(tmp_path, text)
    with pytest.raises(PromptFileError, match=rf"object 0, (points|boxes)\[0\]: .*{message}") as info:
        load_prompts(path, AFFINE, SHAPE)
    assert "e+18" not in str(info.value)


def test_far_but_finite_coordinates_name_their_true_position(tmp_path):
    for data in ({"space": "world", "objects": [_point(1e300, 0, 0)]},
                 {"space": "voxel", "objects": [{"label": 1, "boxes": [[0, 0, 0, 1e30, 4, 4]]}]},
                 {"space": "world", "objects": [{"label": 1, "boxes": [[0, 0, 0, 1e300, 4, 4]]}]}):  # fmt: skip
        with pytest.raises(PromptFileError, match="object 0, (points|boxes|box 0) at voxel .* outside") as info:
            load_prompts(write(tmp_path, data), AFFINE, SHAPE)
        assert "-9.22" not in str(info.value), str(info.value)


def test_labels_beyond_uint16_are_refused_before_any_inference(tmp_path):
    path = write(tmp_path, {"space": "voxel", "objects": [_point(1, 2, 3), {**_point(1, 2, 3), "label": 70000}]})
    with pytest.raises(PromptFileError, match=r"object 1: label must be a positive integer up to 65535 .*70000"):
        check_prompts(path)  # what medseg predict runs before loading the model; no volume needed


def test_counts_are_capped_with_a_message_that_says_how_to_split(tmp_path):
    many_points = {"label": 1, "points": [[1, 2, 3]] * (MAX_POINTS + 1), "point_labels": [1] * (MAX_POINTS + 1)}
    cases = {
        "points": ({"space": "voxel", "objects": [many_points]}, rf"object 0, points: {MAX_POINTS + 1} points"),
        "objects": (
            {"space": "voxel", "objects": [_point(1, 2, 3)] * (MAX_OBJECTS + 1)},
            rf"{MAX_OBJECTS + 1} objects, more than",
        ),
        "boxes": (
            {"space": "voxel", "objects": [{"label": 1, "boxes": [[0, 0, 0, 1, 1, 1]] * (MAX_BOXES // 2 + 1)}] * 2},
            rf"{2 * (MAX_BOXES // 2 + 1)} boxes in all",
        ),
    }
    for name, (data, message) in cases.items():
        path = write(tmp_path, data)
        with pytest.raises(PromptFileError, match=message) as info:
            load_prompts(path, AFFINE, SHAPE)
        assert str(info.value).startswith(path), name
        if name != "points":
            assert "Split the objects over several prompts files" in str(info.value)
    at_cap = {"space": "voxel", "objects": [{**many_points, "points": many_points["points"][:-1],
                                             "point_labels": many_points["point_labels"][:-1]}]}  # fmt: skip
    assert len(load_prompts(write(tmp_path, at_cap), AFFINE, SHAPE)[0].points) == MAX_POINTS


def test_huge_deep_or_binary_files_are_refused_before_parsing(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:  # sparse: the size is checked before a byte is read
        handle.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(PromptFileError, match=r"big\.json: 50\.0 MiB, more than the 50 MiB .* Split the objects"):
        load_prompts(big, AFFINE, SHAPE)
    deep = write(tmp_path, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(PromptFileError, match="nested too deeply"):
        check_prompts(deep)
    binary = tmp_path / "scan.json"
    binary.write_bytes(b"\x89\xff\xfe\x00" * 10)
    with pytest.raises(PromptFileError, match="not UTF-8 text"):
        load_prompts(binary, AFFINE, SHAPE)
