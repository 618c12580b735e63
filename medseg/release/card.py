"""``model_card.md``: Hugging Face style YAML front matter, then what the model does, how it was trained, how well
it does (the test numbers of ``summary.json``, and its from-scratch twin when that run exists) and how not to use it.

Every number in the card comes from ``metadata.json`` (itself copied from the run's ``summary.json``), so the card
and the metadata cannot disagree. The front matter follows the Hub's model card metadata: ``license``,
``library_name``, ``tags``, ``base_model`` (a Hub id, or left out), ``metrics`` and a ``model-index`` with the test
results (:mod:`medseg.release.hub`). The same text is written as ``README.md``, the file the Hub shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from medseg.errors import ConfigError
from medseg.release.hub import hub_base_model, hub_licence, hub_relation

__all__ = ["front_matter", "loading_lines", "model_index", "read_front_matter", "render_model_card"]


def _round(value: Any, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def model_index(metadata: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``model-index`` entry: foreground mean and per-class Dice, HD95 (mm) and NSD on the test split."""
    metrics = metadata["eval_metrics"]
    data = metadata["training_data"]
    values = []
    for metric, label in (("dice", "Dice"), ("hd95", "HD95 (mm)"), ("nsd", "NSD")):
        value = metrics["foreground_mean"].get(metric)
        if value is not None:
            values.append({"type": metric, "value": _round(value), "name": f"foreground mean {label}"})
    for name, per_class in metrics["per_class"].items():
        if per_class.get("dice") is not None:
            values.append({"type": "dice", "value": _round(per_class["dice"]), "name": f"{name} Dice"})
    return [
        {
            "name": metadata["name"],
            "results": [
                {
                    "task": {"type": "image-segmentation", "name": "Medical image segmentation"},
                    "dataset": {"name": data["dataset"], "type": data["dataset"], "split": "test"},
                    "metrics": values,
                }
            ],
        }
    ]


def front_matter(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Hub metadata: identifiers the Hub can link only where real ones exist (see :mod:`medseg.release.hub`)."""
    fmt = metadata["input_format"]
    training = metadata["training"]
    tags = ["medical-imaging", "segmentation", "medseg", "monai", fmt["modality"].lower()]
    backbone = _backbone(training)
    tags += [str(t) for t in (backbone, training.get("adapter")) if t]
    if (metadata.get("peft") or {}).get("files"):
        tags.append("peft")
    base = metadata["weights"].get("base") or {}
    front: dict[str, Any] = {
        **hub_licence(metadata["licence"]),
        "library_name": "medseg",
        "pipeline_tag": "image-segmentation",
        "tags": tags,
    }
    # The Hub id names the official weights: an adapter-only release must sit on the official file (export records
    # its URL only then), a merged one must have started from it (``training.pretrained_weights.official``).
    started = training.get("pretrained_weights") or {}
    official = base.get("url") is not None if base else bool(started.get("official"))
    hub_id = hub_base_model(backbone) if official else None
    if hub_id is not None:
        front["base_model"] = hub_id
        front["base_model_relation"] = hub_relation(metadata["weights"])
    front["metrics"] = ["dice", "hd95", "nsd"]
    front["model-index"] = model_index(metadata)
    if base:
        front["base_model_file"] = {"file": base["file"], "sha256": base["sha256"]}
    return front


def _backbone(training: Mapping[str, Any]) -> str | None:
    """The pretrained backbone's name, or ``None`` for a from-scratch baseline (recorded as ``none`` or missing)."""
    name = training.get("backbone")
    return None if name in (None, "none", "None") else str(name)


def loading_lines(metadata: Mapping[str, Any]) -> list[str]:
    """How to load the release without medseg's loader: ``peft`` (adapter-only LoRA/DoRA, or why it has no PEFT
    files), or ``safetensors`` + the config's builder (merged)."""
    peft = metadata.get("peft") or {}
    name = metadata["name"]
    if metadata["weights"].get("layout") is not None:  # merged: every tensor of the model config.yaml builds
        return [
            "Without medseg's loader: safetensors, and the builder that `config.yaml` names (checked first):",
            "",
            "```python",
            "from hydra.utils import instantiate",
            "from safetensors.torch import load_file",
            "from medseg.release.spec import read_release_config",
            f'model = instantiate(read_release_config("path/to/{name}").model)',
            f'model.load_state_dict(load_file("path/to/{name}/model.safetensors"), strict=True)',
            "```",
            "",
        ]
    if peft.get("files"):
        return [
            "With `peft` (`adapter_config.json` + `adapter_model.safetensors`, the same LoRA tensors under peft's "
            "names) on the base model medseg builds:",
            "",
            "```python",
            "from peft import PeftModel",
            "from medseg.release.peft_adapter import build_peft_base",
            "from medseg.release.spec import read_release_config",
            f'base = build_peft_base(read_release_config("path/to/{name}"), "path/to/'
            f'{metadata["weights"]["base"]["file"]}")',
            f'model = PeftModel.from_pretrained(base, "path/to/{name}").eval()',
            "```",
            "",
        ]
    if peft.get("omitted"):
        return [f"No PEFT files: {peft['omitted']}; medseg's own format above holds the weights.", ""]
    return []


def _count(value: Any) -> str:
    return "n/a" if value is None else f"{int(value):,}"


def _metric_rows(metadata: Mapping[str, Any]) -> list[str]:
    metrics = metadata["eval_metrics"]

    def cell(value: Any, digits: int) -> str:
        return "n/a" if value is None else f"{float(value):.{digits}f}"

    rows = ["| class | Dice | HD95 (mm) | NSD |", "|---|---:|---:|---:|"]
    for name, values in metrics["per_class"].items():
        rows.append(f"| {name} | {cell(values.get('dice'), 3)} | {cell(values.get('hd95'), 2)} | "
                    f"{cell(values.get('nsd'), 3)} |")  # fmt: skip
    fg = metrics["foreground_mean"]
    rows.append(f"| **foreground mean** | {cell(fg.get('dice'), 3)} | {cell(fg.get('hd95'), 2)} | "
                f"{cell(fg.get('nsd'), 3)} |")  # fmt: skip
    return rows


def render_model_card(metadata: Mapping[str, Any], twin: Mapping[str, Any] | None = None) -> str:
    """The card's Markdown text.

    Args:
        metadata: the release's ``metadata.json``.
        twin: the ``summary.json`` of the run's from-scratch twin (same config, ``init=scratch``), if it exists:
            its foreground numbers are shown next to the release's, whichever is better.
    """
    fmt, training, data = metadata["input_format"], metadata["training"], metadata["training_data"]
    name, version = metadata["name"], metadata["version"]
    weights = metadata["weights"]
    fg = metadata["eval_metrics"]["foreground_mean"]
    spacing = " x ".join(f"{s:g}" for s in fmt["spacing_mm"]) + " mm" if fmt["spacing_mm"] else "the input's own"
    size = (
        f"{fmt['slice_size_px']} px slices along RAS axis {fmt['slice_axis']} (longest side resized, zero padded)"
        if fmt["dimensions"] == "2d_slices"
        else f"sliding-window patches of {fmt['patch_size_voxels']} voxels"
    )
    labels = ", ".join(f"{v} = {k}" for k, v in metadata["labels"].items())
    lines = [
        "---",
        yaml.safe_dump(front_matter(metadata), sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name} {version}",
        "",
        metadata["description"],
        "",
        "## Use",
        "",
        "```bash",
        f"medseg predict -m {name} -i image.nii.gz -o out/   # or -m path/to/{name}",
        "medseg verify path/to/release      # checksums, metadata, rebuild, example -> exit 0",
        "```",
        "",
        "```python",
        "import medseg",
        f'loaded = medseg.load_pretrained("{name}")   # LoadedModel: model, config, label_names',
        "```",
        "",
        *loading_lines(metadata),
        "## Input",
        "",
        f"- Modality {fmt['modality']}, {fmt['num_channels']} channel(s): "
        + ", ".join(f"{k}: {v}" for k, v in fmt["channels"].items())
        + ".",
        f"- Reoriented to {fmt['orientation']}, resampled to {spacing}, cropped to the foreground.",
        f"- Intensity: {fmt['intensity']['text']}.",
        f"- Model input: {size}.",
        f"- Output: one label map on the input's grid; labels {labels}. No prompts.",
        "",
        "## Training",
        "",
        (
            f"- Backbone `{_backbone(training)}` ({training.get('init')}), adapter `{training.get('adapter')}`, "
            f"decoder `{training.get('decoder')}`"
            if _backbone(training)
            else f"- Model `{training.get('model')}` trained from scratch (no pretrained backbone)"
        )
        + f"; {_count(training.get('trainable_params'))} of {_count(training.get('total_params'))} parameters "
        f"trained.",
        f"- {training.get('steps_trained') or 'an unrecorded number of'} optimisation steps on "
        f"{data['num_train_cases'] or 'its'} training cases of "
        f"`{data['dataset']}` (fold {data['fold']}, label fraction {data['label_fraction']}), seed "
        f"{training.get('seed')}.",
        f"- Weights: `{weights['mode']}`"
        + (
            f" (deltas on the base file `{weights['base']['file']}`, SHA-256 `{weights['base']['sha256']}`, "
            f"from {weights['base'].get('url') or 'the backbone provider'})."
            if weights.get("base")
            else " (every tensor, no base file needed)."
        ),
        "",
        f"## Results ({metadata['eval_metrics']['n_cases']} test cases, native grid)",
        "",
        *_metric_rows(metadata),
        "",
    ]
    if twin is not None and twin.get("foreground_mean", {}).get("dice") is not None:
        theirs = twin["foreground_mean"]
        verdict = "better" if float(theirs["dice"]) > float(fg["dice"]) else "worse"
        lines += [
            "### Against its from-scratch twin",
            "",
            "The same architecture, adapter, data and budget with a randomly initialised backbone (`init=scratch`):",
            "",
            "| init | Dice fg | HD95 fg (mm) | NSD fg |",
            "|---|---:|---:|---:|",
            f"| {training.get('init')} (this release) | {fg['dice']:.3f} | {fg.get('hd95') or float('nan'):.2f} | "
            f"{fg.get('nsd') or float('nan'):.3f} |",
            f"| scratch | {theirs['dice']:.3f} | {theirs.get('hd95') or float('nan'):.2f} | "
            f"{theirs.get('nsd') or float('nan'):.3f} |",
            "",
            f"The twin did {verdict} on this test set (one seed; no confidence interval).",
            "",
        ]
    lines += ["## Intended use", "", metadata["intended_use"], "", "## Limitations: how not to use it", ""]
    lines += [f"- {item}" for item in metadata["limitations"]]
    lines += [
        "",
        "## Licence",
        "",
        f"Weights: {metadata['licence']}. Training data: {data.get('licence') or 'see the dataset card'}.",
        "",
    ]
    return "\n".join(lines)


def read_front_matter(text: str) -> dict[str, Any]:
    """Parse the YAML front matter of a model card (between the first two ``---`` lines).

    Raises:
        ConfigError: the card has no front matter, or it is not a YAML mapping.
    """
    parts = text.split("\n---\n", 1)
    if not text.startswith("---\n") or len(parts) != 2:
        raise ConfigError("model card has no YAML front matter (it must start with a '---' line and close with one).")
    data = yaml.safe_load(parts[0][4:])
    if not isinstance(data, dict):
        raise ConfigError("model card front matter is not a YAML mapping.")
    return data
