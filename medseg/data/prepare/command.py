"""``medseg prepare`` / ``medseg validate``: build the demo datasets, check datasets, print what they hold.

Checking reports every problem of a dataset in one pass, one line per problem naming the file and the fix, and the
exit code says whether any was found, so the command works in scripts and CI.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from medseg.console import wide_console
from medseg.data.classification import check_classification_folder
from medseg.data.cls_datamodule import TABLE_NAMES
from medseg.data.fingerprint import load_or_compute_fingerprint, print_dataset_summary
from medseg.data.formats import load_dataset_info
from medseg.data.prepare.writing import check_writable_folder
from medseg.data.validate import validate_dataset
from medseg.errors import MedsegError
from medseg.paths import DEMO_DATASETS, ENV_DATA, data_root, find_dataset

__all__ = ["build_dataset", "run_prepare"]


def build_dataset(name: str, root: Path, seed: int = 0, force: bool = False, console: Console | None = None) -> Path:
    """Build the named demo dataset under ``root`` unless it is already there (``force`` rebuilds it)."""
    console = console or wide_console(stderr=True)
    module = importlib.import_module(DEMO_DATASETS[name])
    target = root / module.DATASET_NAME
    if target.is_dir() and not force:
        console.print(f"prepare: {name}: {target} exists, skipping the build (use --force to rebuild)")
        return target
    root.mkdir(parents=True, exist_ok=True)
    with console.status(f"prepare: building {name} in {target}"):
        path = module.build(root, seed=seed, force=force)  # the old dataset stays until the new one is complete
    console.print(f"prepare: {name}: built {path}")
    return path


def _is_classification(path: Path) -> bool:
    return not (path / "dataset.json").is_file() and any((path / n).is_file() for n in TABLE_NAMES)


def _check_classification(path: Path, console: Console) -> int:
    """Check and summarise a classification dataset (a table of images and labels); 1 if it has problems."""
    problems, summary = check_classification_folder(path, TABLE_NAMES)
    if problems:
        console.print(f"[bold red]{path.name}: {len(problems)} problem(s)[/]")
        for problem in problems:
            console.print(f"  - {problem}", markup=False, highlight=False, soft_wrap=True)
        return 1
    console.print(f"[green]{path.name}: valid[/] classification table: {summary}", highlight=False, soft_wrap=True)
    return 0


def run_prepare(
    names: Sequence[str],
    check: bool = False,
    output: str | None = None,
    force: bool = False,
    seed: int = 0,
    only_check: bool = False,
) -> int:
    """Build (unless ``only_check``), then validate and summarise each dataset. Returns the exit code.

    Raises:
        ConfigError: a dataset is to be built (it is missing, or ``force``) but the destination (``output`` or
            ``$MEDSEG_DATA``) is a file or cannot be written; checked before any work starts.
    """
    console = wide_console()
    root = Path(output).expanduser().resolve() if output else data_root()
    builds = [n for n in names if n in DEMO_DATASETS and not only_check]
    if any(force or not (root / importlib.import_module(DEMO_DATASETS[n]).DATASET_NAME).is_dir() for n in builds):
        source = "--output" if output else f"${ENV_DATA}" if os.environ.get(ENV_DATA) else "the default ./data"
        check_writable_folder(root, source)  # before any build: a read-only or file destination fails in one line
    failed = 0
    for name in names:
        if name in DEMO_DATASETS and not only_check:
            path = build_dataset(name, root, seed=seed, force=force)
        else:
            path = find_dataset(name, root)
        if _is_classification(path):
            failed += _check_classification(path, console)
            continue
        if check or only_check:
            problems = validate_dataset(path)
            if problems:
                failed += 1
                console.print(f"[bold red]{path.name}: {len(problems)} problem(s)[/]")
                for problem in problems:
                    console.print(f"  - {problem}", markup=False, highlight=False, soft_wrap=True)
                continue
            console.print(f"[green]{path.name}: valid[/] (no problems found)")
        try:
            info = load_dataset_info(path)
            print_dataset_summary(info, load_or_compute_fingerprint(info), console=console)
        except MedsegError as err:
            failed += 1
            console.print(f"[bold red]{path.name}:[/] {err}", highlight=False)
    return 1 if failed else 0
