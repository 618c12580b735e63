"""Read the finished runs of a benchmark into long tables: metrics per case (``per_case.csv``) and costs (``cost.csv``).

``summary.json`` is read through :func:`medseg.evaluation.read_summary`. Per case, each metric is written per class
(``dice/grey_matter``) and as the mean over the foreground classes (``dice``), the per-case counterpart of the
summary's ``foreground_mean`` (HD95 skips classes where it is undefined; NaN when it is undefined for all). When a
summary has an ``interactive`` section (promptable runs), its per-case means are added too: ``dice_click1``...
``dice_click10``, ``noc85``, ``noc90``, ``box_dice``, ``propagation_dice``; when it has a SegFM3D ``protocol``
section (``task.evaluation.protocol=segfm3d``), the protocol's per-case numbers as ``segfm3d_dsc_auc``,
``segfm3d_nsd_auc``, ``segfm3d_final_dsc``, ``segfm3d_final_nsd`` and ``segfm3d_seconds_per_step``.

Time is a per-case row too: ``seconds``, the evaluation time of the case (load, predict, invert, write, score;
:mod:`medseg.evaluation.timing`), where the summary records it. ``cost.csv`` gives each arm's
``eval_seconds_per_case``: the evaluation's wall time per test case, set-up included (the summary's
``seconds_per_case``, or ``eval_wall_time_s / n_cases`` for summaries written before it existed).

Compute per arm (:mod:`medseg.benchmark.compute`): ``flops_per_step`` (forward + backward of one step, counted once
per configuration; an nnU-Net run's from its summary's ``nnunet.train_flops_per_step``, counted by its worker on the
network nnU-Net planned), ``train_flops`` (= ``flops_per_step`` x steps trained, per run), ``matched_by`` (``steps``
or ``compute``), ``device_hours`` (the arm's device time in the whole benchmark: training and evaluation of its final
runs plus its learning-rate search, times the devices of a run) and ``flops_note`` (how the count was made, or why it
is unknown). An nnU-Net run's images per step are its planned batch (``nnunet.batch_size``), not ``data.*``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from medseg.evaluation.metrics import METRICS
from medseg.evaluation.segfm3d import PROTOCOL, protocol_per_case
from medseg.evaluation.summary import interactive_per_case, medseg_metrics

__all__ = ["COST_COLUMNS", "PER_CASE_COLUMNS", "SECONDS", "cost_table", "per_case_rows"]

PER_CASE_COLUMNS = ["arm", "dataset", "label_fraction", "seed", "case", "metric", "value"]
COST_COLUMNS = [
    "arm", "trainable_params", "total_params", "trainable_percent", "peak_rss_mb", "peak_gpu_memory_mb",
    "train_wall_time_s", "eval_wall_time_s", "eval_seconds_per_case", "steps", "samples_per_step", "train_steps_per_s",
    "train_samples_per_s", "n_runs", "lr", "search_wall_time_s", "flops_per_step", "train_flops", "matched_by",
    "device_hours", "flops_note",
]  # fmt: skip
_INTERACTIVE = ("noc85", "noc90", "box_dice", "propagation_dice")
SECONDS = "seconds"  # the per-case metric row of a case's evaluation time


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def per_case_rows(summary: Mapping[str, Any], arm: str, label_fraction: float, seed: int) -> list[dict[str, Any]]:
    """The long-format rows of one run's ``summary.json`` (see :data:`PER_CASE_COLUMNS`)."""
    dataset = str(summary.get("dataset", "?"))
    base = {"arm": arm, "dataset": dataset, "label_fraction": float(label_fraction), "seed": int(seed)}
    rows = []
    for case in medseg_metrics(summary)["metric_per_case"]:  # medseg's view: case ids, class names
        case_id = str(case.get("case_id", "?"))
        per_class = case["metrics"]
        for metric in METRICS:
            values = []
            for name, scores in per_class.items():
                value = _number(scores.get(metric))
                values.append(value)
                rows.append({**base, "case": case_id, "metric": f"{metric}/{name}", "value": value})
            finite = [v for v in values if math.isfinite(v)]
            rows.append(
                {**base, "case": case_id, "metric": metric, "value": float(np.mean(finite)) if finite else math.nan}
            )
        if math.isfinite(_number(case.get(SECONDS))):
            rows.append({**base, "case": case_id, "metric": SECONDS, "value": float(case[SECONDS])})
    if summary.get("interactive") is not None:
        for case_id, means in interactive_per_case(summary).items():
            values = {f"dice_click{k}": dice for k, dice in enumerate(means.get("dice_at_k") or (), start=1)}
            values.update({metric: means[metric] for metric in _INTERACTIVE if metric in means})
            rows.extend({**base, "case": str(case_id), "metric": m, "value": _number(v)} for m, v in values.items())
    protocol = summary.get("protocol")
    if isinstance(protocol, Mapping) and protocol.get("name") == PROTOCOL:
        for case_id, numbers in protocol_per_case(summary).items():
            rows.extend(
                {**base, "case": str(case_id), "metric": f"{PROTOCOL}_{m}", "value": _number(v)}
                for m, v in numbers.items()
            )
    return rows


def _run_config(run_dir: Path) -> Any:
    path = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def _samples_per_step(cfg: Any, summary: Mapping[str, Any]) -> float:
    """Training images per optimisation step (volumes per batch x slices or patches per volume), from the run config;
    an nnU-Net run's planned batch."""
    nnunet = summary.get("nnunet") or {}
    if isinstance(nnunet, Mapping) and math.isfinite(_number(nnunet.get("batch_size"))):
        return float(nnunet["batch_size"])
    if cfg is None:
        return math.nan
    batch = OmegaConf.select(cfg, "data.batch_size", default=None)
    samples = OmegaConf.select(cfg, "data.sampling.num_samples", default=1)
    try:
        return float(int(batch) * int(samples or 1))
    except (TypeError, ValueError):
        return math.nan


def _devices(cfg: Any) -> int:
    """Devices one run trains on (``trainer.devices``; ``auto`` and lists count as given, else 1)."""
    devices = OmegaConf.select(cfg, "trainer.devices", default=1) if cfg is not None else 1
    if isinstance(devices, int) and devices > 0:
        return devices
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return max(1, len(devices))
    return 1


def _flops(summary: Mapping[str, Any], compute: Mapping[str, Any]) -> tuple[float, str]:
    nnunet = summary.get("nnunet") or {}
    if isinstance(nnunet, Mapping) and "nnunet" in summary:
        flops = _number(nnunet.get("train_flops_per_step"))
        note = nnunet.get("train_flops_note") or "nnU-Net's summary.json has no FLOP count (a run written before it)"
        return flops, f"nnU-Net worker: {note}"
    return _number(compute.get("flops_per_step")), str(compute.get("note") or "not counted")


def _seconds_per_case(summary: Mapping[str, Any]) -> float:
    """Evaluation wall time per test case: the summary's ``seconds_per_case``, else wall time over ``n_cases``."""
    recorded = _number(summary.get("seconds_per_case"))
    if math.isfinite(recorded):
        return recorded
    wall, cases = _number(summary.get("eval_wall_time_s")), _number(summary.get("n_cases"))
    return wall / cases if cases > 0 else math.nan


def cost_table(
    runs: Iterable[Mapping[str, Any]],
    search_seconds: Mapping[str, float] | None = None,
    compute: Mapping[str, Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """One row per arm: parameters, peak memory (MB), mean wall times (s) per run, throughput, chosen lr, compute.

    Args:
        runs: one mapping per finished final run with ``arm``, ``lr`` (``None``: the arm's own, not searched),
            ``run_dir``, ``summary`` (the summary.json dictionary) and ``job`` (its ``job.json`` record, or ``None``).
        search_seconds: total wall time (s) of each arm's learning-rate search.
        compute: per arm ``flops_per_step``, ``note`` and ``matched_by`` (the runner's count; see the module doc).
    """
    per_run = []
    compute = compute or {}
    for run in runs:
        summary, job = run["summary"], run.get("job") or {}
        arm_compute = compute.get(run["arm"]) or {}
        train_s = _number(summary.get("train_wall_time_s"))
        eval_s = _number(summary.get("eval_wall_time_s"))
        steps = _number(summary.get("steps_trained"))
        cfg = _run_config(Path(run["run_dir"]))
        per_step = _samples_per_step(cfg, summary)
        peak = _number(job.get("peak_rss_mb"))
        gpu_peak = _number(job.get("peak_gpu_memory_mb"))
        flops, note = _flops(summary, arm_compute)
        device_s = sum(v for v in (train_s, eval_s) if math.isfinite(v)) * _devices(cfg)
        per_run.append({
            "arm": run["arm"], "lr": _number(run.get("lr")),
            "trainable_params": _number(summary.get("trainable_params")),
            "total_params": _number(summary.get("total_params")),
            "trainable_percent": _number(summary.get("trainable_percent")),
            "peak_rss_mb": peak if math.isfinite(peak) else _number(summary.get("peak_rss_mb")),
            "peak_gpu_memory_mb": gpu_peak if math.isfinite(gpu_peak) else _number(summary.get("peak_gpu_memory_mb")),
            "train_wall_time_s": train_s, "eval_wall_time_s": eval_s,
            "eval_seconds_per_case": _seconds_per_case(summary),
            "steps": steps, "samples_per_step": per_step,
            "train_steps_per_s": steps / train_s if train_s > 0 else math.nan,
            "train_samples_per_s": steps * per_step / train_s if train_s > 0 else math.nan,
            "flops_per_step": flops, "train_flops": flops * steps, "flops_note": note,
            "matched_by": str(arm_compute.get("matched_by") or "steps"), "device_s": device_s,
            "devices": _devices(cfg),
        })  # fmt: skip
    if not per_run:
        return pd.DataFrame(columns=COST_COLUMNS)
    frame = pd.DataFrame(per_run)
    table = frame.groupby("arm", sort=False).agg(
        trainable_params=("trainable_params", "first"), total_params=("total_params", "first"),
        trainable_percent=("trainable_percent", "first"), peak_rss_mb=("peak_rss_mb", "max"),
        peak_gpu_memory_mb=("peak_gpu_memory_mb", "max"), train_wall_time_s=("train_wall_time_s", "mean"),
        eval_wall_time_s=("eval_wall_time_s", "mean"), eval_seconds_per_case=("eval_seconds_per_case", "mean"),
        steps=("steps", "first"),
        samples_per_step=("samples_per_step", "first"), train_steps_per_s=("train_steps_per_s", "mean"),
        train_samples_per_s=("train_samples_per_s", "mean"), n_runs=("lr", "size"), lr=("lr", "first"),
        flops_per_step=("flops_per_step", "first"), train_flops=("train_flops", "mean"),
        matched_by=("matched_by", "first"), device_s=("device_s", "sum"), devices=("devices", "max"),
        flops_note=("flops_note", "first"),
    ).reset_index()  # fmt: skip
    table["search_wall_time_s"] = table["arm"].map(lambda a: (search_seconds or {}).get(a, 0.0))
    table["device_hours"] = (table["device_s"] + table["search_wall_time_s"] * table["devices"]) / 3600.0
    return table[COST_COLUMNS]
