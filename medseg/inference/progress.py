"""The progress bar of long inference loops (cases of ``medseg predict``, slices of a propagation).

One rich bar on standard error (standard output stays for results), transient (it disappears when done), and
nothing at all when disabled or when the loop is too short to need one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import Progress

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(
    enabled: bool, total: int, description: str, minimum: int = 1
) -> Iterator[Callable[[str | None], None]]:
    """``with progress_bar(on, n, "cases") as advance:`` ... ``advance(label)`` after each of ``n`` steps.

    Args:
        enabled: show the bar (``--no-progress`` turns it off).
        total: the number of steps.
        description: the bar's label; ``advance(label)`` shows another one until the next step (``None``: this one).
        minimum: fewer steps than this show no bar.

    Yields:
        ``advance(label=None)``: one step done.
    """
    if not enabled or total < minimum:
        yield lambda label=None: None
        return
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(label: str | None = None) -> None:
            bar.update(task, advance=1, description=label or description)

        yield advance
