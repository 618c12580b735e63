"""The whole ladder in one command: every (init, protocol) arm as its own run, then one table of their test metrics.

``medseg classify experiment=cls_quickstart`` sets ``ladder: {inits: [...], protocols: [...]}``; :func:`run_ladder`
composes and runs each arm exactly as ``medseg classify <overrides> init=... protocol=...`` would, in its own run
folder, and :func:`ladder_table` prints one row per arm (built by :func:`medseg.evaluation.tables.results_table`,
like ``medseg quickstart``'s table).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from medseg.console import wide_console
from medseg.evaluation.tables import number, results_table
from medseg.workflows.classification.training import train_classifier

__all__ = ["LADDER_COLUMNS", "ladder_table", "run_ladder"]

#: The ladder table's columns: the arm (init, protocol), its test metrics, its trainable parameters and fit time.
LADDER_COLUMNS = ("init", "protocol", "AUROC", "accuracy", "bal. acc.", "kappa", "ECE", "trainable", "fit (s)")


def ladder_table(summaries: Mapping[str, Mapping[str, Any]]) -> Table:
    """A rich table of the test metrics of each arm (``"init/protocol" -> summary.json``)."""
    first = next(iter(summaries.values()))
    title = (
        f"Test cases of {first.get('dataset', '?')} ({first['n_cases']} cases, {first['label_kind']} labels "
        f"{', '.join(first['labels'])})"
    )
    rows = []
    for arm, summary in summaries.items():
        init, protocol = arm.split("/", 1)
        mean = summary["mean"]
        rows.append((
            init, protocol, number(mean["auroc_macro"]), number(mean["accuracy"]), number(mean["balanced_accuracy"]),
            number(mean["kappa"]), number(mean["ece"]), f"{summary.get('trainable_params', 0):,}",
            number(summary.get("fit_wall_time_s"), 0),
        ))  # fmt: skip
    return results_table(title, LADDER_COLUMNS, rows, name_columns=2)


def run_ladder(cfg: DictConfig, base_overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Run every (init, protocol) arm of ``cfg.ladder`` as its own run and print the table; returns the summaries.

    Each arm is ``conf/classify.yaml`` composed with ``base_overrides`` plus ``init=...`` and ``protocol=...``, so
    it is exactly the run ``medseg classify <overrides> init=... protocol=...`` would make, in its own run folder.
    The arms share one feature cache, so kNN and the linear probe of one init encode each case once.
    """
    console = wide_console()
    summaries: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    kept = [o for o in base_overrides if not o.split("=")[0].lstrip("+~").startswith(("protocol", "init", "ladder"))]
    for init in cfg.ladder.inits:
        for protocol in cfg.ladder.protocols:
            overrides = [*kept, f"init={init}", f"protocol={protocol}", "ladder=null"]
            arm = compose("classify", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(arm)
            with_dir = OmegaConf.merge(arm, {"run_dir": str(arm.hydra.run.dir)})
            console.rule(f"ladder: init={init} protocol={protocol} -> {with_dir.run_dir}")
            train_classifier(with_dir)
            summaries[f"{init}/{protocol}"] = json.loads((Path(with_dir.run_dir) / "summary.json").read_text())
    console.print(ladder_table(summaries))
    console.print(f"ladder: {time.perf_counter() - started:.0f} s in total")
    return summaries
