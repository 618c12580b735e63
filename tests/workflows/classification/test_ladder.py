"""The ladder's table: one row per (init, protocol) arm, whole in a pipe, through the shared results-table builder."""

from __future__ import annotations

from medseg.console import PIPE_WIDTH, wide_console
from medseg.workflows.classification.ladder import LADDER_COLUMNS, ladder_table


def _summary(auroc: float | None, trainable: int) -> dict:
    mean = {"auroc_macro": auroc, "accuracy": 0.75, "balanced_accuracy": 0.5, "kappa": None, "ece": 0.125}
    return {
        "dataset": "mni-slices", "n_cases": 12, "label_kind": "ordinal", "labels": ["inferior", "superior"],
        "mean": mean, "trainable_params": trainable, "fit_wall_time_s": 12.4,
    }  # fmt: skip


def test_ladder_table_has_one_row_per_arm_and_prints_whole(capsys, monkeypatch):
    summaries = {"pretrained/knn": _summary(0.9, 0), "scratch/full": _summary(None, 1234567)}
    table = ladder_table(summaries)
    assert [c.header for c in table.columns] == list(LADDER_COLUMNS) and table.row_count == 2
    assert [c.justify for c in table.columns[:3]] == ["left", "left", "right"]
    monkeypatch.delenv("COLUMNS", raising=False)
    console = wide_console()
    assert console.width == PIPE_WIDTH
    console.print(table)
    out = capsys.readouterr().out
    assert "…" not in out and "pretrained" in out and "scratch" in out and "1,234,567" in out
    assert "0.900" in out and "n/a" in out and "12" in out and "mni-slices (12 cases, ordinal labels" in out
