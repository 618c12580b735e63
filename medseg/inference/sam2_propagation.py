"""SAM 2 / MedSAM2 memory propagation of one object through a volume, with correction clicks on any slice.

A volume's slices are SAM 2 video frames (:class:`~medseg.inference.sam2_frames.Sam2Frames`), and
:class:`Sam2Tracker` drives ``sam2``'s own ``SAM2Base.track_step`` over them, as ``SAM2VideoPredictor`` does (and
MedSAM2's inference): memory attention (``_prepare_memory_conditioned_features``), the memory encoder
(``_encode_new_memory``) and object pointers are the package's, never re-implemented here.

- :meth:`Sam2Tracker.prompt` gives a slice its prompts (box and clicks, in the slice's pixels) and makes it a
  *conditioning frame*: a slice not tracked yet is decoded from its prompts alone (SAM 2's initial conditioning
  frame, the image predictor's mask), a slice already tracked with the memory of the other slices and its own
  previous logits as mask input (``SAM2VideoPredictor.add_new_points_or_box`` on a tracked frame).
- :meth:`Sam2Tracker.propagate` walks from a conditioning slice along ``+1``/``-1``: every slice is tracked from
  memory (``track_in_reverse`` backwards), its mask encoded into memory, until a stop rule of
  :mod:`medseg.inference.propagate` fires (an empty mask, IoU with the previous slice below ``min_iou``, an area
  outside ``[min_area, max_area]`` times the area of the slice the walk started from); that slice is not kept and
  its memory is dropped. A walk passes through other conditioning slices (their user prompts win, and the area rule
  restarts there); after a stop it resumes at the next conditioning slice ahead, if any.
- :func:`propagate_sam2` is :func:`medseg.inference.propagate.propagate` for a SAM 2 model (one prompt set on one
  slice, the same result type), and :func:`slice_predictor_sam2` the click loop on one slice that
  :func:`medseg.inference.recipe.slice_predictor` is for a 2-D model (the interactive evaluation uses both).
- A correction (:meth:`Sam2Tracker.correct`) is ``prompt`` then ``propagate`` *onward* from the corrected slice:
  away from the :attr:`~Sam2Tracker.anchor` (the first prompted slice), both ways on the anchor itself. Every slice
  beyond it in that direction is dropped and tracked again; the slices before it keep their masks. A correction
  beyond the object's current reach (a slice where the walk had stopped, with untracked slices between) also walks
  back across that gap, up to the nearest tracked slice.

Settings of ``SAM2VideoPredictor`` that hold no weights are applied for the duration of each call and restored
(``binarize_mask_from_pts_for_mem_enc``: masks of prompted slices enter memory as the user sees them). Its
``fill_hole_area`` post-processing needs ``sam2``'s CUDA extension and is left out. Masks are the low-resolution
logits resized bilinearly to the slice (as the video predictor resizes to the video) and thresholded at
``config.threshold``; the ``carry`` and ``box_margin`` rules of 2-D propagation do not apply (memory carries the
object).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medseg.errors import ConfigError
from medseg.inference.propagate import PropagationConfig, PropagationResult, stop_reason
from medseg.inference.recipe import above_threshold
from medseg.inference.sam2_frames import Sam2Frames
from medseg.prompts.contract import Prompts

__all__ = ["Sam2Tracker", "Walk", "propagate_sam2", "slice_predictor_sam2"]

_VIDEO_SETTINGS = {"binarize_mask_from_pts_for_mem_enc": True}
_COND, _NON_COND = "cond_frame_outputs", "non_cond_frame_outputs"


@dataclass
class Walk:
    """What one :meth:`Sam2Tracker.propagate` call did: slices ``first..last`` hold masks after it, ``stopped`` the
    reason per direction (``forward``/``backward``: ``empty``, ``iou``, ``area``, ``growth``, ``edge``)."""

    first: int
    last: int
    stopped: dict[str, str]


@contextmanager
def _video_settings(model: torch.nn.Module) -> Iterator[None]:
    saved = {name: getattr(model, name) for name in _VIDEO_SETTINGS}
    try:
        for name, value in _VIDEO_SETTINGS.items():
            setattr(model, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(model, name, value)


class Sam2Tracker:
    """One object's memory through the slices of a volume (module docstring).

    Attributes:
        frames: the volume's slices as SAM 2 frames (shared by every object of the volume).
        config: the stop rules and threshold (``axis``, ``carry`` and ``box_margin`` unused).
        masks: ``{slice: (H, W) bool}`` of every slice holding the object now.
        ious: the mask decoder's predicted IoU of each slice's last mask.
        anchor: the first slice prompted, which corrections propagate away from.
    """

    def __init__(self, frames: Sam2Frames, config: PropagationConfig | None = None) -> None:
        self.frames, self.config = frames, config or PropagationConfig()
        self.model = frames.model
        self.outputs: dict[str, dict[int, dict]] = {_COND: {}, _NON_COND: {}}
        self.masks: dict[int, np.ndarray] = {}
        self.prompts: dict[int, Prompts] = {}
        self.ious: dict[int, float] = {}
        self.anchor: int | None = None

    # --- one slice ----------------------------------------------------------------------------------------------

    def _point_inputs(self, prompts: Prompts) -> dict[str, torch.Tensor]:
        """A slice's prompts (array order ``(i, j)``, pixels of the slice) as SAM 2 point inputs on its square
        input: ``(x, y) / (W, H) * image_size``, the box as two corners with labels 2 and 3 before the clicks."""
        height, width = self.frames.shape
        scale = torch.tensor([self.frames.image_size / width, self.frames.image_size / height])
        coords, labels = [], []
        if prompts.box is not None:
            i0, j0, i1, j1 = (float(v) for v in prompts.box[0])
            coords.append(torch.tensor([[j0, i0], [j1, i1]]))
            labels.append(torch.tensor([2, 3]))
        if prompts.point_coords is not None:
            keep = prompts.point_labels[0] >= 0
            coords.append(prompts.point_coords[0][keep].float().flip(-1))
            labels.append(prompts.point_labels[0][keep].long())
        if not coords or sum(len(c) for c in coords) == 0:
            raise ConfigError("a SAM 2 slice prompt needs a box or at least one click on the slice.")
        device = self.frames.device
        return {
            "point_coords": (torch.cat(coords).float() * scale)[None].to(device),
            "point_labels": torch.cat(labels).to(torch.int32)[None].to(device),
        }

    def _mask(self, low_res: torch.Tensor) -> np.ndarray:
        logits = F.interpolate(low_res.float(), size=self.frames.shape, mode="bilinear", align_corners=False)
        return above_threshold(logits[0, 0], self.config.threshold).cpu().numpy()

    def _track(self, index: int, init: bool, points: dict | None, reverse: bool, previous: torch.Tensor | None):
        feats, pos, sizes = self.frames.features(index, -1 if reverse else 1)
        ious: list[torch.Tensor] = []  # the decoder's predicted IoU, which track_step does not return
        hook = self.model.sam_mask_decoder.register_forward_hook(lambda _m, _i, out: ious.append(out[1]))
        with _video_settings(self.model):
            try:
                out = self.model.track_step(
                    frame_idx=index, is_init_cond_frame=init, current_vision_feats=feats,
                    current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=points, mask_inputs=None,
                    output_dict=self.outputs, num_frames=self.frames.depth, track_in_reverse=reverse,
                    run_mem_encoder=True, prev_sam_mask_logits=previous,
                )  # fmt: skip
            finally:
                hook.remove()
        keep = ("maskmem_features", "maskmem_pos_enc", "pred_masks", "obj_ptr", "object_score_logits")
        self.ious[index] = float(ious[-1].max()) if ious else float("nan")
        return {key: out[key] for key in keep}  # what SAM2VideoPredictor keeps of a frame

    def tracked(self, index: int) -> bool:
        return index in self.outputs[_COND] or index in self.outputs[_NON_COND]

    def prompt(self, index: int, prompts: Prompts) -> np.ndarray:
        """Make slice ``index`` a conditioning frame with ``prompts`` (2-D, batch of one, the slice's pixels in array
        order; they replace the slice's earlier prompts) and return its ``(H, W)`` mask."""
        points = self._point_inputs(prompts)
        previous = self.outputs[_COND].pop(index, None) or self.outputs[_NON_COND].pop(index, None)
        init = previous is None or not self.outputs[_COND]
        prev_logits = None if previous is None else previous["pred_masks"].float().clamp(-32.0, 32.0)
        reverse = self.anchor is not None and index < self.anchor
        out = self._track(index, init, points, reverse, prev_logits)
        self.outputs[_COND][index] = out
        self.prompts[index] = prompts
        if self.anchor is None:
            self.anchor = index
        mask = self._mask(out["pred_masks"])
        self._keep(index, mask)
        return mask

    def forget(self, index: int) -> None:
        """Drop slice ``index`` from the object (its prompts, mask and memory): a next prompt there starts over."""
        for store in (self.outputs[_COND], self.outputs[_NON_COND], self.masks, self.prompts, self.ious):
            store.pop(index, None)
        if index == self.anchor:
            self.anchor = min(self.outputs[_COND], default=None)

    def _keep(self, index: int, mask: np.ndarray) -> None:
        if mask.any():
            self.masks[index] = mask
        else:
            self.masks.pop(index, None)

    # --- walking ------------------------------------------------------------------------------------------------

    def _walk(self, start: int, step: int, end: int) -> str:
        """Track the slices after ``start`` up to ``end`` (inclusive) in direction ``step``; the last stop reason."""
        for k in range(start + step, end + step, step):  # everything beyond the start here is tracked again
            if k not in self.outputs[_COND]:
                for store in (self.outputs[_NON_COND], self.masks, self.ious):
                    store.pop(k, None)

        def restart(k: int) -> tuple[np.ndarray | None, float, str]:
            """The rules restart from prompted slice ``k``: its mask (none when it decoded empty), area, reason."""
            mask = self.masks.get(k)
            return mask, (0.0 if mask is None else float(mask.sum())), ("edge" if mask is not None else "empty")

        previous, start_area, reason = restart(start)
        k = start + step
        while (k - end) * step <= 0:
            if k in self.outputs[_COND]:  # a prompted slice: its user prompts win; the rules restart from it
                previous, start_area, reason = restart(k)
                k += step
                continue
            if previous is None:  # stopped: resume at the next prompted slice ahead, if any
                ahead = [c for c in self.outputs[_COND] if (c - k) * step > 0 and (c - end) * step <= 0]
                if not ahead:
                    break
                k = min(ahead, key=lambda c: abs(c - k))
                continue
            out = self._track(k, False, None, step < 0, None)
            mask = self._mask(out["pred_masks"])
            stop = stop_reason(mask, previous, start_area, self.config)
            if stop is not None:  # this slice is not kept, nor its memory
                reason, previous = stop, None
                self.ious.pop(k, None)
                continue
            self.outputs[_NON_COND][k], self.masks[k], previous = out, mask, mask
            k += step
        return reason

    def propagate(self, start: int, directions: Sequence[int] = (1, -1), lo: int = 0, hi: int | None = None) -> Walk:
        """Walk from conditioning slice ``start`` in each of ``directions`` (``1`` forward, ``-1`` backward), within
        slices ``lo..hi`` (default: the whole volume)."""
        hi = self.frames.depth - 1 if hi is None else hi
        if start not in self.outputs[_COND]:
            raise ConfigError(f"slice {start} holds no prompt: prompt it before propagating from it.")
        if not 0 <= lo <= start <= hi < self.frames.depth:
            raise ConfigError(
                f"propagation range {lo}..{hi} must hold slice {start} and lie in 0..{self.frames.depth - 1}."
            )
        stopped = {}
        with torch.inference_mode():
            for step in directions:
                name = "forward" if step > 0 else "backward"
                if start not in self.masks:
                    stopped[name] = "empty"
                    continue
                stopped[name] = self._walk(start, step, hi if step > 0 else lo)
        held = [k for k in self.masks if lo <= k <= hi]
        first, last = (min(held), max(held)) if held else (start, start - 1)
        return Walk(first, last, stopped)

    def correct(self, index: int, prompts: Prompts, lo: int = 0, hi: int | None = None) -> Walk:
        """Prompt slice ``index`` and propagate onward from it (module docstring); the first prompt of the object
        propagates both ways. A slice beyond the object's current reach also fills the gap back towards it."""
        with torch.inference_mode():
            self.prompt(index, prompts)
        if index == self.anchor:
            return self.propagate(index, (1, -1), lo, hi)
        step = 1 if index > self.anchor else -1
        walk = self.propagate(index, (step,), lo, hi)
        near = next(k for k in range(index - step, self.anchor - step, -step) if self.tracked(k))
        if near != index - step:  # untracked slices between the object and the click: walk back across them
            with torch.inference_mode():
                walk.stopped["backward" if step > 0 else "forward"] = self._walk(index, -step, near + step)
        held = [k for k in self.masks if lo <= k <= (self.frames.depth - 1 if hi is None else hi)]
        walk.first, walk.last = (min(held), max(held)) if held else (index, index - 1)
        return walk

    def volume_mask(self) -> np.ndarray:
        """``(D, H, W)`` bool: the object on every slice (slice axis first)."""
        out = np.zeros((self.frames.depth, *self.frames.shape), dtype=bool)
        for k, mask in self.masks.items():
            out[k] = mask
        return out

    def result(self, walk: Walk, axis: int) -> PropagationResult:
        """The object as :func:`medseg.inference.propagate.propagate` returns it, ``axis`` the slice axis."""
        return PropagationResult(
            np.moveaxis(self.volume_mask(), 0, axis), walk.first, walk.last, walk.stopped, self.frames.encoded
        )


def propagate_sam2(
    frames: Sam2Frames,
    index: int,
    prompts: Prompts,
    config: PropagationConfig | None = None,
    lo: int = 0,
    hi: int | None = None,
) -> PropagationResult:
    """One object from ``prompts`` (2-D, the slice's pixels) on slice ``index`` through slices ``lo..hi`` by memory,
    as :func:`medseg.inference.propagate.propagate` returns it (``config.axis`` the volume's slice axis)."""
    tracker = Sam2Tracker(frames, config)
    return tracker.result(tracker.correct(index, prompts, lo, hi), tracker.config.axis)


def slice_predictor_sam2(frames: Sam2Frames, index: int, config: PropagationConfig | None = None):
    """A ``predict_fn(prompts, prev_mask) -> (H, W) bool`` on slice ``index`` for a click loop
    (:func:`medseg.prompts.simulate.interactive_loop`): SAM 2 on that one frame, no other slice in memory (the image
    predictor's answer), its own previous logits fed back as mask input when the loop passes ``prev_mask``; each call
    carries every prompt so far, which replace the slice's earlier ones."""
    tracker = Sam2Tracker(frames, config)

    def predict(prompts: Prompts, prev_mask: torch.Tensor | None) -> np.ndarray:
        if prev_mask is None:
            tracker.forget(index)
        with torch.inference_mode():
            return tracker.prompt(index, prompts)

    return predict
