"""A ``medseg classify`` run folder as a model: loading it, probabilities per case, and ``medseg predict``'s table.

A classifier run folder holds :data:`WEIGHTS_FILE` and :data:`CONFIG_FILE` (written by
:func:`medseg.workflows.classification.training.save_classifier`); :func:`load_classifier` rebuilds the model from
them and :func:`predict_probabilities` preprocesses one case exactly as in training. They sit here, in the inference
stage, so that everything which predicts (``medseg predict``, the model loader of ``-m``) finds them without
reaching up to the command that trained the model.

A segmenter writes one file per case; a classifier's natural output is a table, as nnU-Net-style tools and MONAI's
classification bundles write it: ``OUTPUT_DIR/probabilities.csv`` with ``case``, one ``p_<label name>`` column per
class (in the training label order) and ``prediction`` (the most probable class for single-label kinds, the
classes at or above 0.5 joined with ``;`` for multi-label ones). The rows are written once, atomically, after every
case ran, so a crash never leaves a half table; failed cases are reported like a segmenter's.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import MetaTensor
from omegaconf import OmegaConf
from safetensors.torch import load_file

from medseg.atomic import atomic_write_text
from medseg.config import instantiate
from medseg.data.cls_datamodule import classification_transform
from medseg.errors import ConfigError, InputShapeError, WeightsError
from medseg.inference.cache import weights_hash
from medseg.inference.cases import Case
from medseg.inference.loaded import LoadedModel
from medseg.models.knn import KNNHead

if TYPE_CHECKING:
    from medseg.inference.report import PredictReport

__all__ = [
    "CONFIG_FILE",
    "PROBABILITIES_CSV",
    "WEIGHTS_FILE",
    "classification_row",
    "load_classifier",
    "predict_classifier_cases",
    "predict_probabilities",
]

#: The two files of a ``medseg classify`` run folder that make it a model (weights, and how to rebuild it).
WEIGHTS_FILE, CONFIG_FILE = "classifier.safetensors", "classifier.yaml"
PROBABILITIES_CSV = "probabilities.csv"


def load_classifier(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """A :class:`~medseg.inference.loaded.LoadedModel` (kind ``classifier``) from a ``medseg classify`` run folder.

    The model is rebuilt from ``classifier.yaml`` with a scratch backbone (no official weights needed) and then
    loaded strictly from ``classifier.safetensors``.
    """
    run_dir = Path(run_dir)
    if not (run_dir / WEIGHTS_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise WeightsError(f"{run_dir} has no {WEIGHTS_FILE} + {CONFIG_FILE}; train it with `medseg classify` first.")
    record = OmegaConf.load(run_dir / CONFIG_FILE)
    model_cfg = OmegaConf.to_container(record.model, resolve=True)
    model_cfg.update(num_outputs=len(record.label.names), in_channels=int(record.data.in_channels),
                     label_kind=str(record.label.kind), spatial_dims=int(record.data.spatial_dims))  # fmt: skip
    if "pretrained" in model_cfg:
        model_cfg["pretrained"] = False
    model = instantiate(OmegaConf.create(model_cfg))
    state = load_file(str(run_dir / WEIGHTS_FILE))
    if record.head == "knn":
        model.head = KNNHead(state["head.bank"], state["head.targets"], **record.knn)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return LoadedModel(
        model=model, kind="classifier", config=record, label_names=dict(enumerate(record.label.names)),
        source=str(run_dir), weights_id=weights_hash(model),
    )  # fmt: skip


def predict_probabilities(loaded: LoadedModel, image: Any) -> np.ndarray:
    """Class probabilities ``(K,)`` of one case, preprocessed exactly as in training.

    Args:
        loaded: a ``LoadedModel`` of kind ``classifier`` (:func:`load_classifier`).
        image: a file path, a list of channel file paths, or an already read channel-first image (array or tensor,
            before the preset's intensity transforms).
    """
    if loaded.kind != "classifier":
        raise ConfigError(f"predict_probabilities needs a classifier, got a {loaded.kind!r} model.")
    data = loaded.config.data
    is_path = isinstance(image, (str, Path, list, tuple))
    transform = classification_transform(
        OmegaConf.to_container(data.preprocess, resolve=True), int(data.spatial_dims), int(data.size),
        int(data.num_slices), load=is_path,
    )  # fmt: skip
    if not is_path:
        image = image if isinstance(image, MetaTensor) else MetaTensor(torch.as_tensor(np.asarray(image)).float())
    sample = transform({"image": image})
    device = next(iter(loaded.model.parameters())).device
    with torch.no_grad():
        probs = loaded.model.probabilities(sample["image"][None].to(device))
    return probs[0].float().cpu().numpy()


def _label_kind(loaded: LoadedModel) -> str:
    label = loaded.config.get("label") if loaded.config is not None else None
    return str(label.get("kind", "multiclass")) if label is not None else "multiclass"


def classification_row(loaded: LoadedModel, name: str, probabilities: np.ndarray) -> dict[str, object]:
    """The CSV row of one case: its name, each class probability (6 decimals) and the prediction."""
    names = [str(loaded.label_names[i]) for i in range(len(probabilities))]
    row: dict[str, object] = {"case": name}
    row.update({f"p_{n}": f"{float(p):.6f}" for n, p in zip(names, probabilities, strict=True)})
    if _label_kind(loaded) == "multilabel":
        row["prediction"] = ";".join(n for n, p in zip(names, probabilities, strict=True) if p >= 0.5)
    else:
        row["prediction"] = names[int(np.argmax(probabilities))]
    return row


def predict_classifier_cases(
    loaded: LoadedModel,
    cases: list[Case],
    output_dir: str | os.PathLike[str],
    report: PredictReport,
    advance=lambda description: None,
    debug: bool = False,
) -> Path | None:
    """Classify every case and write ``output_dir/probabilities.csv``; failures go to ``report.failed``.

    Args:
        loaded: a ``classifier`` model (:func:`load_classifier`).
        cases: the inputs (:func:`medseg.inference.cases.discover_cases`), each loaded and preprocessed exactly as
            in training (:func:`predict_probabilities`); non-finite probabilities (a NaN-filled
            image) fail the case.
        output_dir: created if needed.
        report: a :class:`~medseg.inference.report.PredictReport` to fill.
        advance: progress callback, called with each case's name.
        debug: let the first error propagate instead of recording it.

    Returns:
        The CSV path, or ``None`` when no case succeeded (then nothing is written).
    """
    if loaded.kind != "classifier":
        raise ConfigError(f"{loaded.source} is a {loaded.kind} model, not a classifier.")

    def row_of(case: Case) -> dict[str, object]:
        probabilities = predict_probabilities(loaded, str(case.path))
        if not np.all(np.isfinite(probabilities)):
            raise InputShapeError(f"{case.path}: the classifier gave non-finite probabilities (NaN or inf voxels?).")
        return classification_row(loaded, case.name, probabilities)

    rows: list[dict[str, object]] = []
    for case in cases:
        row = report.attempt(case.name, lambda case=case: row_of(case), debug)
        if row is not None:
            rows.append(row)
        advance(case.name)
    if not rows:
        return None
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    target = Path(output_dir) / PROBABILITIES_CSV
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, buffer.getvalue())
    for row in rows:
        report.written[str(row["case"])] = [target]
    return target
