"""What ``medseg predict`` checks about its outputs before a model loads or a case runs, and the leftovers it clears.

Nothing a user made may be lost, and a run should fail in its first second rather than after an hour of inference.
So every file the run will write is known up front (:func:`case_outputs`: ``<case>.npz`` then ``<case>.nii.gz``,
or a classifier's one table) and :func:`check_outputs` refuses, in one line naming both paths:

- an output that *is* an input: the same file by device and inode, so hard links and symlinks (of the output, of
  the input, or of a folder on the way) are caught, not only equal path strings; the prompts files count as inputs;
- an output folder that is the folder the inputs are in (each label map would overwrite its input, or sit next to
  it under the same case name, and be read as an input by the next run), or that lies inside a DICOM series folder
  being read;
- an output folder or ``--cache-dir`` that cannot be one: a file (or a file on its path), a read-only folder, an
  existing *folder* where an output file goes.

A run killed mid-write leaves at most medseg's own hidden temporaries (:mod:`medseg.atomic`) and, between the two
renames of a case, a ``<case>.npz`` without its label map. :func:`clean_output_folder` removes exactly those before
the next run writes, so the label map's presence keeps meaning "this case is complete"; the case is predicted anew.

:func:`preflight` bundles what can be checked from the command line alone (cases, prompts files, outputs), so the CLI
runs it before loading the model and :func:`~medseg.inference.predictor.predict_cases` again with the model's kind.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from medseg.atomic import remove_orphans
from medseg.errors import ConfigError
from medseg.inference.cases import Case, discover_cases
from medseg.inference.classified import PROBABILITIES_CSV
from medseg.prompts.files import PromptFileError, check_prompts

__all__ = [
    "OUTPUT_FORMATS",
    "SEG_SUFFIX",
    "OutputError",
    "case_outputs",
    "check_folder",
    "check_outputs",
    "clean_output_folder",
    "output_kinds",
    "preflight",
]

log = logging.getLogger("medseg.predict")
_PROBABILITY_ARRAYS = {"probabilities.npy", "labels.npy", "affine.npy"}  # what a case's .npz holds (predictor)


class OutputError(ConfigError):
    """An output path of ``medseg predict`` cannot be written, or would overwrite one of its inputs."""


#: ``--output-format``: a DICOM SEG (``<case>.dcm``), a NIfTI label map (``<case>.nii.gz``), or both.
OUTPUT_FORMATS = ("seg", "nifti", "both")
SEG_SUFFIX = ".dcm"


def output_kinds(case: Case, output_format: str | None = None) -> tuple[bool, bool]:
    """``(DICOM SEG, NIfTI)`` that ``case`` writes: by default a SEG for a DICOM input (what a PACS stores and OHIF
    shows), a NIfTI label map for a NIfTI input.

    Raises:
        ConfigError: an unknown format, or a SEG asked of a NIfTI input (a SEG needs the source series).
    """
    if output_format is None:
        return case.is_dicom, not case.is_dicom
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}.")
    if output_format != "nifti" and not case.is_dicom:
        raise ConfigError(
            f"--output-format {output_format}: {case.path} is not DICOM, and a DICOM SEG references its source "
            f"series. Use --output-format nifti (the default for NIfTI inputs)."
        )
    return output_format in ("seg", "both"), output_format in ("nifti", "both")


def case_outputs(
    name: str, output_dir: str | os.PathLike[str], probabilities: bool = False, seg: bool = False, nifti: bool = True
) -> list[Path]:
    """The files case ``name`` writes, in the order they are renamed: the label map last, as the mark of completion
    (the NIfTI file, or the DICOM SEG when no NIfTI is written)."""
    output_dir = Path(output_dir)
    first = [output_dir / f"{name}.npz"] if probabilities else []
    seg_file = [output_dir / f"{name}{SEG_SUFFIX}"] if seg else []
    return [*first, *seg_file, *([output_dir / f"{name}.nii.gz"] if nifti else [])]


def check_folder(path: str | os.PathLike[str], flag: str) -> Path:
    """Refuse a folder that is a file, lies under a file, or cannot be created or written (nothing is created).

    Args:
        path: the folder, which may not exist yet.
        flag: how the message names it (``-o``, ``--cache-dir``).

    Raises:
        OutputError: naming the path, what is in the way and the fix.
    """
    path = Path(path)
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing.exists() else "is a broken link"
        where = f"{path} {what}" if existing == path else f"{existing}, on the way to {path}, {what}"
        raise OutputError(f"{flag} {path} must be a folder, but {where}. Give a folder path (created if needed).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"{flag} {path}: cannot write into {existing} (read-only). Give a folder you can write to, or change its "
            f"permissions."
        )
    return path


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _input_files(cases: Iterable[Case], prompts: str | os.PathLike[str] | None) -> dict[tuple[int, int], Path]:
    """Every file the run reads, by device and inode: NIfTI files, DICOM slices, prompts files."""
    files: list[Path] = []
    for case in cases:
        series = case.is_dicom and case.path.is_dir()  # a series folder; a single DICOM file is its own input
        files.extend(sorted(p for p in case.path.iterdir() if p.is_file()) if series else case.inputs)
    if prompts is not None:
        prompts = Path(prompts)
        files.extend(sorted(prompts.glob("*.json")) if prompts.is_dir() else [prompts])
    found = {}
    for file in files:
        identity = _identity(file)
        if identity is not None:
            found.setdefault(identity, file)
    return found


def _elsewhere(output_dir: Path) -> Path:
    resolved = output_dir.resolve()
    return resolved.parent / f"{resolved.name or 'medseg'}_predictions"


def check_outputs(
    cases: Sequence[Case],
    output_dir: str | os.PathLike[str],
    *,
    probabilities: bool = False,
    table: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | None = None,
    output_format: str | None = None,
) -> list[Path]:
    """Refuse, before any work, outputs that cannot be written or would overwrite an input (module docstring).

    Args:
        cases: the run's inputs (:func:`medseg.inference.cases.discover_cases`).
        output_dir: ``-o``, which may not exist yet.
        probabilities: whether each case writes ``<case>.npz`` too.
        table: the one file a classifier writes instead of per-case files (``probabilities.csv``).
        cache_dir: ``--cache-dir``, if any.
        prompts: ``--prompts`` (a file, or a folder of ``<case>.json``), read as inputs too.
        output_format: ``--output-format`` (:func:`output_kinds`).

    Returns:
        Every file the run will write.

    Raises:
        OutputError: one line naming the output, the input or obstacle, and the fix.
    """
    output_dir = check_folder(output_dir, "-o")
    if cache_dir is not None:
        check_folder(cache_dir, "--cache-dir")
    fix = f"Give -o a folder that holds no inputs, e.g. {_elsewhere(output_dir)}."
    target = output_dir.resolve()
    for case in cases:
        folder = case.path.resolve() if case.is_dicom and case.path.is_dir() else None
        if folder is not None and target.is_relative_to(folder):
            raise OutputError(f"-o {output_dir} lies inside the DICOM series {case.path} being read as input. {fix}")
        if table is None and case.path.parent.resolve() == target:
            written = case_outputs(case.name, output_dir)[-1]
            raise OutputError(
                f"-o {output_dir} is the folder of the input {case.path}: the label map {written} would overwrite it "
                f"or be read as an input next time. {fix}"
            )
    if table is not None:
        planned = [output_dir / table]
    else:
        planned = []
        for case in cases:
            seg, nifti = output_kinds(case, output_format)
            if probabilities and not nifti:
                raise ConfigError(
                    f"--save-probabilities writes {case.name}.npz beside a NIfTI label map, and {case.path} writes a "
                    f"DICOM SEG only: add --output-format both."
                )
            planned += case_outputs(case.name, output_dir, probabilities, seg, nifti)
    inputs = _input_files(cases, prompts)
    for path in planned:
        if not os.path.lexists(path):
            continue
        if path.is_dir():
            raise OutputError(
                f"output {path} is a folder, where medseg predict writes a file. Move that folder away, or give -o "
                f"another folder."
            )
        source = inputs.get(_identity(path))
        if source is not None:
            raise OutputError(f"output {path} is the input {source} (the same file); writing would destroy it. {fix}")
    return planned


def _is_probabilities(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return set(archive.namelist()) >= _PROBABILITY_ARRAYS
    except (OSError, zipfile.BadZipFile):
        return False


def clean_output_folder(
    output_dir: str | os.PathLike[str], cases: Iterable[Case], cache_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Remove what an interrupted run left: medseg's temporaries, and probabilities whose label map never came.

    Only files medseg names and writes are touched: temporaries matching :data:`medseg.atomic.TEMPORARY_NAME` (in
    ``output_dir`` and ``cache_dir``) and, for the cases of this run, a ``<case>.npz`` holding medseg's arrays
    (``probabilities``, ``labels``, ``affine``) next to no ``<case>.nii.gz``.

    Returns:
        The removed files (a warning names how many and where).
    """
    output_dir = Path(output_dir)
    removed = remove_orphans(output_dir)
    if cache_dir is not None:
        removed += remove_orphans(cache_dir)
    for case in cases:
        npz, *label_maps = case_outputs(case.name, output_dir, probabilities=True, seg=True)  # .dcm, .nii.gz
        complete = any(os.path.lexists(label_map) for label_map in label_maps)
        if npz.is_file() and not complete and _is_probabilities(npz):
            npz.unlink()
            removed.append(npz)
    if removed:
        log.warning(
            "removed %d unfinished file(s) of an interrupted run from %s (e.g. %s); those cases are predicted anew",
            len(removed), output_dir, removed[0].name,
        )  # fmt: skip
    return removed


def preflight(
    source: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    prompts: str | os.PathLike[str] | None = None,
    save_probabilities: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    kind: str | None = None,
    series: str | None = None,
    output_format: str | None = None,
) -> list[Case]:
    """Everything about a prediction run's paths that can be refused before a model loads.

    Args:
        source, output_dir, prompts, cache_dir: as for :func:`medseg.inference.predictor.predict_cases`.
        save_probabilities: ``--save-probabilities`` (dense models write ``<case>.npz`` too).
        kind: the model's kind when known (a ``classifier`` writes one table instead of files per case; a
            promptable model no probabilities).
        series: ``--series``, for DICOM folders holding several series.
        output_format: ``--output-format`` (:func:`output_kinds`; not for a classifier's table).

    Returns:
        The cases (:func:`medseg.inference.cases.discover_cases`).

    Raises:
        ReaderError: no cases. PromptFileError: a missing or malformed prompts file
            (:func:`medseg.prompts.files.check_prompts`). OutputError: see :func:`check_outputs`.
    """
    cases = discover_cases(source, series)
    if prompts is not None:
        if not Path(prompts).exists():
            raise PromptFileError(
                f"prompts file {prompts} does not exist. Give a JSON prompts file or a folder of them."
            )
        for path in sorted(Path(prompts).glob("*.json")) if Path(prompts).is_dir() else [Path(prompts)]:
            check_prompts(path)  # size, JSON, nesting, counts, labels, finite numbers: all but the volume's bounds
    table = PROBABILITIES_CSV if kind == "classifier" else None
    probabilities = save_probabilities and kind in (None, "dense")
    check_outputs(
        cases, output_dir, probabilities=probabilities, table=table, cache_dir=cache_dir, prompts=prompts,
        output_format=None if table else output_format,
    )  # fmt: skip
    return cases
