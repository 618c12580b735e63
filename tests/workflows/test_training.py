"""What ``medseg train`` returns to sweeps and the benchmark from a promptable run's summary."""

from __future__ import annotations

from medseg.workflows.training import _interactive_metrics


def test_dice_at_k_and_the_segfm3d_protocol_become_test_metrics():
    summary = {
        "interactive": {"foreground_mean": {"dice_at_k": [0.5, 0.6, 0.7], "noc90": 4.0, "box_dice": None}},
        "protocol": {"mean": {"dsc_auc": 2.9, "nsd_auc": 3.1, "final_dsc": 0.8, "final_nsd": 0.85, "n_cases": 2}},
    }
    assert _interactive_metrics(summary) == {
        "test/dice_click1": 0.5, "test/dice_click3": 0.7, "test/noc90": 4.0,
        "test/dsc_auc": 2.9, "test/nsd_auc": 3.1, "test/final_dsc": 0.8, "test/final_nsd": 0.85,
    }  # fmt: skip
    assert _interactive_metrics({"mean": {}, "foreground_mean": {"dice": 0.9}}) == {}  # a dense run
