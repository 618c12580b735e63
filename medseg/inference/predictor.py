"""``medseg predict`` as library functions: one image, one case on disk, or a whole input with a failure summary.

Three levels, each usable on its own (the napari widget calls the first, the CLI the last):

- :func:`predict_image`: a ``(C, X, Y, Z)`` MetaTensor (and, for promptable models, its prompts in voxel indices)
  -> a label map on the image's own grid; no files involved.
- :func:`predict_case`: one NIfTI file or DICOM series -> ``OUTPUT_DIR/<case>.nii.gz``, a ``uint8`` label map
  (``uint16`` above label 255) in the input's exact shape and geometry: a NIfTI input's header (qform and sform with
  their codes) is copied, a DICOM series gets the RAS+ affine MONAI reads from it as both qform and sform. With
  ``save_probabilities``, ``OUTPUT_DIR/<case>.npz`` too (as nnU-Net writes them): ``probabilities`` ``(K, X, Y, Z)``
  float32 class probabilities on the input's grid and array order (voxels sum to 1), ``labels`` the label value of
  each channel, ``affine`` the input's voxel-to-RAS+ affine (mm). Both are written under temporary names and
  renamed together when complete, the probabilities first and the label map last, so a label map means a complete
  case; a case that fails leaves no file of its own behind.
- :func:`predict_cases`: every case of an input (:func:`medseg.inference.cases.discover_cases`), with a progress
  bar; a failing case is recorded in the :class:`~medseg.inference.report.PredictReport` and the others go on. A
  classifier (a ``medseg classify`` run folder) writes one table, ``OUTPUT_DIR/probabilities.csv``, instead
  (:mod:`medseg.inference.classified`).

Before any case runs, every output path is checked (:func:`medseg.inference.preflight.preflight`, which the CLI
calls before the model even loads): none may be an input or land in the inputs' folder, and ``-o`` and
``--cache-dir`` must be writable folders; leftovers of an interrupted run are cleared.

A promptable run of ``medseg train`` is prepared as its interactive evaluation prepares test volumes (its intensity
transforms, the RAS-permuted grid, per-slice min-max; :mod:`medseg.inference.prompted_run`), the built-in
``litemedsam`` with the official LiteMedSAM recipe (:mod:`medseg.inference.prompted`).

Prompts (promptable models) come from a prompts file (:mod:`medseg.prompts.files`), voxel or world coordinates,
checked against each case's shape and affine; ``--prompts`` may also name a folder of ``<case>.json`` files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.data.io import check_header
from medseg.errors import ConfigError, InputShapeError
from medseg.inference.cache import EmbeddingCache
from medseg.inference.cases import Case, check_contrast, discover_cases, read_case
from medseg.inference.classified import predict_classifier_cases
from medseg.inference.dense import foreground_threshold, predict_dense
from medseg.inference.dicom_seg import seg_algorithm, write_seg_for_case
from medseg.inference.loaded import LoadedModel
from medseg.inference.precision import check_precision, inference_precision, prepare_model
from medseg.inference.preflight import case_outputs, check_outputs, clean_output_folder, output_kinds, preflight
from medseg.inference.progress import progress_bar
from medseg.inference.prompted import recipe_for, segment_image_objects
from medseg.inference.prompted_run import predict_run_prompts
from medseg.inference.report import PredictReport
from medseg.inference.sam2_frames import is_sam2_model
from medseg.inference.sam2_run import predict_sam2_prompts
from medseg.inference.writers import write_case_outputs
from medseg.prompts.files import MAX_LABEL, ObjectPrompts, PromptFileError, load_prompts

__all__ = [
    "PredictOptions",
    "Prediction",
    "compile_model",
    "predict_case",
    "predict_cases",
    "predict_image",
]

log = logging.getLogger("medseg.predict")


@dataclass(frozen=True)
class PredictOptions:
    """Settings of a prediction run (the ``medseg predict`` flags).

    Attributes:
        window: CT window for the zero-shot recipe (``LEVEL:WIDTH`` in HU or a preset); ``None``: MR percentiles.
            Trained models keep their own preprocessing.
        tta: mirroring test-time augmentation (dense models).
        save_probabilities: also write ``<case>.npz`` (dense models).
        slice_axis: array axis a promptable 2-D model slices along (default 2, the last).
        progress: progress bars over cases and slices.
        precision: ``auto`` (bf16 autocast on a GPU, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``
            (:mod:`medseg.inference.precision`).
        series: the series to read from DICOM folders that hold several (``--series``: SeriesInstanceUID or a
            unique SeriesDescription).
        batch_size: slices per encoder call for promptable 2-D models (``None``: 1 on CPU, where batching gains
            nothing, 8 on a GPU).
        compile: ``torch.compile`` the model before the first case (:func:`compile_model`); the first call of each
            input shape pays the compilation.
        output_format: ``seg``, ``nifti`` or ``both`` (``--output-format``); ``None``: a DICOM SEG for DICOM inputs,
            NIfTI for NIfTI inputs (:func:`medseg.inference.preflight.output_kinds`).
    """

    window: str | None = None
    tta: bool = False
    save_probabilities: bool = False
    slice_axis: int = 2
    progress: bool = False
    precision: str = "auto"
    batch_size: int | None = None
    series: str | None = None
    compile: bool = False
    output_format: str | None = None

    def slices_per_batch(self, device: torch.device) -> int:
        """``batch_size``, or its default for ``device``."""
        if self.batch_size is not None:
            return self.batch_size
        return 8 if device.type == "cuda" else 1


@dataclass
class Prediction:
    """Attributes: ``labels`` ``(X, Y, Z)`` integer label map on the image's grid; ``probabilities`` ``(K, X, Y,
    Z)`` float32 (dense models) or ``None``; ``class_values`` the label of each channel; ``notes`` remarks for the
    user (e.g. prompts that took no part)."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    class_values: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def compile_model(loaded: LoadedModel) -> None:
    """``--compile``: compile what inference runs of the model in place (state-dict keys unchanged).

    A promptable SAM-style model compiles its click path (prompt encoder and mask decoder,
    :meth:`~medseg.models.promptable.PromptableSegmenter.compile_decoder`: CUDA graphs on a GPU) and, on a GPU, its
    image encoder too; on a CPU the encoder stays eager (its convolutions and matrix products are oneDNN's already,
    and code generation for it costs minutes). Other models compile their forward pass. Compilation happens on the
    first call of each input shape and prompt layout, so it pays only over many slices or cases.

    Raises:
        ConfigError: a promptable model with no compiled path.
    """
    model = loaded.model
    if loaded.kind == "promptable":
        if not hasattr(model, "compile_decoder"):
            raise ConfigError(f"--compile: {type(model).__name__} has no compiled path (SAM-style 2-D models do).")
        if getattr(model, "compiled_mode", None) is None:
            model.compile_decoder()
            if _device(loaded).type == "cuda":
                model.backbone.compile()
        return
    model.compile()


def _readable(cases: list[Case], report: PredictReport, debug: bool) -> list[Case]:
    """The cases whose headers pass every reader check; the others fail now, before any case's inference."""

    def header_ok(case: Case) -> bool:
        for path in case.inputs:
            check_header(path, series=case.series)
        return True

    return [case for case in cases if report.attempt(case.name, lambda case=case: header_ok(case), debug)]


def _channels(loaded: LoadedModel) -> int | None:
    data = loaded.config.get("data") if loaded.config is not None else None
    channels = data.get("num_channels") if data is not None and hasattr(data, "get") else None
    if channels is None:
        channels = getattr(loaded.model, "in_channels", None)
    return int(channels) if isinstance(channels, int) else None


def check_options(loaded: LoadedModel, options: PredictOptions, has_prompts: bool) -> None:
    """Refuse, before any case runs, flags that do not fit the model.

    Raises:
        ConfigError: prompts for a prompt-free model or none for a promptable one, probabilities or TTA for a
            promptable model, a classifier, or a bad slice axis.
    """
    if loaded.kind == "classifier":
        if has_prompts or options.tta or options.save_probabilities:
            raise ConfigError(
                f"{loaded.source} is a classifier: it writes probabilities.csv and takes no --prompts, --tta or "
                f"--save-probabilities. Drop them."
            )
        return
    if loaded.kind == "dense" and has_prompts:
        raise ConfigError(f"{loaded.source} is prompt-free (dense): it needs no --prompts. Drop the option.")
    if loaded.kind == "dense" and max(loaded.label_names, default=0) > MAX_LABEL:
        raise ConfigError(
            f"{loaded.source} has label value {max(loaded.label_names)}, above {MAX_LABEL}, the largest a uint16 label "
            f"map holds. Renumber the labels of its dataset.json and retrain (or export with labels up to {MAX_LABEL})."
        )
    if loaded.kind == "promptable":
        if not has_prompts:
            raise ConfigError(
                f"{loaded.source} is promptable: give --prompts FILE.json with boxes or points per object (see "
                f"medseg.prompts.files for the format)."
            )
        if options.save_probabilities or options.tta:
            raise ConfigError(
                "--save-probabilities and --tta apply to prompt-free (dense) models; a promptable model gives one "
                "thresholded mask per object. Drop them."
            )
    if options.batch_size is not None and options.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 slice, got {options.batch_size}.")
    if options.slice_axis not in (0, 1, 2):
        raise ConfigError(f"--slice-axis must be 0, 1 or 2 (an array axis of the input), got {options.slice_axis}.")


def predict_image(
    loaded: LoadedModel,
    image: MetaTensor,
    objects: Sequence[ObjectPrompts] | None = None,
    options: PredictOptions | None = None,
    cache: EmbeddingCache | None = None,
) -> Prediction:
    """Predict one image already read (:func:`medseg.inference.cases.read_case`) on its own grid.

    Args:
        loaded: any model source's :class:`LoadedModel`.
        image: ``(C, X, Y, Z)`` MetaTensor whose ``affine`` maps voxels to RAS+ mm.
        objects: prompts in voxel indices of ``image`` (promptable models).
        options: window, TTA, slice axis, progress.
        cache: embedding cache (promptable models); a shared one makes a second prompt skip the encoder.

    Raises:
        ConfigError, InputShapeError: a model, flag or image that does not fit (see :func:`check_options`).
    """
    options = options or PredictOptions()
    check_options(loaded, options, bool(objects))
    if loaded.kind == "dense":
        dense = predict_dense(loaded, image, options.tta, options.progress, options.precision)
        return Prediction(dense.labels, dense.probabilities, dense.class_values)
    with inference_precision(options.precision, _device(loaded)):
        return _predict_prompted(loaded, image, objects, options, cache)


def _device(loaded: LoadedModel) -> torch.device:
    return next(iter(loaded.model.parameters()), torch.empty(0)).device


def _predict_prompted(
    loaded: LoadedModel,
    image: MetaTensor,
    objects: Sequence[ObjectPrompts] | None,
    options: PredictOptions,
    cache: EmbeddingCache | None,
) -> Prediction:
    if is_sam2_model(loaded.model):  # SAM 2 / MedSAM2: memory propagation (the embedding cache is not used)
        result = predict_sam2_prompts(
            loaded, image, list(objects or []), slice_axis=options.slice_axis, window=options.window,
            batch_size=options.slices_per_batch(_device(loaded)),
        )  # fmt: skip
        return Prediction(result.labels, None, sorted({0, *(int(o.label) for o in objects or [])}), result.ignored)
    if image.shape[0] != 1:
        raise InputShapeError(
            f"the promptable model takes one-channel 3D volumes; this image has {image.shape[0]} channels (a 4D "
            f"file). Give one 3D volume."
        )
    if loaded.extras.get("recipe") != "litemedsam" and loaded.config.get("data"):
        result = predict_run_prompts(
            loaded, image, list(objects or []), options.slice_axis, cache=cache, progress=options.progress
        )
    else:
        result = segment_image_objects(
            loaded.model, image, list(objects or []), recipe=recipe_for(options.window), slice_axis=options.slice_axis,
            cache=cache, progress=options.progress, batch_size=options.slices_per_batch(_device(loaded)),
        )  # fmt: skip
    return Prediction(result.labels, None, sorted({0, *(int(o.label) for o in objects or [])}), result.ignored)


def _prompts_for(case: Case, prompts: str | os.PathLike[str] | None, image: MetaTensor) -> list[ObjectPrompts] | None:
    if prompts is None:
        return None
    path = Path(prompts)
    if path.is_dir():
        path = path / f"{case.name}.json"
        if not path.is_file():
            raise PromptFileError(f"{path}: no prompts file for case {case.name!r}. Add {path.name} to {path.parent}.")
    return load_prompts(path, np.asarray(image.affine), tuple(int(s) for s in image.shape[1:]))


def _contrast_rule(loaded: LoadedModel, options: PredictOptions) -> tuple[float, str, str] | None:
    """``(threshold, what, hint)`` when the model normalises MR intensities over the voxels above ``threshold``."""
    if loaded.kind == "promptable" and (loaded.extras.get("recipe") == "litemedsam" or not loaded.config.get("data")):
        recipe = "LiteMedSAM's MR recipe (percentiles of the voxels > 0)"
        return None if options.window is not None else (0.0, recipe, " A CT needs --window (e.g. 40:400).")
    threshold = foreground_threshold(loaded)
    return None if threshold is None else (threshold, "the run's MRI normalisation (ForegroundZScored)", "")


def predict_case(
    loaded: LoadedModel,
    case: Case | str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    prompts: str | os.PathLike[str] | None = None,
    options: PredictOptions | None = None,
    cache: EmbeddingCache | None = None,
) -> list[Path]:
    """Predict one case and write ``output_dir/<case>.nii.gz`` (and ``.npz``) atomically (module docstring).

    Returns:
        The written files. On an error none of this case's files is left in ``output_dir``.

    Raises:
        MedsegError: unreadable input, NaN voxels, a shape the model cannot take, bad prompts, ...
    """
    options = options or PredictOptions()
    if not isinstance(case, Case):
        found = discover_cases(case, options.series)
        if len(found) != 1:
            raise ConfigError(f"{case} holds {len(found)} cases; use predict_cases for a folder.")
        case = found[0]
    probabilities = options.save_probabilities and loaded.kind == "dense"
    check_outputs([case], output_dir, probabilities=probabilities, prompts=prompts, output_format=options.output_format)
    seg, nifti = output_kinds(case, options.output_format)
    image = read_case(case.inputs, channels=_channels(loaded), series=case.series)
    rule = _contrast_rule(loaded, options)
    if rule is not None:
        check_contrast(image, case.path, *rule)
    objects = _prompts_for(case, prompts, image)
    prediction = predict_image(loaded, image, objects, options, cache)
    for note in prediction.notes:
        log.warning("%s: %s", case.name, note)
    affine = np.asarray(image.affine, dtype=np.float64)
    arrays = None
    if probabilities and prediction.probabilities is not None:
        labels = np.asarray(prediction.class_values, dtype=np.int64)
        arrays = {"probabilities": prediction.probabilities.astype(np.float32), "labels": labels, "affine": affine}
    written = []
    if seg:  # before the NIfTI label map, which stays the last file (the mark of a complete case)
        algorithm = seg_algorithm(loaded, prompted=objects is not None, codes=loaded.extras.get("label_codes"))
        written.append(write_seg_for_case(case, prediction.labels, algorithm, output_dir, affine=affine))
    if not nifti:
        return written
    *npz, target = case_outputs(case.name, output_dir, arrays is not None)
    reference = affine if case.is_dicom else case.path
    try:
        return [*written, *write_case_outputs(prediction.labels, reference, target, arrays, npz[0] if npz else None)]
    except BaseException:
        for path in written:  # no half-written case: the SEG goes with the failed NIfTI
            path.unlink(missing_ok=True)
        raise


def predict_cases(
    loaded: LoadedModel,
    source: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    prompts: str | os.PathLike[str] | None = None,
    options: PredictOptions | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    debug: bool = False,
) -> PredictReport:
    """Predict every case of ``source`` (a NIfTI file, a DICOM series, or a folder) into ``output_dir``.

    Args:
        loaded: the model (:func:`medseg.workflows.models.load_model`).
        source: the input (:func:`medseg.inference.cases.discover_cases`).
        output_dir: created if needed.
        prompts: a prompts file for every case, or a folder of ``<case>.json`` files.
        options: see :class:`PredictOptions`.
        cache_dir: keep image embeddings on disk too, so a later run on the same images skips the encoder.
        debug: let the first error propagate (with its traceback) instead of recording it.

    Returns:
        :class:`~medseg.inference.report.PredictReport`: files written per case, and each failed case's message.

    Raises:
        MedsegError: the input holds no case, or the flags do not fit the model (before any case runs).
    """
    options = options or PredictOptions()
    cases = preflight(
        source, output_dir, prompts, options.save_probabilities, cache_dir, loaded.kind, series=options.series,
        output_format=options.output_format,
    )  # fmt: skip
    check_options(loaded, options, prompts is not None)
    check_precision(options.precision, _device(loaded))
    prepare_model(loaded.model, options.precision)
    if options.compile:
        compile_model(loaded)
    clean_output_folder(output_dir, cases, cache_dir)
    cache = EmbeddingCache(folder=cache_dir) if loaded.kind == "promptable" else None
    report = PredictReport()
    cases = _readable(cases, report, debug)
    with progress_bar(options.progress, len(cases), "cases", minimum=2) as advance:
        if loaded.kind == "classifier":
            with inference_precision(options.precision, _device(loaded)):
                predict_classifier_cases(loaded, cases, output_dir, report, advance, debug)
            return report
        for case in cases:
            written = report.attempt(
                case.name, lambda case=case: predict_case(loaded, case, output_dir, prompts, options, cache), debug
            )
            if written is not None:
                report.written[case.name] = written
            advance(case.name)
    return report
