"""What prediction needs from a run's training data, kept in the run folder so that it predicts without the dataset.

A model alone does not say what its output labels are called, how many channels it reads, or how its inputs were
preprocessed (``spacing: median`` is the training set's median spacing). Reading that from the dataset at prediction
time made a run folder useless where the data is not (another machine, a container) and wrote the fingerprint cache
into the dataset (failing on read-only data). ``medseg train`` therefore writes ``run_data.json`` next to the
checkpoints, the same way nnU-Net keeps ``plans.json`` and ``dataset.json`` with a trained model; runs of older
versions without it still fall back to the dataset.

The DICOM SEG codes of the labels (``label_codes`` of ``dataset.json``, :func:`medseg.inference.dicom_seg.
parse_label_codes`) travel the same way, so ``medseg predict -m RUN`` writes a SEG with the dataset's codes where the
dataset is not; a run without codes (or of an older version) writes the generic code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from medseg.atomic import atomic_write_json
from medseg.errors import ConfigError
from medseg.runs import RUN_DATA

__all__ = ["RunData", "plain_label_codes", "read_run_data", "write_run_data"]

_FORMAT = "medseg-run-data/1"


@dataclass(frozen=True)
class RunData:
    """The training data's facts a run's model needs at prediction time.

    Attributes:
        dataset: the dataset's folder name, for the record.
        label_names: label value -> name, background included.
        num_channels: image channels the model reads.
        preprocess: the deterministic transform configs with ``spacing: median`` resolved (plain lists and dicts).
        label_codes: ``{label name: {"category": [value, scheme, meaning], "type": [...]}}`` for the labels that
            ``dataset.json`` gives DICOM codes (empty: none); what ``seg_algorithm(codes=...)`` takes.
    """

    dataset: str
    label_names: dict[int, str]
    num_channels: int
    preprocess: list[Any]
    label_codes: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def _plain(node: Any) -> Any:
    """JSON-ready: Hydra's configs arrive as OmegaConf nodes, also nested inside plain dicts (``pixdim: median``
    resolved into a copy keeps the other values' ListConfigs)."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        return {str(key): _plain(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(value) for value in node]
    return node


def plain_label_codes(codes: Mapping[str, Any] | None, where: str = "label_codes") -> dict[str, dict[str, list[str]]]:
    """``dataset.json``'s ``label_codes`` checked and in one JSON form: ``{name: {"category": [value, scheme,
    meaning], "type": [...]}}`` (``None``: no codes).

    Raises:
        ConfigError: an entry that is not a category and a type of three strings (naming the entry, ``where``).
    """
    from medseg.inference.dicom_seg import parse_label_codes  # lazy: highdicom, needed only for label codes

    def plain(code: Any) -> list[str]:
        return [str(code.value), str(code.scheme_designator), str(code.meaning)]

    return {
        name: {"category": plain(code.category), "type": plain(code.type)}
        for name, code in parse_label_codes(_plain(codes), where).items()
    }


def write_run_data(
    run_dir: str | os.PathLike[str],
    dataset: str,
    label_names: Mapping[str, int],
    num_channels: int,
    preprocess: Sequence[Any],
    label_codes: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<run_dir>/run_data.json`` atomically (labels as nnU-Net's name -> value, preprocessing resolved, and
    the DICOM SEG codes ``dataset.json`` gives in ``label_codes``).

    Raises:
        ConfigError: malformed ``label_codes``, or codes for a label the dataset does not have.
    """
    codes = plain_label_codes(label_codes, f"{dataset}/dataset.json label_codes")
    unknown = sorted(set(codes) - {str(name) for name in label_names})
    if unknown:
        raise ConfigError(
            f'{dataset}/dataset.json label_codes names {", ".join(map(repr, unknown))}, not a label of its "labels" '
            f"({', '.join(map(str, label_names))}). Use the label names as keys."
        )
    data = {
        "format": _FORMAT,
        "dataset": str(dataset),
        "labels": {str(name): int(value) for name, value in label_names.items()},
        "num_channels": int(num_channels),
        "preprocess": [_plain(config) for config in preprocess],
    }
    if codes:
        data["label_codes"] = codes
    return atomic_write_json(Path(run_dir) / RUN_DATA, data)


def read_run_data(run_dir: str | os.PathLike[str]) -> RunData | None:
    """The run's ``run_data.json``, or ``None`` for a run written before medseg kept it.

    Raises:
        ConfigError: the file exists but is not readable as run data (naming the file and the fix).
    """
    path = Path(run_dir) / RUN_DATA
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != _FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {_FORMAT!r}")
        return RunData(
            dataset=str(data["dataset"]),
            label_names={int(value): str(name) for name, value in data["labels"].items()},
            num_channels=int(data["num_channels"]),
            preprocess=list(data["preprocess"]),
            label_codes=plain_label_codes(data.get("label_codes"), f"{path} label_codes"),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(
            f"{path} is not readable run data ({err}). Delete it to fall back to the run's dataset, or retrain."
        ) from None
