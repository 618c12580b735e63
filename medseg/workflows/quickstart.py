"""What ``medseg quickstart`` runs: does pretraining help? LiteMedSAM + LoRA on mni-tissue, pretrained vs scratch.

Both arms are ``medseg train experiment=quickstart`` runs that differ only in ``init`` (the backbone's initial
weights); each trains, then predicts the held-out test cases whole and scores them on the native grid. The arms run
one after the other as separate processes (each ``medseg train`` is a normal, resumable run in its own run folder),
and the table is read from their ``summary.json`` files. A finished arm is not retrained: re-running the command
prints the table again, and an interrupted arm resumes from its last checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from medseg.config import CONFIG_DIR
from medseg.console import wide_console
from medseg.errors import MedsegError
from medseg.evaluation import medseg_metrics
from medseg.evaluation.tables import number, results_table
from medseg.workflows.run_folder import finished_summary

__all__ = ["ARMS", "format_table", "run_dir_for", "run_quickstart"]

ARMS = ("pretrained", "scratch")
EXPERIMENT = "experiment=quickstart"


def run_dir_for(overrides: Sequence[str]) -> tuple[Path, int]:
    """The run folder and step budget that ``medseg train <overrides>`` would use (composed, not run)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return Path(str(cfg.hydra.run.dir)), int(cfg.trainer.max_steps)


def format_table(summaries: dict[str, dict[str, Any]]) -> Any:
    """A rich table: one row per arm, Dice per class, foreground Dice / HD95 (mm) / NSD, parameters and times."""
    first = next(iter(summaries.values()))
    classes = list(medseg_metrics(first)["mean"])
    columns = ["init", *(f"Dice {name}" for name in classes), "Dice fg", "HD95 fg (mm)", "NSD fg (2 mm)", "trainable",
               "steps", "train (s)", "eval (s)"]  # fmt: skip
    rows = []
    for arm, summary in summaries.items():
        view = medseg_metrics(summary)
        fg = view["foreground_mean"]
        rows.append((
            arm, *(number(view["mean"][c]["dice"]) for c in classes), number(fg["dice"]), number(fg["hd95"], 1),
            number(fg["nsd"]),
            f"{summary.get('trainable_params', 0):,} ({summary.get('trainable_percent', 0):.1f} %)",
            str(summary.get("steps_trained", "?")), number(summary.get("train_wall_time_s"), 0),
            number(summary.get("eval_wall_time_s"), 0),
        ))  # fmt: skip
    title = f"Test cases of {first.get('dataset', '?')} (native grid, {first['n_cases']} cases)"
    return results_table(title, columns, rows)


def run_quickstart(overrides: Sequence[str] = ()) -> int:
    """Train and evaluate both arms (unless already finished) and print the comparison table.

    Raises:
        MedsegError: an arm's training failed (its output above says why).
    """
    console = wide_console()
    summaries: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for arm in ARMS:
        arm_overrides = [EXPERIMENT, f"init={arm}", *overrides]
        run_dir, max_steps = run_dir_for(arm_overrides)
        summary = finished_summary(run_dir, max_steps)
        if summary is None:
            console.rule(f"quickstart: init={arm} -> {run_dir}")
            code = subprocess.call([sys.executable, "-m", "medseg.cli", "train", *arm_overrides])  # the CLI: no noise
            if code != 0:
                raise MedsegError(f"the init={arm} arm failed (exit code {code}); see its output above.")
            summary = finished_summary(run_dir, max_steps)
            if summary is None:
                raise MedsegError(f"the init={arm} arm finished without a complete {run_dir}/summary.json.")
        else:
            console.print(f"quickstart: init={arm} already finished in {run_dir}")
        summaries[arm] = summary
    console.print(format_table(summaries))
    console.print(f"quickstart: {time.perf_counter() - started:.0f} s in total; summaries in the run folders above.")
    return 0
