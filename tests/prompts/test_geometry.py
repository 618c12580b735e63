"""Coordinates on oblique, anisotropic, permuted grids: voxel <-> world <-> RAS-oriented grid <-> model input."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing

from medseg.data.prepare.synthetic import make_phantom, phantom_affine
from medseg.errors import ConfigError
from medseg.inference.sliding import to_model_input
from medseg.prompts import PromptError, Prompts, geometry
from medseg.prompts.geometry import (
    box_to_model_input_2d,
    box_voxel_to_world,
    from_model_input_2d,
    lps_to_ras,
    lps_to_ras_affine,
    model_input_to_voxel,
    prompts_on_slice,
    ras_to_lps,
    slice_box,
    to_model_input_2d,
    voxel_to_model_input,
    voxel_to_world,
    world_box_to_voxel,
    world_to_voxel,
    zoom_prompts,
)

SHAPE = (20, 24, 10)
OBLIQUE = phantom_affine(SHAPE, (0.7, 0.9, 3.0), orientation="LIA", oblique_degrees=17.0, oblique_axis=(1, 2, 0.5))


def test_voxel_world_round_trip_hits_the_same_voxels_on_an_oblique_anisotropic_grid():
    rng = np.random.default_rng(0)
    voxels = np.stack([rng.integers(0, n, 50) for n in SHAPE], -1)
    world = voxel_to_world(voxels, OBLIQUE)
    # the world point is A @ [i, j, k, 1], computed independently
    expected = (OBLIQUE @ np.c_[voxels, np.ones(50)].T).T[:, :3]
    np.testing.assert_allclose(world, expected)
    assert np.array_equal(world_to_voxel(world, OBLIQUE, round=True, shape=SHAPE), voxels)
    # a point 0.3 voxel off a centre still rounds to that voxel (the grid is not axis-aligned in the world)
    nudged = voxel_to_world(voxels + 0.3, torch.from_numpy(OBLIQUE))
    assert np.array_equal(world_to_voxel(nudged, OBLIQUE, round=True), voxels)


def test_world_points_hit_the_intended_label_of_a_phantom():
    _, label, affine = make_phantom(3, shape=(32, 32, 16), spacing=(3.2, 3.2, 5.0), oblique_degrees=12.0)
    voxels = np.argwhere(label > 0)[:: max(1, int((label > 0).sum()) // 40)]
    world = voxel_to_world(voxels, affine)
    back = world_to_voxel(world, affine, round=True, shape=label.shape)
    assert np.array_equal(label[tuple(back.T)], label[tuple(voxels.T)])


def test_out_of_volume_points_name_the_prompt_and_the_shape():
    outside = voxel_to_world([5, 5, 12], OBLIQUE)
    with pytest.raises(PromptError, match=r"object 3, point 1 .* shape \(20, 24, 10\)"):
        world_to_voxel(outside, OBLIQUE, round=True, shape=SHAPE, what="object 3, point 1")
    world_to_voxel(voxel_to_world([5, 5, 9.4], OBLIQUE), OBLIQUE, shape=SHAPE)  # within the last voxel


def test_world_box_covers_all_corners_and_round_trips_on_an_axis_aligned_grid():
    box = np.array([2, 3, 1, 9, 15, 6])
    straight = phantom_affine(SHAPE, (0.7, 0.9, 3.0), orientation="LPS")
    world = box_voxel_to_world(box, straight)
    assert (world[3:] >= world[:3]).all()
    assert world_box_to_voxel(world, straight, shape=SHAPE).tolist() == box.tolist()
    covering = world_box_to_voxel(box_voxel_to_world(box, OBLIQUE), OBLIQUE, shape=SHAPE, clip=True)
    assert (covering[:3] <= box[:3]).all() and (covering[3:] >= box[3:]).all()  # contains the original box
    lo, hi = world[:3], world[3:]
    corners = np.array([[(lo, hi)[b >> a & 1][a] for a in range(3)] for b in range(8)])
    inside = world_to_voxel(corners, OBLIQUE)
    result = world_box_to_voxel(world, OBLIQUE)
    assert (np.rint(inside) >= result[:3]).all() and (np.rint(inside) <= result[3:]).all()
    with pytest.raises(PromptError, match="box"):
        world_box_to_voxel(world + 500.0, OBLIQUE, shape=SHAPE, clip=True)


def test_lps_ras_flips_x_and_y():
    assert lps_to_ras([1.0, -2.0, 3.0]).tolist() == [-1.0, 2.0, 3.0]
    assert ras_to_lps(lps_to_ras([[4.0, 5.0, 6.0]])).tolist() == [[4.0, 5.0, 6.0]]
    lps_affine = np.diag([-0.5, -0.5, 2.0, 1.0])  # LPS-frame affine of an 'RAS' array
    ras = lps_to_ras_affine(lps_affine)
    assert np.allclose(voxel_to_world([1, 2, 3], ras), lps_to_ras(voxel_to_world([1, 2, 3], lps_affine)))


def test_native_voxels_map_onto_the_preprocessed_grid_through_monai_transforms():
    label = np.zeros(SHAPE, dtype=np.float32)
    corners = np.array([[3, 4, 1], [14, 17, 6], [9, 3, 4]])
    for value, corner in enumerate(corners, start=1):
        label[tuple(slice(c, c + 3) for c in corner)] = value  # 3 x 3 x 3 voxels: 2.1 x 2.7 x 9 mm
    image = MetaTensor(torch.from_numpy(label)[None], affine=torch.from_numpy(OBLIQUE))
    preprocessed = Spacing(pixdim=(1.0, 1.0, 1.5), mode="nearest")(Orientation(axcodes="RAS")(image))
    model_affine = preprocessed.affine.numpy()
    data = preprocessed[0].numpy()
    for value, corner in enumerate(corners, start=1):
        uvw = voxel_to_model_input(corner + 1, OBLIQUE, model_affine)  # the block's centre voxel
        where = np.argwhere(data == value)
        # nearest resampling keeps the block's centroid within about one output voxel of the mapped centre
        assert len(where) and np.abs(where.mean(0) - uvw).max() < 1.0
        np.testing.assert_allclose(model_input_to_voxel(uvw, model_affine, OBLIQUE), corner + 1, atol=1e-6)


def test_2d_model_input_coordinates_follow_monai_resize_and_padding():
    slices = torch.zeros(1, 1, 40, 25)
    slices[0, 0, 30:34, 5:9] = 1.0  # a 4 x 4 spot centred at (31.5, 6.5)
    batch, geometry = to_model_input(slices, 64)
    assert geometry.resized == (64, 40)
    weights = batch[0, 0].numpy()
    centroid = (np.argwhere(weights > 0) * weights[weights > 0][:, None]).sum(0) / weights.sum()
    mapped = to_model_input_2d([31.5, 6.5], geometry)
    np.testing.assert_allclose(mapped, centroid, atol=0.05)
    np.testing.assert_allclose(from_model_input_2d(mapped, geometry), [31.5, 6.5])
    box = box_to_model_input_2d([30, 5, 33, 8], geometry)
    np.testing.assert_allclose(box, [*to_model_input_2d([30, 5], geometry), *to_model_input_2d([33, 8], geometry)])
    with pytest.raises(PromptError, match="padding"):
        from_model_input_2d([10.0, 50.0], geometry)
    with pytest.raises(PromptError, match=r"shape \(40, 25\)"):
        to_model_input_2d([40.0, 3.0], geometry)


# --- file voxels <-> the RAS-oriented grid ------------------------------------------------------------------------


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "LIA", "PSR", "ILP"])
def test_orientation_round_trips_data_indices_and_prompts(axcodes):
    spacing = (0.7, 0.9, 3.0)
    affine = phantom_affine(SHAPE, spacing, orientation=axcodes, oblique_degrees=17.0, oblique_axis=(1, 2, 0.5))
    data = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    orientation = geometry.Orientation.from_affine(affine, SHAPE)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))  # the same grid, computed independently
    oriented = orientation.orient(data)
    assert np.array_equal(oriented, np.asarray(canonical.dataobj)) and oriented.shape == orientation.shape
    assert np.array_equal(orientation.native(oriented), data)  # and back, voxel for voxel
    assert np.array_equal(orientation.orient(np.stack([data, -data]))[1], -oriented)  # channel first
    np.testing.assert_allclose(orientation.along_ras(geometry.voxel_spacing(affine)), canonical.header.get_zooms())
    for axis in range(3):
        assert oriented.shape[axis] == SHAPE[orientation.file_axis(axis)]
    # indices follow the data: the voxel an index names holds the same value on both grids, both ways
    ijk = np.stack([np.random.default_rng(2).integers(0, n, 30) for n in SHAPE], -1)
    mapped = orientation.indices(ijk)
    assert np.array_equal(oriented[tuple(mapped.T)], data[tuple(ijk.T)])
    assert np.array_equal(orientation.native_indices(mapped), ijk)
    # prompts: points like indices, a box to the box of its reoriented block (low and high re-sorted after flips)
    box = np.array([2, 3, 1, 9, 15, 6])
    block = np.zeros(SHAPE, dtype=bool)
    block[2:10, 3:16, 1:7] = True
    where = np.argwhere(orientation.orient(block))
    prompts = orientation.prompts(Prompts(box=box[None], point_coords=ijk[None], point_labels=np.ones((1, 30))))
    assert prompts.box[0].tolist() == [*where.min(0).tolist(), *where.max(0).tolist()]
    assert np.array_equal(prompts.point_coords[0].numpy(), mapped)
    with pytest.raises(PromptError, match="prev_mask"):
        orientation.prompts(Prompts(box=box[None], prev_mask=np.zeros((1, 1, *SHAPE))))


def test_a_dicom_world_point_finds_its_voxel_on_the_ras_grid():
    """file voxel -> LPS world (DICOM) -> RAS world -> file voxel -> RAS grid, against the canonical image's own
    affine: every space of the chain agrees on one voxel."""
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ OBLIQUE  # the same grid, its affine in DICOM's LPS frame
    affine = lps_to_ras_affine(lps_affine)
    np.testing.assert_allclose(affine, OBLIQUE)
    voxel = np.array([4, 17, 8])
    lps_point = voxel_to_world(voxel, lps_affine)
    back = world_to_voxel(lps_to_ras(lps_point), affine, round=True, shape=SHAPE)
    assert back.tolist() == voxel.tolist()
    orientation = geometry.Orientation.from_affine(affine, SHAPE)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(np.zeros(SHAPE, np.float32), affine))
    on_grid = world_to_voxel(lps_to_ras(lps_point), canonical.affine, round=True)
    assert orientation.indices(back).tolist() == on_grid.tolist()


# --- the RAS grid -> what a model sees ----------------------------------------------------------------------------


def test_slice_box_reads_a_flat_3d_box():
    assert slice_box([3, 4, 9, 20, 30, 9], axis=2) == (9, (3.0, 4.0, 20.0, 30.0))
    assert slice_box([5, 4, 9, 5, 30, 12], axis=0) == (5, (4.0, 9.0, 30.0, 12.0))
    with pytest.raises(ConfigError, match="flat"):
        slice_box([3, 4, 9, 20, 30, 10], axis=2)


def test_prompts_on_a_slice_are_the_box_section_and_the_points_lying_there():
    prompts = Prompts(
        box=[[2.0, 3.0, 4.0, 10.0, 12.0, 9.0]],
        point_coords=[[[5.0, 6.0, 7.0], [8.0, 7.0, 7.0], [6.0, 5.0, 8.0], [0.0, 0.0, 7.0]]],
        point_labels=[[1, 0, 1, -1]],
        class_vector=[[3]],
    )
    on = prompts_on_slice(prompts, axis=2, index=7)
    assert on.box.tolist() == [[2.0, 3.0, 10.0, 12.0]] and on.class_vector is None
    assert on.point_coords.tolist() == [[[5.0, 6.0], [8.0, 7.0]]] and on.point_labels.tolist() == [[1, 0]]
    across = prompts_on_slice(prompts, axis=0, index=6)  # another axis: the in-plane axes are (1, 2)
    assert across.box.tolist() == [[3.0, 4.0, 12.0, 9.0]] and across.point_coords.tolist() == [[[5.0, 8.0]]]
    assert prompts_on_slice(Prompts(point_coords=[[[1.0, 2.0, 3.0]]], point_labels=[[1]]), 2, 4) is None
    with pytest.raises(PromptError, match="does not reach"):
        prompts_on_slice(prompts, axis=2, index=10)


def test_zoomed_grid_points_land_on_their_voxel_centres_and_boxes_are_covered():
    shape, fine, coarse = (20, 12, 10), (40, 24, 20), (10, 6, 5)
    prompts = Prompts(box=[[2.0, 3.0, 1.0, 15.0, 9.0, 7.0]], point_coords=[[[10.0, 6.0, 5.0]]], point_labels=[[1]])
    up = zoom_prompts(prompts, shape, fine)
    assert up.point_coords.tolist() == [[[20.5, 12.5, 10.5]]]  # (i + 0.5) * 2 - 0.5: the centre of its 2 x 2 x 2
    assert up.box.tolist() == [[4.0, 6.0, 2.0, 31.0, 19.0, 15.0]]  # exactly the fine voxels of the box's voxels
    down = zoom_prompts(prompts, shape, coarse)
    assert down.box.tolist() == [[1.0, 1.0, 0.0, 7.0, 4.0, 3.0]]  # every coarse voxel a box voxel falls in
    mask = torch.zeros(1, 1, *shape)
    mask[0, 0, 2:16, 3:10, 1:8] = 1.0
    zoomed = torch.nn.functional.interpolate(mask, size=coarse, mode="trilinear", align_corners=False)[0, 0] > 0
    lo, hi = down.box[0, :3].long(), down.box[0, 3:].long()
    inside = torch.zeros(coarse, dtype=torch.bool)
    inside[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    assert bool(zoomed[~inside].sum() == 0) and bool(zoomed[inside].all())  # the box covers what the zoom shows
    edge = zoom_prompts(Prompts(point_coords=[[[19.0, 0.0, 9.0]]], point_labels=[[1]]), shape, coarse)
    assert edge.point_coords.tolist() == [[[9.0, 0.0, 4.0]]]  # 9.25, -0.25, 4.25 clipped inside the coarse grid
