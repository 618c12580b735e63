"""The CVPR 2025 SegFM3D protocol (one box, five clicks per class) for every promptable model medseg has, on a
dataset's labelled test cases: the README's table of DSC_AUC, NSD_AUC, final DSC / NSD and model seconds per step.

Two kinds of model, each scored by the code ``medseg evaluate`` runs (:mod:`medseg.evaluation.segfm3d_run`):

* ``litemedsam`` (``--dataset DIR``, repeatable): the built-in LiteMedSAM with its real weights, zero-shot,
  2-D slice propagation (:class:`~medseg.evaluation.segfm3d_run.PropagationSession`) along the last RAS axis. Its
  recipe's intensities are applied as the run path's intensity transform, to [0, 1]: CT (channel 0 named ``CT``)
  clipped to MedSAM's soft-tissue window (level 40, width 400 HU, the abdomen window of its CT recipe), other
  modalities to the 0.5 / 99.5 percentiles of the voxels > 0 (MedSAM's MR rule); the record names which.
* a trained promptable run folder (``--run DIR``, repeatable: a 3-D model, a 2-D model or a SAM 2 run), evaluated
  exactly as ``medseg evaluate run_dir=DIR "overrides=['task.evaluation.protocol=segfm3d']"`` does: this tool calls
  :func:`medseg.workflows.evaluation.evaluate` and reads the ``protocol`` section of the summary it returns. Like
  that command it rewrites ``DIR/summary.json`` and ``DIR/predictions/``. A run is scored on its own dataset's test
  cases (its saved config's ``data``, so ``MEDSEG_DATA`` must point where it did in training).

Each record holds the means over the scored cases (``dsc_auc``, ``nsd_auc``, ``final_dsc``, ``final_nsd``,
``seconds_per_step``: the model's seconds per step for all classes of a case, clicks simulation and scoring
excluded), ``n_cases``, the mean DSC and NSD per step (box, then clicks 1-5) and each case's numbers. With
``--append`` the records are merged into an existing ``--output`` (same model and dataset: replaced), so the table can
be built one model at a time. Usage (one thread, as the README's table was measured)::

    MEDSEG_DATA=... .venv/bin/python tools/bench_segfm3d.py --threads 1 --dataset $MEDSEG_DATA/Dataset990_Synthetic \\
        --run $MEDSEG_RESULTS/.../fold_0 --ckpt last --table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import ScaleIntensityRanged
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.atomic import atomic_write_json
from medseg.benchmark.machine import machine_facts
from medseg.data.formats import load_dataset_info
from medseg.errors import ConfigError, MedsegError
from medseg.evaluation.interactive_run import InteractiveSettings, load_native_case
from medseg.evaluation.segfm3d import PROTOCOL, Segfm3dSettings, summarize_segfm3d
from medseg.evaluation.segfm3d_run import evaluate_case_segfm3d
from medseg.inference.cache import EmbeddingCache
from medseg.inference.recipe import SliceRecipe
from medseg.paths import find_dataset

__all__ = ["RecipeIntensity", "main", "merge_records", "recipe_for", "record_from_section", "table"]

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "segfm3d_cpu.json"
MEANS = ("dsc_auc", "nsd_auc", "final_dsc", "final_nsd", "seconds_per_step")


class RecipeIntensity:
    """LiteMedSAM's intensity step as a run-path dictionary transform: the recipe's clipping bounds (CT window, or MR
    percentiles of the voxels > 0 computed on the whole volume as MedSAM does) mapped to [0, 1] by MONAI's
    ``ScaleIntensityRanged``; the propagation then min-max scales each resized slice, the recipe's step 3."""

    def __init__(self, recipe: SliceRecipe):
        if recipe.intensity == "none":
            raise ConfigError("RecipeIntensity needs a 'ct' or 'mr' SliceRecipe; 'none' has no bounds to map.")
        self.recipe = recipe

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        lo, hi = self.recipe.bounds(np.asarray(data["image"], dtype=np.float32))
        hi = hi if hi > lo else lo + 1.0  # a constant volume: everything maps to 0 instead of dividing by 0
        scale = ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
        return dict(scale(dict(data)))


def recipe_for(channel_names: Mapping[int, str]) -> tuple[SliceRecipe, str]:
    """LiteMedSAM's recipe for a dataset's channel 0 and a sentence naming it (for the record).

    Raises:
        ConfigError: a multi-channel dataset (LiteMedSAM reads one channel).
    """
    if len(channel_names) != 1:
        raise ConfigError(
            f"--dataset has {len(channel_names)} channels ({dict(channel_names)}); LiteMedSAM reads one channel. "
            f"Give a single-channel dataset."
        )
    name = str(next(iter(channel_names.values())))
    if name.upper() == "CT":
        recipe = SliceRecipe("ct")
        level, width = recipe.window
        return recipe, f"CT window level {level:g} / width {width:g} HU (MedSAM's soft-tissue window) to [0, 1]"
    recipe = SliceRecipe("mr")
    lo, hi = recipe.percentiles
    return recipe, f"{name}: {lo:g} / {hi:g} percentiles of the voxels > 0 (MedSAM's MR rule) to [0, 1]"


def record_from_section(section: Mapping[str, Any]) -> dict[str, Any]:
    """A table record from a ``protocol`` section of ``summary.json`` (:func:`medseg.evaluation.segfm3d.
    summarize_segfm3d`): its means, case count, per-step curves and each scored case's numbers.

    Raises:
        ConfigError: not a segfm3d section, or one without a scored case.
    """
    if section.get("name") != PROTOCOL:
        raise ConfigError(f"expected a '{PROTOCOL}' protocol section, got {section.get('name')!r}.")
    mean = section["mean"]
    if not mean.get("n_cases"):
        raise ConfigError("the segfm3d section scored no case (no test case has a foreground class).")
    record = {key: float(mean[key]) for key in MEANS}
    record.update(
        n_cases=int(mean["n_cases"]),
        n_skipped=int(mean.get("n_skipped", 0)),
        n_failed=int(mean.get("n_failed", 0)),
        dsc_per_step=[float(v) for v in mean["dsc"]],
        nsd_per_step=[float(v) for v in mean["nsd"]],
        per_case={
            case: {key: float(entry[key]) for key in (*MEANS, "total_seconds")} | {"classes": list(entry["classes"])}
            for case, entry in section["per_case"].items()
            if entry.get("classes")
        },
        settings=dict(section["settings"]),
    )
    return record


def evaluate_litemedsam(dataset: Path, max_cases: int | None) -> dict[str, Any]:
    """LiteMedSAM zero-shot on the labelled test cases of ``dataset`` (module docstring)."""
    from medseg.workflows.models import load_model  # lazy: loads the real LiteMedSAM weights

    info = load_dataset_info(dataset / "dataset.json")
    cases = [c for c in info.test if c.label is not None][:max_cases]
    if not cases:
        raise ConfigError(
            f"{dataset} has no labelled test case (imagesTs/ + labelsTs/); the protocol scores references."
        )
    recipe, described = recipe_for(info.channel_names)
    model = load_model("litemedsam", device="cpu").model.eval()
    settings = InteractiveSettings(protocol=PROTOCOL)
    per_case = {}
    with torch.no_grad():
        for case in cases:
            native = load_native_case(case.case_id, case.images, case.label, [RecipeIntensity(recipe)])
            per_case[case.case_id], _ = evaluate_case_segfm3d(
                model, native, info.labels, settings, slice_axis=2, cache=EmbeddingCache(max_items=4096)
            )
            print(f"litemedsam {info.name} {case.case_id}: DSC {per_case[case.case_id].get('dsc')}", file=sys.stderr)
    section = summarize_segfm3d(per_case, Segfm3dSettings.from_mapping(None))
    return {
        "model": "litemedsam",
        "dataset": info.name,
        "kind": "LiteMedSAM (built-in weights), zero-shot, 2-D propagation along the last RAS axis",
        "intensity": described,
        **record_from_section(section),
    }


def run_identity(run_dir: Path) -> tuple[str, str]:
    """``(model_name, dataset folder name)`` of a run folder, from its saved config (``MEDSEG_DATA`` resolves it);
    a run trained on slice sequences (``task.sequence_length`` > 1) is named so, apart from its 2-D-frame twin."""
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    model = str(OmegaConf.select(saved, "model_name", default=run_dir.parent.name))
    length = int(OmegaConf.select(saved, "task.sequence_length", default=1) or 1)
    model = model if length == 1 else f"{model} (sequences of {length} slices)"
    return model, load_dataset_info(find_dataset(str(saved.data.dataset)) / "dataset.json").name


def evaluate_run(run_dir: Path, ckpt: str, max_cases: int | None) -> dict[str, Any]:
    """A trained promptable run under the protocol, through ``medseg evaluate``'s own function (module docstring)."""
    from medseg.workflows.evaluation import evaluate  # lazy: Lightning and the task stack

    overrides = [f"task.evaluation.protocol={PROTOCOL}", "task.evaluation.max_cases=null"]
    cfg = OmegaConf.create(
        {"run_dir": str(run_dir), "ckpt": ckpt, "device": "cpu", "max_cases": max_cases, "nsd_tolerance_mm": 2.0,
         "overrides": overrides}
    )  # fmt: skip
    summary = evaluate(cfg)
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    model, dataset = run_identity(run_dir)
    builder = str(OmegaConf.select(saved, "model._target_", default="?")).rsplit(".", 1)[-1]
    backbone = str(OmegaConf.select(saved, "backbone.name", default="?"))
    return {
        "model": model,
        "dataset": dataset,
        "kind": f"trained run ({builder}, backbone {backbone}), checkpoint {summary.get('checkpoint', ckpt)}; "
        f"trained on {dataset} only",
        "run_dir": str(run_dir),
        "command": f'medseg evaluate run_dir={run_dir} ckpt={ckpt} device=cpu "overrides={overrides}"',
        "intensity": "the run's own intensity transforms (medseg evaluate)",
        **record_from_section(summary["protocol"]),
    }


def merge_records(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with ``new`` added; a new record replaces an old one of the same model and dataset, in its place."""
    key = lambda r: (r["model"], r["dataset"])  # noqa: E731
    fresh = {key(r): dict(r) for r in new}
    merged = [fresh.pop(key(r), dict(r)) for r in old]
    return merged + list(fresh.values())


def table(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: one row per model and dataset, the protocol's means and the mean DSC of each step."""
    lines = [
        "| model | dataset | cases | DSC_AUC | NSD_AUC | final DSC | final NSD | DSC per step (box, clicks 1-5) "
        "| CPU s / step |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['dataset']} | failed: {r['error']} |||||||")
            continue
        curve = " ".join(f"{v:.2f}" for v in r["dsc_per_step"])
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['n_cases']} | {r['dsc_auc']:.3f} | {r['nsd_auc']:.3f} | "
            f"{r['final_dsc']:.3f} | {r['final_nsd']:.3f} | {curve} | {r['seconds_per_step']:.2f} |"
        )
    return "\n".join(lines)


def _read_existing(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("records", []))


def _dataset_job(dataset: Path, max_cases: int | None) -> tuple[str, str, Callable[[], dict[str, Any]]]:
    if not (dataset / "dataset.json").is_file():
        raise ConfigError(f"--dataset {dataset} has no dataset.json; give a folder written by medseg prepare.")
    name = load_dataset_info(dataset / "dataset.json").name
    return "litemedsam", name, lambda: evaluate_litemedsam(dataset, max_cases)


def _run_job(run_dir: Path, ckpt: str, max_cases: int | None) -> tuple[str, str, Callable[[], dict[str, Any]]]:
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise ConfigError(f"--run {run_dir} has no .hydra/config.yaml; give a folder written by medseg train.")
    return (*run_identity(run_dir), lambda: evaluate_run(run_dir, ckpt, max_cases))


def _measure(model: str, dataset: str, job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One model's record with its wall time; a failure becomes ``{"model", "dataset", "error"}`` so that it does not
    discard the minutes spent on the others (a bug's traceback is printed, a user error's message only)."""
    start = time.perf_counter()
    try:
        record = job()
    except Exception as error:
        if not isinstance(error, MedsegError):
            traceback.print_exc()
        message = " ".join(str(error).split())
        print(f"bench_segfm3d.py: error: {model} on {dataset}: {message}", file=sys.stderr, flush=True)
        return {"model": model, "dataset": dataset, "error": f"{type(error).__name__}: {message}"}
    return {**record, "wall_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_segfm3d.py", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, action="append", default=[], help="LiteMedSAM on its test cases")
    parser.add_argument("--run", type=Path, action="append", default=[], help="a trained promptable run folder")
    parser.add_argument("--ckpt", default="best", help="a run's checkpoint: best | last | path (medseg evaluate's)")
    parser.add_argument("--max-cases", type=int, default=None, help="only the first N labelled test cases")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--append", action="store_true", help="merge into --output instead of replacing it")
    parser.add_argument("--table", action="store_true", help="print a markdown table of every record written")
    args = parser.parse_args(argv)
    if not args.dataset and not args.run:
        parser.error("nothing to evaluate: give --dataset DIR (LiteMedSAM) and/or --run DIR (a trained run).")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # every argument checked before the minutes of evaluation
        jobs = [_dataset_job(dataset, args.max_cases) for dataset in args.dataset]
        jobs += [_run_job(run_dir, args.ckpt, args.max_cases) for run_dir in args.run]
    except MedsegError as error:
        print(f"bench_segfm3d.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    records = [_measure(*job) for job in jobs]
    command = " ".join([Path(sys.executable).name, *(sys.argv if argv is None else ["tools/bench_segfm3d.py", *argv])])
    for record in records:
        record.setdefault("command", command)
        record["tool_command"] = command
        record["machine"] = {**machine_facts(), "load_1min": os.getloadavg()[0]}
    merged = merge_records(_read_existing(args.output), records) if args.append else records
    out = {
        "protocol": PROTOCOL,
        "records": merged,
        "notes": (
            "CVPR 2025 SegFM3D protocol (medseg.evaluation.segfm3d): box then 5 clicks per class; DSC_AUC / NSD_AUC "
            "trapezoid over the 5 click steps (range 0-4); NSD at 2 mm; seconds_per_step: the model's time per step "
            "for all classes of a case, CPU, on a shared loaded machine (see machine.load_1min)."
        ),
    }
    atomic_write_json(args.output, out)
    if args.table:
        print(table(merged))
    failed = [f"{r['model']} on {r['dataset']}" for r in records if "error" in r]
    if failed:
        print(f"bench_segfm3d.py: error: {', '.join(failed)} failed (see above and in {args.output})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
