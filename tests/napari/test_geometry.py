"""Affines as napari transforms and back."""

from __future__ import annotations

import numpy as np
import pytest
from napari.layers import Image

from medseg.errors import ReaderError
from medseg.napari.geometry import affine_from_layer, layer_transform, sliced_data_axis

FLIPPED = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [np.eye(4), FLIPPED], ids=["identity", "flipped"])
def test_layer_transform_puts_voxels_where_the_affine_does(affine):
    transform = layer_transform(affine)
    layer = Image(np.zeros((4, 5, 6), np.float32), **transform)
    for voxel in [(0, 0, 0), (3, 1, 5), (1.5, 2.25, 0.5)]:
        assert np.allclose(layer.data_to_world(voxel), (affine @ [*voxel, 1])[:3])
    assert np.allclose(affine_from_layer(layer.scale, layer.translate, layer.rotate, layer.affine), affine)


def test_spacing_is_positive_and_direction_cosines_carry_the_flips():
    transform = layer_transform(FLIPPED)
    assert transform["scale"].tolist() == [0.8, 0.8, 2.5]
    assert transform["translate"].tolist() == [10.0, 20.0, -30.0]
    assert np.allclose(transform["rotate"], np.diag([-1.0, -1.0, 1.0]))


def test_sliced_data_axis_follows_a_permuted_affine():
    permuted = np.array([[0, 0, 1.0], [1.0, 0, 0], [0, -1.0, 0]])  # data axis 2 -> world x, 0 -> y, 1 -> -z
    assert [sliced_data_axis(permuted, w) for w in range(3)] == [2, 0, 1]


def test_a_degenerate_affine_is_a_reader_error():
    bad = np.eye(4)
    bad[2, 2] = 0.0
    with pytest.raises(ReaderError, match="zero column"):
        layer_transform(bad)
