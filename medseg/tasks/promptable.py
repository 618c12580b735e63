"""Promptable segmentation as a LightningModule: training with a simulated user, interactive validation.

Training follows SAM / SAM-Med2D / RITM. Per batch item one object (a class, or one connected component of it) of the
multi-class label is drawn, and a first prompt set of one type drawn from ``prompt_mix`` (clicks, a jittered box, or
both; :func:`medseg.prompts.sample_prompts`). The image is encoded once; then ``num_iterations`` rounds decode
masks, each round after the first adding one click per item at the centre of the largest error region of the
previous round's mask (positive or negative, :class:`~medseg.tasks.prompt_sampling.ClickState`) and feeding that
round's logits, detached, as ``prev_mask``. The loss is the sum over rounds of ``loss`` (Dice + BCE/focal on the
binary object mask) plus ``iou_weight`` times the MSE between the predicted and the actual IoU of every mask. A round
prompted by a single click and no box asks for SAM's three masks and learns from the best one (lowest loss).

Validation plays the same user on whole validation volumes: per volume up to ``val_slices`` slices holding foreground
(2-D models; the whole volume, through sliding windows of ``roi_size``, for 3-D ones), per present class
``max(val_clicks)`` clicks, and logs Dice after k clicks as ``val/dice_click{k}`` and the Dice after the last click as
``val/dice`` (what checkpoint selection monitors: set ``callbacks.model_checkpoint.monitor=val/dice``, as the promptable
experiments do). Like the dense task's ``val/dice_resampled`` these are on the preprocessed grid and only select
checkpoints; the reported interactive metrics come from :mod:`medseg.evaluation.interactive_run` on the native grid of
the test cases.

The training rounds' correction clicks are simulated for the whole batch at once, where ``clicks_on_device`` says:
``auto`` (the default) on the model's device when it is a CUDA GPU, as batched torch operations
(:func:`medseg.prompts.device_clicks.correction_clicks`, no mask or click copied to the host), and on a CPU with scipy
on the host (:func:`medseg.prompts.host_clicks.correction_clicks`: one labelling for the batch, distance transforms on
the error regions' boxes), the faster of the two there. Both give the clicks of the reference
(:class:`medseg.prompts.ClickSimulator`), so the choice changes speed, not results. Validation and test-time
evaluation click with the reference (:func:`medseg.prompts.interactive_loop`, one object at a time).

Images are min-max scaled to [0, 1] per slice (per volume for 3-D models) before the encoder, as the LiteMedSAM
recipe that evaluation and propagation use does, so training and evaluation inputs follow one convention.

Short slice sequences with memory (``sequence_length`` > 1, SAM 2 / MedSAM2 models only; MedSAM2's fine-tuning): an item
is a patch of ``sequence_length`` consecutive slices along ``slice_axis`` (``data/sampling=patches_3d`` with
``patch_size`` ``S x S`` in plane and the sequence's length along the axis). Its first slice is prompted and corrected
as a 2-D frame is (the first prompt set, then ``num_iterations`` rounds, through SAM 2's own ``_track_step`` with the
previous logits as ``prev_sam_mask_logits``); its final mask is written into SAM 2's memory, and every following slice
is segmented from memory alone, conditioned on the earlier slices (:meth:`~medseg.models.sam2_promptable.
Sam2PromptableSegmenter.track` / ``remember``). The object is the first slice's one, followed through the sequence (its
class; in ``component`` mode the 3-D components that touch it). Every slice adds its mask and IoU losses, plus
``object_weight`` times the binary cross-entropy of SAM 2's object score against the object's presence on the slice (SAM
2 masks a slice whose score says "absent", so that head must learn too; 2-D frames of a SAM 2 model train it the same
way, so that a model fine-tuned on frames alone can propagate through memory). A sequence is min-max scaled as a whole,
as memory propagation scales its volume. Validation stays 2-D.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medseg.errors import ConfigError
from medseg.evaluation.interactive import dice, interactive_objects
from medseg.inference.recipe import decode_best, minmax_per_image, single_click
from medseg.inference.volumetric import volume_predictor
from medseg.models.sam2_promptable import Sam2Memory
from medseg.prompts.simulate import PROMPT_MIX, interactive_loop, sample_prompts
from medseg.tasks.optimization import OptimizationMixin
from medseg.tasks.prompt_sampling import ClickState, fit_to_model, mask_iou, pick_masks, sequence_targets

__all__ = ["PromptableTask"]


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _clicks_on_device(value: bool | str) -> bool | str:
    """``task.clicks_on_device`` as ``"auto"``, ``True`` or ``False`` (a quoted YAML value is a string)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[text]
    raise ConfigError(
        f"task.clicks_on_device must be auto, true or false, got {value!r}; auto simulates the training clicks on "
        f"the model's device when it is a CUDA GPU."
    )


class PromptableTask(OptimizationMixin, L.LightningModule):
    """Trains a promptable model (``encode``/``decode``, ``spatial_dims`` 2 or 3) with simulated clicks and boxes.

    Args:
        model: e.g. :class:`~medseg.models.promptable.PromptableSegmenter`: ``encode(images)`` and
            ``decode(embeddings, prompts, multimask) -> (logits (B, M, *spatial), iou (B, M))``.
        loss: ``loss(logits (B, 1, *spatial), target (B, 1, *spatial))`` on one binary object per item, e.g. MONAI
            ``DiceFocalLoss(sigmoid=True)``.
        optimizer, scheduler, backbone_lr_scale, layer_decay: as :class:`~medseg.tasks.SegmentationTask`.
        prompt_mix: relative weights of ``points``, ``box`` and ``box+points`` first prompts (one type per batch).
        max_points: the first prompt set holds 1..max_points random clicks (1 = SAM's single first click).
        object_mode: ``class`` or ``component`` objects.
        box_jitter: box edge jitter as a fraction of the box side (SAM: 10 %, max 20 px).
        num_iterations: decoding rounds per batch (the first prompt set, then one correction click per round).
        multimask: single-click rounds predict three masks and learn from the best (SAM's ambiguity handling).
        iou_weight: weight of the IoU head's MSE loss.
        val_slices: validation slices per volume (2-D models), spread evenly over the slices with foreground.
        val_clicks: the k of the logged ``val/dice_click{k}``.
        seed: seed of the prompt sampling; each step draws from ``(seed, global_step, rank)`` so resumed runs replay.
        clicks_on_device: ``auto`` (on a CUDA device, not on a CPU), ``true`` or ``false``: simulate the training
            rounds' correction clicks on the model's device rather than with scipy on the host.
        inference: ``slice_axis`` (axis of 2-D slices, RAS array order) and other prediction settings.
        evaluation: settings of the test-time interactive evaluation (:mod:`medseg.evaluation.interactive_run`).
        label_names: ``{name: value}`` of the dataset, background included.
        sequence_length: 1 (2-D frames, the default) or the slices of one training sequence with memory (module
            docstring; a model with SAM 2's memory).
        object_weight: weight of a SAM 2 model's object-score loss (2-D frames and sequences).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        backbone_lr_scale: float = 0.1,
        layer_decay: float | None = None,
        prompt_mix: Mapping[str, float] | None = None,
        max_points: int = 1,
        object_mode: str = "class",
        box_jitter: float = 0.1,
        num_iterations: int = 4,
        multimask: bool = True,
        iou_weight: float = 1.0,
        val_slices: int = 2,
        val_clicks: Sequence[int] = (1, 5),
        seed: int = 0,
        clicks_on_device: bool | str = "auto",
        inference: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
        label_names: Mapping[str, int] | None = None,
        sequence_length: int = 1,
        object_weight: float = 1.0,
    ) -> None:
        super().__init__()
        prompt_mix = dict(_plain(prompt_mix) or PROMPT_MIX)
        inference, evaluation = dict(_plain(inference) or {}), dict(_plain(evaluation) or {})
        val_clicks = sorted(int(k) for k in _plain(val_clicks))
        if num_iterations < 1:
            raise ConfigError(f"task.num_iterations must be at least 1 (the first prompt set), got {num_iterations}.")
        if not val_clicks or val_clicks[0] < 1:
            raise ConfigError(f"task.val_clicks must list click counts >= 1, e.g. [1, 5]; got {val_clicks}.")
        if int(getattr(model, "spatial_dims", 0)) not in (2, 3):
            raise ConfigError(f"{type(model).__name__} has no spatial_dims 2 or 3; a promptable model needs one.")
        clicks_on_device = _clicks_on_device(clicks_on_device)
        sequence_length = int(sequence_length)
        if sequence_length < 1:
            raise ConfigError(f"task.sequence_length must be 1 (2-D frames) or more slices, got {sequence_length}.")
        if sequence_length > 1 and not (hasattr(model, "track") and hasattr(model, "remember")):
            raise ConfigError(
                f"task.sequence_length={sequence_length} trains through SAM 2's memory, which "
                f"{type(model).__name__} lacks; use a SAM 2 backbone (backbone=sam2_hiera_t|s|b_plus|l|medsam2) or "
                f"task.sequence_length=1."
            )
        if hasattr(model, "freeze_unused"):  # DDP: no trainable parameter may go without a gradient
            model.freeze_unused(sequence=sequence_length > 1, mask_prompts=int(num_iterations) > 1)
        # Plain containers only: checkpoints must load with torch.load(weights_only=True) on resume.
        self.save_hyperparameters(
            {
                "backbone_lr_scale": backbone_lr_scale, "layer_decay": layer_decay, "prompt_mix": prompt_mix,
                "max_points": max_points, "object_mode": object_mode, "box_jitter": box_jitter,
                "num_iterations": num_iterations, "multimask": multimask, "iou_weight": iou_weight,
                "val_slices": val_slices, "val_clicks": val_clicks, "seed": seed, "clicks_on_device": clicks_on_device,
                "inference": inference, "evaluation": evaluation, "sequence_length": sequence_length,
                "object_weight": object_weight,
            }
        )  # fmt: skip
        self.model, self.loss = model, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.backbone_lr_scale, self.layer_decay = backbone_lr_scale, layer_decay
        self.prompt_mix, self.max_points, self.object_mode = prompt_mix, int(max_points), object_mode
        self.box_jitter, self.num_iterations, self.multimask = float(box_jitter), int(num_iterations), multimask
        self.iou_weight, self.val_slices, self.val_clicks = float(iou_weight), int(val_slices), val_clicks
        self.seed, self.inference, self.evaluation = int(seed), inference, evaluation
        self.clicks_on_device = clicks_on_device
        self.sequence_length, self.object_weight = sequence_length, float(object_weight)
        self.label_names = {str(k): int(v) for k, v in (label_names or {}).items()}
        self._val_sum = torch.zeros(0)
        self._val_count = torch.zeros(0)

    @property
    def spatial_dims(self) -> int:
        return int(self.model.spatial_dims)

    @property
    def slice_axis(self) -> int:
        """Array axis of the preprocessed (RAS) volume that 2-D slices are taken along."""
        axis = self.inference.get("slice_axis")
        return 2 if axis is None else int(axis)

    # ------------------------------------------------------------------ training
    def _check_batch(self, image: torch.Tensor) -> None:
        dims = image.ndim - 2
        if self.sequence_length > 1:
            size, axis = int(self.model.image_size), self.slice_axis
            expected = [size, size]
            expected.insert(axis, self.sequence_length)
            if list(image.shape[2:]) != expected:
                raise ConfigError(
                    f"sequences of {self.sequence_length} slices along axis {axis} need patches of {expected} voxels, "
                    f"got {tuple(image.shape[2:])}; set data/sampling=patches_3d data.sampling.patch_size={expected}."
                )
            return
        if dims != self.spatial_dims:
            raise ConfigError(
                f"the data gives {dims}-D samples {tuple(image.shape)} but the model is {self.spatial_dims}-D; use "
                f"data/sampling=slices_2d for 2-D models and data/sampling=patches_3d for 3-D ones."
            )
        if dims == 3:  # the volumetric model's roi may be non-cubic, e.g. [64, 64, 32]: patches must match it
            roi = tuple(int(r) for r in self.model.roi_size)
            if tuple(image.shape[2:]) != roi:
                raise ConfigError(
                    f"training patches are {tuple(image.shape[2:])} voxels but the model's roi_size is {list(roi)}; "
                    f"set data.sampling.patch_size={list(roi)} (model.roi_size follows it by default)."
                )
            return
        size = getattr(self.model, "image_size", None)
        if isinstance(size, int) and any(s != size for s in image.shape[2:]):
            raise ConfigError(
                f"training samples are {tuple(image.shape[2:])} but the model takes {size} px per side; set "
                f"data.sampling.size={size}."
            )

    def clicks_on(self, device: torch.device) -> bool:
        """Whether the training rounds on ``device`` simulate their clicks there (``clicks_on_device`` resolved)."""
        if self.clicks_on_device == "auto":
            return device.type == "cuda"
        return bool(self.clicks_on_device)

    def _rng(self) -> np.random.Generator:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return np.random.default_rng([self.seed, int(self.global_step), int(rank)])

    def _round(
        self, embeddings: torch.Tensor, state: ClickState, prev: torch.Tensor | None, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoding round: ``(chosen logits (B, 1, *spatial), mask loss, IoU-head loss, object-score loss)``; the
        last is a SAM 2 model's (module docstring), zero for the others."""
        prompts = state.prompts(prev, embeddings.device)
        multimask = self.multimask and single_click(prompts)
        if not hasattr(self.model, "decode_with_object_score"):
            logits, iou = self.model.decode(embeddings, prompts, multimask=multimask)
            return (*self._mask_losses(logits, iou, target), target.new_zeros(()))
        logits, iou, scores = self.model.decode_with_object_score(embeddings, prompts, multimask=multimask)
        return (*self._mask_losses(logits, iou, target), self._object_loss(scores, target))

    def _object_loss(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """SAM 2's object-score BCE against the object's presence (SAM 2 masks a frame its score calls absent)."""
        return F.binary_cross_entropy_with_logits(scores.float(), target.flatten(1).amax(1, keepdim=True))

    def _mask_losses(
        self, logits: torch.Tensor, iou: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(chosen logits, mask loss, IoU-head loss)`` of one round's masks; several masks train the best one."""
        logits = logits.float()
        B, M = logits.shape[:2]
        if M > 1:
            with torch.no_grad():  # the per-item loss of each candidate only chooses; gradients go through the choice
                per_mask = torch.stack(
                    [
                        torch.stack([self.loss(logits[b : b + 1, m : m + 1], target[b : b + 1]) for m in range(M)])
                        for b in range(B)
                    ]
                )
            chosen = pick_masks(per_mask, logits)
        else:
            chosen = logits
        mask_loss = self.loss(chosen, target)
        iou_loss = F.mse_loss(iou.float(), mask_iou(logits.detach(), target))
        return chosen, mask_loss, iou_loss

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        # plain tensors: a MetaTensor's metadata handling costs more than the prompt path's small operations
        image, label = (torch.Tensor.as_subclass(batch[key], torch.Tensor) for key in ("image", "label"))
        self._check_batch(image)
        if self.sequence_length > 1:
            return self._sequence_step(image, label)
        prompts, target = sample_prompts(
            label, self._rng(), self.prompt_mix, self.max_points, self.object_mode, jitter_fraction=self.box_jitter
        )
        target = target.to(image.device)
        on_device = self.clicks_on(image.device)
        references = target[:, 0].detach() > 0.5
        if not on_device:
            references = references.cpu().numpy()
        embeddings = self.model.encode(minmax_per_image(image.float()))
        state = ClickState(prompts, on_device=on_device)
        prev: torch.Tensor | None = None
        total = image.new_zeros(())
        for index in range(self.num_iterations):
            if index > 0:
                current = prev[:, 0] > 0
                state.add_corrections(references, current if on_device else current.cpu().numpy())
            chosen, mask_loss, iou_loss, object_loss = self._round(embeddings, state, prev, target)
            total = total + mask_loss + self.iou_weight * iou_loss + self.object_weight * object_loss
            prev = chosen.detach()  # SAM: no gradient through the mask prompt of the next round
            if index == 0:
                self.log("train/loss_first", mask_loss, batch_size=image.shape[0])
        self.log("train/loss_last", mask_loss, batch_size=image.shape[0])
        self.log("train/loss", total, prog_bar=True, batch_size=image.shape[0])
        return total

    def _sequence_step(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """One batch of slice sequences through SAM 2's memory (module docstring)."""
        axis = self.slice_axis + 2
        # one intensity scale per sequence, as memory propagation scales a whole volume (a per-slice scale would change
        # the object's contrast from slice to slice): (B, T, C, S, S), (B, T, 1, S, S)
        frames, labels = minmax_per_image(image.float()).movedim(axis, 1), label.movedim(axis, 1)
        batch, length = frames.shape[:2]
        rng, mix, jitter = self._rng(), self.prompt_mix, self.box_jitter
        prompts, first = sample_prompts(
            labels[:, 0], rng, mix, self.max_points, self.object_mode, jitter_fraction=jitter
        )
        targets = sequence_targets(labels, first, prompts.class_vector[:, 0], self.object_mode).to(image.device)
        embeddings = self.model.encode(frames.flatten(0, 1)).unflatten(0, (batch, length))
        memory, total = Sam2Memory(num_frames=length), image.new_zeros(())
        on_device = self.clicks_on(image.device)
        references = targets[:, 0, 0] > 0.5
        references = references if on_device else references.cpu().numpy()
        state = ClickState(prompts, on_device=on_device)
        prev: torch.Tensor | None = None
        for index in range(self.num_iterations):  # the prompted slice: first prompts, then correction clicks
            if index > 0:
                current = prev[:, 0] > 0
                state.add_corrections(references, current if on_device else current.cpu().numpy())
            step = self.model.track(embeddings[:, 0], memory, 0, state.prompts(prev, image.device))
            chosen, frame_loss = self._sequence_losses(step, targets[:, 0])
            total = total + frame_loss
            prev = chosen.detach()
            if index == 0:
                self.log("train/loss_first", frame_loss, batch_size=batch)
        for t in range(1, length):  # the following slices from memory alone
            self.model.remember(memory, t - 1, step)
            step = self.model.track(embeddings[:, t], memory, t)
            _, frame_loss = self._sequence_losses(step, targets[:, t])
            total = total + frame_loss
        self.log("train/loss_last", frame_loss, batch_size=batch)
        self.log("train/loss", total, prog_bar=True, batch_size=batch)
        return total

    def _sequence_losses(self, step: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen logits, mask + IoU + object-score loss)`` of one tracked slice."""
        chosen, mask_loss, iou_loss = self._mask_losses(step.logits, step.iou, target)
        object_loss = self._object_loss(step.object_score_logits, target)
        return chosen, mask_loss + self.iou_weight * iou_loss + self.object_weight * object_loss

    # ------------------------------------------------------------------ validation (interactive)
    def validation_samples(self, image: torch.Tensor, label: torch.Tensor) -> list[tuple[torch.Tensor, np.ndarray]]:
        """Model inputs ``(1, C, *S)`` and label maps ``(*S)`` of one preprocessed volume ``(C, X, Y, Z)``.

        2-D models: up to ``val_slices`` slices along :attr:`slice_axis` at the quantile midpoints of the slices that
        hold foreground, each brought to the model size as the training sampler does. 3-D models: the whole volume,
        min-max scaled, at its own size (the training spacing): :meth:`validation_step` slides windows of the
        model's ``roi_size`` over it, as test-time evaluation does, rather than squeezing it into one roi.
        """
        if self.spatial_dims == 3:
            volume = minmax_per_image(image.float()[None])
            return [(volume, label[0].cpu().numpy().round().astype(np.int64))]
        size = int(self.model.image_size)
        axis = self.slice_axis + 1  # channel first
        present = torch.nonzero(label.movedim(axis, 0).flatten(1).amax(1) > 0).flatten().tolist()
        if not present:
            return []
        # quantile midpoints (25 % and 75 % for two): inside the objects, not on their first and last slices
        spots = ((np.arange(self.val_slices) + 0.5) / self.val_slices * len(present)).astype(int)
        chosen = sorted({present[int(i)] for i in spots})
        samples = []
        for k in chosen:
            img, lab = fit_to_model(image.select(axis, k).float(), label.select(axis, k), size)
            samples.append((minmax_per_image(img[None]), lab[0].cpu().numpy().round().astype(np.int64)))
        return samples

    def _sample_predictor(self, inputs: torch.Tensor):
        """``predict_fn`` of one validation sample: 2-D, one encoding and a decode per click; 3-D, sliding windows."""
        if self.spatial_dims == 3:
            return volume_predictor(self.model, inputs[0], overlap=float(self.inference.get("overlap", 0.25)))
        return self._predictor(self.model.encode(inputs.to(self.device)))

    def _predictor(self, embeddings: torch.Tensor):
        """``predict_fn(prompts, prev_mask)`` of :func:`medseg.prompts.interactive_loop` on one encoded input."""
        state: dict[str, torch.Tensor] = {}

        def predict(prompts, prev_mask):
            previous = state.get("logits") if prev_mask is not None else None
            prompts = prompts.with_prev_mask(previous).to(embeddings.device)
            state["logits"] = decode_best(self.model, embeddings, prompts, self.multimask)
            return torch.sigmoid(state["logits"][0, 0])

        return predict

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros(len(self.val_clicks), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        image, label = batch["image"], batch["label"]
        if image.shape[0] != 1:
            raise ConfigError("interactive validation takes whole volumes one at a time: the val batch size must be 1.")
        labels = self.label_names or {f"class_{v}": v for v in torch.unique(label).tolist()}
        clicks = self.val_clicks[-1]
        for inputs, reference in self.validation_samples(image[0], label[0]):
            predictor = self._sample_predictor(inputs)
            for obj in interactive_objects(reference, labels, self.object_mode):
                masks = interactive_loop(predictor, obj["mask"], clicks)
                scores = [dice(masks[k - 1], obj["mask"]) for k in self.val_clicks]
                self._val_sum += torch.tensor(scores, dtype=torch.float64, device=self.device)
                self._val_count += 1

    def on_validation_epoch_end(self) -> None:
        total = self.all_gather(self._val_sum).reshape(-1, len(self.val_clicks)).sum(0)
        count = self.all_gather(self._val_count).reshape(-1).sum()
        means = total / count.clamp(min=1) if float(count) > 0 else torch.full_like(total, float("nan"))
        for k, value in zip(self.val_clicks, means):
            self.log(f"val/dice_click{k}", value.float(), sync_dist=False, rank_zero_only=False)
        self.log("val/dice", means[-1].float(), prog_bar=True, sync_dist=False, rank_zero_only=False)

    def on_fit_start(self) -> None:
        logged = {"val/dice", *(f"val/dice_click{k}" for k in self.val_clicks)}
        for callback in self.trainer.checkpoint_callbacks:
            monitor = getattr(callback, "monitor", None)
            if monitor and monitor.startswith("val/") and monitor not in logged:
                raise ConfigError(
                    f"the checkpoint callback monitors {monitor!r}, which a promptable task does not log; set "
                    f"callbacks.model_checkpoint.monitor=val/dice (logged: {sorted(logged)})."
                )
