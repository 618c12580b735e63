"""Where the time of an evaluation goes: seconds per phase and per test case, written into ``summary.json``.

A test-time evaluation is a fixed cost (data set-up, the model sent to its device) plus, per case, five phases: read
and preprocess the case (``load``), run the model over the volume (``predict``), take its scores back to the native
grid (``invert``), write the label map (``write``) and score it (``metrics``). :class:`EvaluationClock` times each
phase of each case, so that a summary says both how long a case takes (``seconds_per_case``, and ``seconds`` in each
``metric_per_case`` entry) and which phase to make faster (``eval_seconds``). A case's seconds are intervals inside
the evaluation's wall time, so their sum never exceeds ``eval_wall_time_s``; the rounding keeps it so (a case's
seconds are rounded down to 0.1 ms, the wall time up to 1 ms).

Timings are of the host's clock. Work queued on a GPU is counted in the phase that waits for it: ``predict`` returns
its logits on the host, so the model's GPU time is counted there.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["PHASES", "EvaluationClock", "with_case_seconds"]

PHASES = ("load", "predict", "invert", "write", "metrics")
"""The per-case phases, in the order a case goes through them (a promptable run's ``predict`` is its simulated user)."""


class EvaluationClock:
    """Seconds per phase and per case of one evaluation, from its start (construction) to :meth:`facts`.

    Attributes:
        phases: seconds spent in each phase, summed over the cases.
        cases: seconds spent on each case, summed over its phases.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.phases: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.cases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, case_id: str) -> Iterator[None]:
        """``with clock.phase("predict", case_id):`` counts the block's seconds for the phase and the case."""
        if name not in self.phases:
            raise ValueError(f"unknown evaluation phase {name!r}; use one of {PHASES}.")
        begin = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - begin
            self.phases[name] += seconds
            self.cases[case_id] = self.cases.get(case_id, 0.0) + seconds

    def facts(self) -> dict[str, Any]:
        """The summary fields, measured now: ``eval_wall_time_s``, ``seconds_per_case`` and ``eval_seconds``.

        ``seconds_per_case`` is the wall time over the number of cases (the fixed cost shared out), ``eval_seconds``
        the phases' totals plus ``other``: the wall time outside every phase (set-up, the model's move to its device).
        """
        wall = time.perf_counter() - self.started
        split = {name: round(seconds, 4) for name, seconds in self.phases.items()}
        split["other"] = round(max(wall - sum(self.phases.values()), 0.0), 4)
        return {
            "eval_wall_time_s": math.ceil(wall * 1e3) / 1e3,
            "seconds_per_case": round(wall / len(self.cases), 4) if self.cases else None,
            "eval_seconds": split,
        }


def with_case_seconds(per_case: Sequence[Mapping[str, Any]], seconds: Mapping[str, float]) -> list[dict[str, Any]]:
    """``per_case`` entries (``case_id``, ``metrics``, ...) with each case's ``seconds`` added where it was timed."""
    return [
        {**case, "seconds": math.floor(seconds[case["case_id"]] * 1e4) / 1e4}
        if case.get("case_id") in seconds
        else dict(case)
        for case in per_case
    ]
