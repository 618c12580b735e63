"""``medseg export``: turn a finished run folder into a release folder that someone else can verify and use.

The weights are those of the checkpoint the run's ``summary.json`` was computed from, so the card's numbers belong to
the released weights. Everything is written to a hidden staging folder next to the output; before the release is
renamed into place it is loaded back exactly as a user would load it (:func:`medseg.release.load.load_release`,
checksums included), every tensor of the rebuilt model is compared with the trained one (bit for bit), and the
example's expected output is predicted by that rebuilt model.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import save_file

from medseg.atomic import atomic_write_json, atomic_write_text
from medseg.backbones.weights import load_checkpoint
from medseg.config import instantiate
from medseg.data.datamodule import resolve_median_spacing
from medseg.data.formats import load_dataset_info
from medseg.errors import ConfigError, WeightsError
from medseg.evaluation.summary import read_summary
from medseg.inference.run_data import plain_label_codes
from medseg.paths import find_dataset
from medseg.release.card import render_model_card
from medseg.release.checksums import write_checksums
from medseg.release.example import crop_example, write_expected
from medseg.release.hub import HUB_CARD, hub_base_model
from medseg.release.load import load_release
from medseg.release.metadata import build_metadata, input_format
from medseg.release.peft_adapter import peft_blocker, write_peft_adapter
from medseg.release.spec import CONFIG, FORMAT, METADATA, MODEL_CARD, MODES, WEIGHTS, release_config
from medseg.release.weights import base_weights_record, export_tensors, has_adapters, merged_layout, pretrained_file
from medseg.tasks.checkpointing import load_weights

__all__ = ["export_release", "run_export"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


def _default_name(run_dir: Path) -> str:
    raw = f"medseg-{run_dir.parent.parent.name}-{run_dir.parent.name}".lower()
    return re.sub(r"[^a-z0-9.]+", "-", raw).strip("-")


def _twin_summary(run_dir: Path, init: str) -> dict[str, Any] | None:
    """``summary.json`` of the same run with ``init=scratch`` (``<model>__<adapter>__scratch/fold_k``), if any."""
    if init != "pretrained" or not run_dir.parent.name.endswith("__pretrained"):
        return None
    twin = run_dir.parent.parent / (run_dir.parent.name.removesuffix("__pretrained") + "__scratch") / run_dir.name
    return read_summary(twin / "summary.json") if (twin / "summary.json").is_file() else None


def _summary_checkpoint(run_dir: Path, summary: Mapping[str, Any]) -> Path:
    name = str(summary.get("checkpoint", ""))
    checkpoint = run_dir / "checkpoints" / name
    if not name.endswith(".ckpt") or not checkpoint.is_file():
        raise ConfigError(
            f"{run_dir}/summary.json was computed from checkpoint {name!r}, which is not in {run_dir}/checkpoints; "
            f"re-evaluate the run (`medseg evaluate run_dir={run_dir}`) so that its numbers and weights agree."
        )
    return checkpoint


def _load_run_model(checkpoint: Path, run_cfg: Any, num_classes: int, in_channels: int,
                    labels: Mapping[str, int]) -> torch.nn.Module:  # fmt: skip

    model = instantiate(run_cfg.model, num_classes=num_classes, in_channels=in_channels)
    task = instantiate(run_cfg.task, model=model, label_names=dict(labels))
    load_weights(task, checkpoint)
    return task.model.eval()


def _select(run_cfg: Any, key: str) -> Any:
    """``run_cfg.<key>`` or ``None``: a saved Hydra config keeps ``${hydra:...}`` values that only resolve in a run."""
    return OmegaConf.select(run_cfg, key, default=None, throw_on_resolution_failure=False)


def _run_facts(run_dir: Path, run_cfg: Any, model_cfg: Mapping[str, Any], dataset: str,
               checkpoint: Path) -> dict[str, Any]:  # fmt: skip
    """What ``medseg train`` records in ``summary.json``, rebuilt from the run's config, folder and checkpoint.

    A summary written by ``medseg evaluate`` alone lacks these facts; the card must still name the real backbone,
    model and dataset (never "backbone None ... model None-None ... on None").
    """
    backbone = model_cfg.get("backbone")
    adapter = (model_cfg.get("adapter") or {}).get("name") or _select(run_cfg, "adapter.name")
    parts = run_dir.parent.name.split("__")  # results/<dataset>/<model>__<adapter>__<init>/fold_<k>
    named = _select(run_cfg, "model_name") or (parts[0] if len(parts) == 3 else None)
    built = f"{backbone}-{model_cfg.get('decoder')}" if backbone else model_cfg.get("name")
    step = load_checkpoint(checkpoint).get("global_step")
    return {
        "dataset": dataset,
        "backbone": str(backbone) if backbone else "none",
        "init": _select(run_cfg, "init") or ("pretrained" if model_cfg.get("pretrained") else "scratch"),
        "adapter": adapter or "full",
        "model": str(named or built or model_cfg.get("_target_", "?").rsplit(".", 1)[-1]),
        "fold": _select(run_cfg, "data.fold"),
        "label_fraction": _select(run_cfg, "data.label_fraction"),
        "seed": _select(run_cfg, "seed"),
        "steps_trained": int(step) if isinstance(step, int) else None,
    }


def _assert_same_weights(rebuilt: torch.nn.Module, trained: Mapping[str, torch.Tensor]) -> None:
    """Every tensor of the rebuilt model equals the trained one (``trained``: its state, or for a ``plain`` merged
    release the exported tensors, which are the trained model's merged into the architecture without adapters)."""
    ours, theirs = rebuilt.state_dict(), trained
    differ = sorted(set(ours) ^ set(theirs))
    differ += [k for k in sorted(set(ours) & set(theirs)) if not torch.equal(ours[k].cpu(), theirs[k].cpu())]
    if differ:
        raise WeightsError(
            f"The release rebuilt from its own files differs from the trained model in {len(differ)} tensors "
            f"({differ[:6]}): these weights changed in training but are not part of an adapter-only export. "
            f"Export with --merge instead."
        )


def _defaults(summary: Mapping[str, Any], dataset: Mapping[str, Any], config: Mapping[str, Any],
              twin: Mapping[str, Any] | None) -> tuple[str, str, list[str]]:  # fmt: skip

    fmt = input_format(config)
    classes = ", ".join(k for k, v in config["labels"].items() if int(v) != 0)
    spacing = " x ".join(f"{s:g}" for s in fmt["spacing_mm"]) + " mm" if fmt["spacing_mm"] else "native spacing"
    if summary.get("backbone") in (None, "none"):
        how = f"model {summary.get('model')} trained from scratch (no pretrained backbone) with medseg"
    else:
        how = (
            f"backbone {summary.get('backbone')} ({summary.get('init')}) with a {summary.get('adapter')} adapter, "
            f"model {summary.get('model')}, fine-tuned with medseg"
        )
    description = (
        f"Segments {classes} in {fmt['modality']} images ({', '.join(fmt['channels'].values())}): {how} on "
        f"{summary.get('dataset')}."
    )
    intended = (
        f"Research and teaching: segmenting {classes} on {fmt['modality']} images resembling {summary.get('dataset')}"
        f" (resampled to {spacing}); a starting point for further fine-tuning with medseg. Not for clinical use."
    )
    steps, cases = summary.get("steps_trained"), summary.get("num_train_cases")
    limitations = [
        f"Trained for {steps if steps is not None else 'an unrecorded number of'} steps on "
        f"{cases if cases is not None else 'the training'} cases of one dataset ({summary.get('dataset')}) and tested "
        f"on {summary.get('n_cases')} cases with one seed: the numbers carry no confidence interval and say little "
        f"about other data.",
        "Images unlike the training data (another modality, contrast, field of view, or a resolution far from "
        f"{spacing}) are out of distribution: expect worse results and check every output.",
        "Not a medical device: not validated for diagnosis, treatment or any clinical decision.",
    ]
    fg = summary.get("foreground_mean", {}).get("dice")
    if twin is not None and fg is not None and twin["foreground_mean"].get("dice") is not None:
        theirs = float(twin["foreground_mean"]["dice"])
        if theirs > float(fg):
            limitations.append(
                f"Its from-scratch twin (same architecture, adapter and budget) scored a higher foreground Dice "
                f"({theirs:.3f} vs {float(fg):.3f}): this release is no evidence that pretraining helped here."
            )
    return description, intended, limitations


def export_release(
    run_dir: str | Path,
    output: str | Path,
    name: str | None = None,
    version: str = "0.1.0",
    mode: str | None = None,
    *,
    changelog: Mapping[str, str] | None = None,
    licence: str = "Apache-2.0",
    description: str | None = None,
    intended_use: str | None = None,
    limitations: list[str] | None = None,
    example_slices: int = 3,
    device: str = "cpu",
) -> Path:
    """Export a run folder as a release folder (layout: :mod:`medseg.release.spec`).

    Args:
        run_dir: a run folder of ``medseg train`` with ``.hydra/config.yaml``, ``summary.json`` and the checkpoint
            that summary names.
        output: the release folder to create (must not exist, or be empty).
        name: release name, lower case (default: from the run folder's path).
        version: semantic version ``X.Y.Z``.
        mode: ``merged`` or ``adapter-only``; default: ``adapter-only`` for a pretrained backbone with adapters,
            else ``merged``.
        changelog: ``{version: change}`` (default: ``{version: "First release."}``).
        licence: SPDX identifier of the weights' licence.
        description, intended_use, limitations: card texts; defaults are written from the run's facts.
        example_slices: slices (2-D models) or voxels per axis (3-D) of the example input.
        device: where the export-time self-check and example prediction run.

    Returns:
        The release folder.

    Raises:
        ConfigError: a bad name, version or mode, an existing non-empty output, or a run without summary/checkpoint.
        WeightsError: the rebuilt release differs from the trained model (e.g. adapter-only with changed buffers).
    """
    run_dir, output = Path(run_dir), Path(output)
    name = name or _default_name(run_dir)
    if not _NAME.match(name):
        raise ConfigError(f"release name {name!r}: use lower-case letters, digits, '.', '_' and '-' (e.g. my-model).")
    if not _SEMVER.match(version):
        raise ConfigError(f"release version {version!r} is not semantic: use X.Y.Z, e.g. 0.1.0.")
    if mode is not None and mode not in MODES:
        raise ConfigError(f"export mode must be one of {MODES}, got {mode!r}.")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"{output} already exists and is not empty; remove it or choose another -o folder.")
    saved, summary_path = run_dir / ".hydra" / "config.yaml", run_dir / "summary.json"
    if not saved.is_file():
        raise ConfigError(f"{saved} not found: RUN_DIR must be a run folder written by `medseg train`.")
    if not summary_path.is_file():
        raise ConfigError(f"{summary_path} not found: evaluate the run first (`medseg evaluate run_dir={run_dir}`).")
    run_cfg, summary = OmegaConf.load(saved), read_summary(summary_path)
    data_root = OmegaConf.select(run_cfg, "data.data_root", default=None)
    info = load_dataset_info(find_dataset(str(run_cfg.data.dataset), Path(data_root) if data_root else None))
    _, spacing = resolve_median_spacing(OmegaConf.to_container(run_cfg.data.preprocess.transforms, resolve=True), info)
    checkpoint = _summary_checkpoint(run_dir, summary)
    model = _load_run_model(checkpoint, run_cfg, info.num_classes, info.num_channels, info.labels)
    model_cfg = OmegaConf.to_container(run_cfg.model, resolve=True)
    facts = _run_facts(run_dir, run_cfg, model_cfg, info.root.name, checkpoint)
    summary = {**facts, **{k: v for k, v in summary.items() if v is not None}}
    if mode is None:
        mode = "adapter-only" if has_adapters(model) and model_cfg.get("pretrained") else "merged"
    base = base_weights_record(model_cfg) if mode == "adapter-only" else None
    layout = merged_layout(model) if mode == "merged" else None
    dataset = json.loads((info.root / "dataset.json").read_text(encoding="utf-8"))
    config = release_config(
        run_cfg, name=name, version=version, mode=mode, num_classes=info.num_classes, in_channels=info.num_channels,
        labels=info.labels, channels=dataset.get("channel_names", {}), spacing=spacing, base=base, layout=layout,
    )  # fmt: skip
    codes = plain_label_codes(dataset.get("label_codes"), f"{info.root}/dataset.json label_codes")
    if codes:  # a DICOM SEG written from the release alone carries the dataset's codes
        config["label_codes"] = codes

    staging = output.parent / f".{output.name}.{uuid.uuid4().hex[:12]}.tmp"
    staging.mkdir(parents=True)
    try:
        # One header entry: safetensors writes several in random order, and the file's hash must be reproducible.
        header = {"medseg_release": json.dumps({"format": FORMAT, "name": name, "version": version, "mode": mode})}
        tensors = export_tensors(model, mode)
        save_file(tensors, str(staging / WEIGHTS), metadata=header)
        (staging / WEIGHTS).chmod(0o644)  # readable like the other files (safetensors creates it private)
        atomic_write_text(staging / CONFIG, yaml.safe_dump(config, sort_keys=False))
        peft = None
        if mode == "adapter-only":
            reason = peft_blocker(model, tensors)
            hub_id = hub_base_model(model_cfg.get("backbone"))
            files = write_peft_adapter(staging, model, tensors, hub_id) if reason is None else []
            peft = {"files": files, "base_model": hub_id} if reason is None else {"omitted": reason}
        write_checksums(staging)
        loaded = load_release(staging, device=device)
        _assert_same_weights(loaded.model, tensors if layout == "plain" else model.state_dict())
        cases = [c for c in info.test if c.label is not None] or list(info.test) or list(info.training)
        case = sorted(cases, key=lambda c: c.case_id)[0]
        slice_axis = config["task"]["inference"].get("slice_axis") if getattr(model, "spatial_dims", 2) == 2 else None
        example = crop_example(case.images, case.label, staging, slice_axis, example_slices, case.case_id)
        example = write_expected(loaded, staging, example)
        twin = _twin_summary(run_dir, str(summary.get("init", "")))
        texts = _defaults(summary, dataset, config, twin)
        training = {
            "backbone": summary.get("backbone"), "init": summary.get("init"), "adapter": summary.get("adapter"),
            "adapter_config": {k: v for k, v in (model_cfg.get("adapter") or {}).items() if k != "_target_"},
            "decoder": model_cfg.get("decoder"), "model": summary.get("model"),
            "trainable_params": summary.get("trainable_params"), "total_params": summary.get("total_params"),
            "steps_trained": summary.get("steps_trained"), "seed": summary.get("seed"),
            "learning_rate": OmegaConf.select(run_cfg, "task.optimizer.lr", default=None),
            "train_wall_time_s": summary.get("train_wall_time_s"), "checkpoint": summary.get("checkpoint"),
            "pretrained_weights": pretrained_file(model_cfg),
        }  # fmt: skip
        metadata = build_metadata(
            config, summary, dataset, changelog=changelog or {version: "First release."}, licence=licence,
            description=description or texts[0], intended_use=intended_use or texts[1],
            limitations=limitations if limitations is not None else texts[2], training=training, example=example,
        )  # fmt: skip
        if peft is not None:
            metadata["peft"] = peft
        atomic_write_json(staging / METADATA, metadata)
        card = render_model_card(metadata, twin)
        atomic_write_text(staging / MODEL_CARD, card)
        atomic_write_text(staging / HUB_CARD, card)  # the Hub shows only README.md
        write_checksums(staging)
        if output.is_dir():
            output.rmdir()
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def run_export(
    run_dir: str | Path,
    output: str | Path,
    name: str | None = None,
    version: str = "0.1.0",
    merge: bool = False,
    adapter_only: bool = False,
) -> int:
    """``medseg export RUN_DIR -o RELEASE_DIR [--name N --version X.Y.Z] [--merge | --adapter-only]``; exit code.

    Errors are :class:`~medseg.errors.MedsegError` (printed by the CLI); success prints what was written.
    """
    if merge and adapter_only:
        raise ConfigError("--merge and --adapter-only exclude each other; give one (or neither for the default).")
    mode = "merged" if merge else "adapter-only" if adapter_only else None
    folder = export_release(run_dir, output, name=name, version=version, mode=mode)
    config = yaml.safe_load((folder / CONFIG).read_text(encoding="utf-8"))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(
        f"medseg export: {config['name']} {config['version']} ({config['weights']['mode']}) -> {folder} "
        f"({size / 1e6:.2f} MB). Check it with `medseg verify {folder}`."
    )
    return 0
