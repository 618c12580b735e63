"""The simulated user of promptable training: per-item click lists, correction clicks, mask choice and model inputs.

A training batch starts from :func:`medseg.prompts.sample_prompts` (one object per item, a box and/or clicks drawn
from the prompt mix). :class:`ClickState` then holds each item's clicks across the rounds of the iterative loop and
adds, per round, the click a user would give: at the centre of the largest error region of the current prediction
(:class:`medseg.prompts.ClickSimulator`, positive in a missed region, negative in a false positive one), as SAM,
SAM-Med2D and RITM train. It does so for the whole batch at once, with scipy on the host
(:mod:`medseg.prompts.host_clicks`) or, with ``on_device``, as torch operations on the device that holds the masks
(:mod:`medseg.prompts.device_clicks`), which gives the same clicks without copying masks to the host every round.
Everything here is dimension-agnostic (2-D slices or 3-D patches). The conventions shared with inference (per-image
min-max input, SAM's single-click multi-mask rule) live in :mod:`medseg.inference.recipe`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Resize, SpatialPad
from scipy import ndimage

from medseg.prompts.contract import Prompts, pad_points
from medseg.prompts.device_clicks import DeviceClickSimulator
from medseg.prompts.host_clicks import correction_clicks as host_correction_clicks
from medseg.prompts.simulate import ClickSimulator

__all__ = ["ClickState", "fit_to_model", "mask_iou", "pick_masks", "sequence_targets"]


def fit_to_model(image: torch.Tensor, label: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, *spatial)`` image and label brought to the model input as the training sampler does it.

    The longest side is resized to ``size`` pixels (bilinear/trilinear for the image, nearest for the label) and the
    other sides zero-padded at their end (``conf/data/sampling/slices_2d.yaml``: MONAI ``Resized`` with
    ``size_mode="longest"`` and ``SpatialPadd`` with ``method="end"``).
    """
    ndim = image.ndim - 1
    image = Resize(size, size_mode="longest", mode="bilinear" if ndim == 2 else "trilinear")(image)
    label = Resize(size, size_mode="longest", mode="nearest")(label)
    pad = SpatialPad([size] * ndim, method="end")
    return torch.as_tensor(pad(image)), torch.as_tensor(pad(label))


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU ``(B, M)`` of each of ``M`` masks (``logits > 0``) with the binary ``target (B, 1, *spatial)``.

    Two empty masks agree perfectly (IoU 1), which is what the IoU head should predict for "nothing here". The voxel
    counts are sums of bytes into int32 (exact up to 2^31 voxels), 2x faster on a CPU than sums of booleans.
    """
    pred = (logits > 0).flatten(2).view(torch.uint8)
    ref = (target > 0.5).flatten(2).view(torch.uint8)
    inter = (pred & ref).sum(-1, dtype=torch.int32)
    union = pred.sum(-1, dtype=torch.int32) + ref.sum(-1, dtype=torch.int32) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), 1.0).float()


def pick_masks(per_mask_loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """SAM's multi-mask rule: per item, the mask ``(B, 1, *spatial)`` of lowest loss among ``per_mask_loss (B, M)``."""
    best = per_mask_loss.argmin(dim=1)
    return logits[torch.arange(logits.shape[0], device=logits.device), best][:, None]


class ClickState:
    """The clicks of every item of a batch across the rounds of interactive training.

    Two implementations of the same simulated user, chosen by ``on_device``:

    - on the host (default): per-item Python lists, each round's clicks for the whole batch from
      :func:`medseg.prompts.host_clicks.correction_clicks` (scipy, one labelling for the batch and a distance
      transform on each chosen region's box), which reads the masks as NumPy arrays;
    - on the device: ``[B, N, D]`` / ``[B, N]`` tensors on the prompts' device, each round's clicks for the whole batch
      from :func:`medseg.prompts.device_clicks.correction_clicks` (the same rules as batched torch operations), so no
      mask and no click goes to the host. What is read back per round is a few scalars: how many items got a click
      and the longest click list (which sets the width of the next prompt tensors), besides those of the labelling.

    Both give the clicks of :meth:`ClickSimulator.next_click` (the reference, object after object) and the same
    :meth:`prompts` (clicks packed at the front of each row, padded with label -1 to the longest list, as
    :func:`medseg.prompts.pad_points` does), so a model sees the same tokens and training the same loss. On a CPU the
    host path is the faster (``tools/bench_clicks.py``); the device path is for CUDA.

    Args:
        prompts: the batch's first prompt set (from :func:`medseg.prompts.sample_prompts`); its real points (label
            >= 0) are each item's first clicks, its box and class vector are kept for every round.
        simulator: the correction-click rules (spacing in mm, connectivity, avoid_repeats); the device path follows
            them through :meth:`DeviceClickSimulator.like`.
        on_device: keep the clicks as tensors and simulate them on the masks' device.
    """

    def __init__(self, prompts: Prompts, simulator: ClickSimulator | None = None, on_device: bool = False) -> None:
        self.box = prompts.box
        self.class_vector = prompts.class_vector
        self.simulator = simulator or ClickSimulator()
        self.dims = prompts.spatial_dims
        self.on_device = bool(on_device)
        self._batch = prompts.batch_size
        self._device = next(t.device for t in (prompts.point_coords, self.box, self.class_vector) if t is not None)
        if self.on_device:
            self._init_tensors(prompts)
            return
        self._memo: dict[int, tuple] = {}  # per item, the last error region measured (host_correction_clicks)
        self._coords: list[list[tuple[float, ...]]] = [[] for _ in range(self._batch)]
        self._labels: list[list[int]] = [[] for _ in range(self._batch)]
        if prompts.point_coords is not None:
            for b in range(self._batch):
                real = prompts.point_labels[b] >= 0
                self._coords[b] = [tuple(c) for c in prompts.point_coords[b][real].tolist()]
                self._labels[b] = prompts.point_labels[b][real].tolist()

    def _init_tensors(self, prompts: Prompts) -> None:
        """The device path's state: real clicks packed at the front of each row, as the host path's lists are."""
        self.device_simulator = DeviceClickSimulator.like(self.simulator)
        self._point_coords: torch.Tensor | None = None  # [B, >= width, D] float32, padding at 0
        self._point_labels: torch.Tensor | None = None  # [B, >= width] long, padding -1
        self._count: torch.Tensor | None = None  # [B] real clicks per item
        self._width = 0  # the longest click list (host copy: the width of the round's prompt tensors)
        if prompts.point_coords is None:
            return
        labels = prompts.point_labels
        # stable sort: padding (label -1) to the end of the row, real clicks in their order
        order = torch.argsort((labels < 0).int(), dim=1, stable=True)
        labels = labels.gather(1, order)
        coords = prompts.point_coords.gather(1, order[..., None].expand_as(prompts.point_coords))
        real = labels >= 0
        self._point_coords = torch.where(real[..., None], coords, 0.0)
        self._point_labels = torch.where(real, labels, -1)
        self._count = real.sum(dim=1)
        self._width = int(self._count.max())

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def coords(self) -> list[list[tuple[float, ...]]]:
        """Per item, its clicks' coordinates (array indices), first clicks first (a copy to the host on the device)."""
        if not self.on_device:
            return self._coords
        coords, labels = self.point_tensors()
        if coords is None:
            return [[] for _ in range(self._batch)]
        return [
            [tuple(c) for c, lab in zip(row, row_labels) if lab >= 0]
            for row, row_labels in zip(coords.tolist(), labels.tolist())
        ]

    @property
    def labels(self) -> list[list[int]]:
        """Per item, its clicks' labels (1 positive, 0 negative), in the order of :attr:`coords`."""
        if not self.on_device:
            return self._labels
        _, labels = self.point_tensors()
        if labels is None:
            return [[] for _ in range(self._batch)]
        return [[lab for lab in row if lab >= 0] for row in labels.tolist()]

    def counts(self) -> list[int]:
        """Real clicks per item."""
        if self.on_device:
            return [0] * self._batch if self._count is None else self._count.tolist()
        return [len(c) for c in self._labels]

    def point_tensors(self, dims: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(point_coords [B, N, D] float32, point_labels [B, N] long)`` of every click so far, ``N`` the longest list.

        Padded with coordinates 0 and label -1 (:func:`medseg.prompts.pad_points`' layout); ``(None, None)`` while no
        item has a click. On the device path the tensors stay on the device; the host path builds them on the host,
        with ``dims`` the spatial dimensions to use when the first prompt set had no points or box (default 2).
        """
        if not self.on_device:
            if not any(self._labels):
                return None, None
            dims = self.dims or dims or 2
            coords: Sequence[np.ndarray] = [np.asarray(c, dtype=np.float32).reshape(-1, dims) for c in self._coords]
            return pad_points(coords, self._labels)
        if self._width == 0:
            return None, None
        return self._point_coords[:, : self._width], self._point_labels[:, : self._width]

    def add_corrections(self, targets: np.ndarray | torch.Tensor, predictions: np.ndarray | torch.Tensor) -> int:
        """Add, per item, the click at the centre of the largest error of its prediction.

        Args:
            targets: ``(B, *spatial)`` boolean reference masks (NumPy for the host path, where tensors are copied to the
                host; tensors on the model's device for the device path, where NumPy arrays are moved there first).
            predictions: ``(B, *spatial)`` boolean current predictions, same type and shape.

        Returns:
            How many items got a click (an item predicted perfectly gets none: there is nothing to correct).
        """
        if self.on_device:
            return self._add_on_device(targets, predictions)
        previous = [[tuple(round(v) for v in c) for c in coords] for coords in self._coords]
        rules = self.simulator
        clicks = host_correction_clicks(
            targets, predictions, previous, rules.spacing, rules.connectivity, rules.avoid_repeats, self._memo
        )
        for b, click in enumerate(clicks):
            if click is not None:
                self._coords[b].append(tuple(float(v) for v in click[0]))
                self._labels[b].append(int(click[1]))
        return sum(click is not None for click in clicks)

    def _add_on_device(self, targets: np.ndarray | torch.Tensor, predictions: np.ndarray | torch.Tensor) -> int:
        """The batch's correction clicks from :func:`correction_clicks`, each written after its item's last click."""
        device = self._device
        gt = torch.as_tensor(targets, device=device)
        pred = torch.as_tensor(predictions, device=device)
        batch, dims = gt.shape[0], gt.ndim - 1
        if self._point_coords is None:  # a box- or class-only first prompt: no click yet
            self._point_coords = torch.zeros(batch, 0, dims, dtype=torch.float32, device=device)
            self._point_labels = torch.full((batch, 0), -1, dtype=torch.long, device=device)
            self._count = torch.zeros(batch, dtype=torch.long, device=device)
        previous = self.point_tensors()
        coords, labels, valid = self.device_simulator.correction_clicks(gt, pred, *previous)
        # one free slot after the longest list; each item's click goes to the slot after its own last click (an item
        # without one writes padding onto padding), which keeps the rows packed as the host path's lists
        width = self._width
        self._point_coords = F.pad(self._point_coords[:, :width], (0, 0, 0, 1))
        self._point_labels = F.pad(self._point_labels[:, :width], (0, 1), value=-1)
        slot = self._count.view(batch, 1)
        new_coords = torch.where(valid[:, None], coords, 0).to(torch.float32)
        self._point_coords.scatter_(1, slot[..., None].expand(batch, 1, dims), new_coords.view(batch, 1, dims))
        self._point_labels.scatter_(1, slot, torch.where(valid, labels, -1).view(batch, 1))
        self._count = self._count + valid.long()
        added, self._width = torch.stack([valid.sum(), self._count.max()]).tolist()  # the round's one host read
        return int(added)

    def prompts(self, prev_mask: torch.Tensor | None, device: torch.device | str) -> Prompts:
        """The round's prompt set: the box (if any), every click so far (padded with -1) and the previous logits."""
        kwargs: dict[str, torch.Tensor | None] = {"box": self.box, "class_vector": self.class_vector}
        dims = prev_mask.ndim - 2 if prev_mask is not None else None
        kwargs["point_coords"], kwargs["point_labels"] = self.point_tensors(dims)
        kwargs["prev_mask"] = prev_mask
        return Prompts(**kwargs).to(device)


def sequence_targets(
    labels: torch.Tensor, first: torch.Tensor, class_ids: torch.Tensor, object_mode: str
) -> torch.Tensor:
    """The first slice's object on every slice of a sequence: ``(B, T, 1, S, S)`` float binary masks.

    Args:
        labels: ``(B, T, 1, S, S)`` label maps of the sequence.
        first: ``(B, 1, S, S)`` the object :func:`~medseg.prompts.sample_prompts` drew on slice 0.
        class_ids: ``(B,)`` its class (0: no object, an empty target throughout).
        object_mode: ``class`` (every voxel of the class) or ``component`` (the class's 3-D connected components,
            6-connected, that touch the first slice's object).
    """
    values = labels[:, :, 0].round().long()
    ids = class_ids.to(values.device).view(-1, 1, 1, 1)
    masks = (values == ids) & (ids > 0)
    if object_mode == "component":
        kept = np.zeros(tuple(masks.shape), dtype=bool)
        for b, (mask, seed) in enumerate(zip(masks.cpu().numpy(), first[:, 0].cpu().numpy() > 0.5)):
            components, _ = ndimage.label(mask)
            touching = np.unique(components[0][seed])
            kept[b] = np.isin(components, touching[touching > 0])
        masks = torch.from_numpy(kept).to(values.device)
    return masks[:, :, None].float()
