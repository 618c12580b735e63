"""PromptEncoder3d.maps: the full-resolution prompt maps (previous mask, click disks, box) the decoder's stem reads."""

from __future__ import annotations

import pytest
import torch

from medseg.errors import ConfigError
from medseg.models.prompt_encoder_3d import MAP_CHANNELS, PromptEncoder3d
from medseg.prompts.contract import Prompts

SIZE = (16, 12, 8)


def _disk(centre, radius):
    grid = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in SIZE], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_maps_draw_each_click_kind_the_box_and_the_previous_mask():
    encoder = PromptEncoder3d(8, click_radius=2.0)
    prev = torch.randn(2, 1, *SIZE, generator=torch.Generator().manual_seed(0)) * 4
    prompts = Prompts(
        point_coords=[[[3.0, 4.0, 5.0], [10.0, 9.0, 2.0]], [[12.0, 2.0, 6.5], [6.0, 6.0, 4.0]]],
        point_labels=[[1, 0], [0, -1]],  # item 1: one negative click and padding, which draws nothing
        box=[[1.0, 2.0, 3.0, 5.0, 7.0, 4.0], [0.0, 0.0, 0.0, 15.0, 11.0, 7.0]],
        prev_mask=prev,
    )
    maps = encoder.maps(prompts, SIZE)
    assert maps.shape == (2, MAP_CHANNELS, *SIZE)
    assert torch.allclose(maps[:, 0], prev[:, 0].sigmoid())
    assert torch.equal(maps[0, 1] > 0, _disk((3, 4, 5), 2.0)) and torch.equal(maps[0, 2] > 0, _disk((10, 9, 2), 2.0))
    assert not maps[1, 1].any() and torch.equal(maps[1, 2] > 0, _disk((12, 2, 6.5), 2.0))
    box = torch.zeros(SIZE, dtype=torch.bool)
    box[1:6, 2:8, 3:5] = True  # inclusive corners
    assert torch.equal(maps[0, 3] > 0, box) and bool(maps[1, 3].all())
    # probabilities as previous mask read as the same mask; no mask, no click, no box: all zero
    as_probabilities = encoder.maps(Prompts(box=prompts.box, prev_mask=prev.sigmoid()), SIZE)
    assert torch.allclose(as_probabilities[:, 0], maps[:, 0], atol=1e-3)
    assert not encoder.maps(Prompts(box=[[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]), SIZE)[:, :3].any()


def test_a_non_positive_click_radius_is_refused():
    with pytest.raises(ConfigError, match="click_radius"):
        PromptEncoder3d(8, click_radius=0)
