"""The prompts file: voxel and world spaces on an oblique anisotropic volume, the 2D box rule, and every error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.data.prepare.synthetic import make_phantom
from medseg.prompts import PromptError
from medseg.prompts.files import PromptFileError, dump_prompts, load_prompts, parse_prompts
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
