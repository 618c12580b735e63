"""``medseg verify RELEASE_DIR``: check that a copy of a release is intact and works, and say what was checked.

Four checks, in order, each printed on one line:

1. **checksums**: every file listed in ``sha256sums.txt`` has its SHA-256, and no unlisted file lies in the folder;
2. **metadata**: ``config.yaml`` passes the release rules (safe YAML, no resolvers, allowed targets only) and
   ``metadata.json`` is JSON whose facts (labels, classes, backbone, weights, spacing...) agree with it, ``README.md``
   is ``model_card.md`` and the PEFT files it lists are there. Checksums
   only show that files are intact, not that they tell the truth: anyone who edits a release can recompute them;
3. **rebuild**: the model is rebuilt from ``config.yaml`` and ``model.safetensors`` (and, for an adapter-only
   release, the base weights found and hash-checked), as :func:`medseg.release.load.load_release` does;
4. **example**: the example input is predicted and compared with ``example/expected_label.nii.gz``: identical voxels,
   or a Dice of at least 0.999 for every label.

The exit code is 0 only if all four pass; a failed check ends the run with its reason.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from omegaconf import OmegaConf

from medseg.errors import MedsegError
from medseg.release.checksums import verify_checksums
from medseg.release.example import compare_label_maps, predict_label_map, read_example
from medseg.release.hub import HUB_CARD
from medseg.release.load import load_release
from medseg.release.metadata import metadata_contradictions, read_metadata
from medseg.release.spec import CONFIG, METADATA, MODEL_CARD, WEIGHTS, read_release_config

__all__ = ["CHECKS", "Check", "VerifyReport", "run_verify", "verify_release"]

#: The checks of a full verification, in order.
CHECKS = ("checksums", "metadata", "rebuild", "example")


@dataclass
class Check:
    """One verification step: its name, whether it held, and what was seen."""

    name: str
    passed: bool
    detail: str


@dataclass
class VerifyReport:
    """All checks of a :func:`verify_release` run; ``passed`` only if every check ran and held."""

    release: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return [c.name for c in self.checks] == list(CHECKS) and all(c.passed for c in self.checks)


def _example_check(loaded, folder: Path) -> Check:
    info = read_example(folder)
    started = time.perf_counter()
    predicted = predict_label_map(loaded, [folder / name for name in info["inputs"]])
    expected = np.asarray(nib.load(str(folder / info["expected"])).dataobj)
    result = compare_label_maps(predicted, expected, loaded.label_names)
    seconds = time.perf_counter() - started
    if result["differing_voxels"] is None:
        return Check("example", False, f"prediction shape {predicted.shape} != expected {expected.shape}")
    dice = ", ".join(f"{k} {v:.4f}" for k, v in result["dice"].items())
    detail = (
        f"{info['case_id'] or 'example'} {'x'.join(map(str, predicted.shape))} voxels: "
        f"{'identical labels' if result['identical'] else str(result['differing_voxels']) + ' voxels differ'}; "
        f"Dice {dice} (need >= {info.get('min_dice', 0.999)} or identical) in {seconds:.1f} s"
    )
    return Check("example", bool(result["passed"]), detail)


def _hub_file_problems(folder: Path, metadata: dict) -> list[str]:
    """README.md (the Hub's card) must be model_card.md; the PEFT files metadata.json lists must be there."""
    problems = []
    card, readme = folder / MODEL_CARD, folder / HUB_CARD
    if readme.is_file() and (not card.is_file() or readme.read_bytes() != card.read_bytes()):
        problems.append(f"{HUB_CARD} differs from {MODEL_CARD} (the Hub would show another card than medseg's)")
    for name in (metadata.get("peft") or {}).get("files") or []:
        if not (folder / name).is_file():
            problems.append(f"metadata.json lists the PEFT file {name}, which is missing")
    return problems


def _metadata_check(folder: Path) -> Check:
    try:
        config = OmegaConf.to_container(read_release_config(folder))
        metadata = read_metadata(folder / METADATA)
    except MedsegError as err:
        return Check("metadata", False, str(err))
    problems = metadata_contradictions(metadata, config)
    problems += _hub_file_problems(folder, metadata)
    if problems:
        return Check(
            "metadata", False, f"{folder / METADATA} contradicts config.yaml: {'; '.join(problems)}. Re-export it."
        )
    labels = ", ".join(f"{v}={k}" for k, v in config["labels"].items())
    backbone = config["model"].get("backbone") or config["model"].get("name") or "?"
    return Check(
        "metadata", True, f"config.yaml is a plain release config; metadata.json agrees ({labels}; {backbone})"
    )


def verify_release(
    path: str | Path,
    device: str = "cpu",
    base_weights: str | Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Run the four checks of the module docstring; stop at the first that fails.

    Args:
        path: the release folder.
        device: where the model runs.
        base_weights: the base file of an adapter-only release, if not found automatically.
        echo: called with each check's line as it completes (e.g. ``print``).
    """
    folder = Path(path)
    report = VerifyReport(release=str(folder))

    def record(check: Check) -> bool:
        report.checks.append(check)
        if echo is not None:
            echo(f"  [{'ok' if check.passed else 'FAIL'}] {check.name}: {check.detail}")
        return check.passed

    try:
        sums = verify_checksums(folder, required=(WEIGHTS, CONFIG, METADATA, "example/example.json"))
    except MedsegError as err:
        record(Check("checksums", False, str(err)))
        return report
    detail = f"{len(sums.checked)} files match sha256sums.txt"
    if sums.unlisted:
        detail += f"; unlisted files {sums.unlisted[:5]} (not covered by any checksum: remove them or re-export)"
    if not record(Check("checksums", not sums.unlisted, detail)):
        return report
    if not record(_metadata_check(folder)):
        return report
    try:
        started = time.perf_counter()
        loaded = load_release(folder, device=device, base_weights=base_weights)
    except MedsegError as err:
        record(Check("rebuild", False, str(err)))
        return report
    extras = loaded.extras
    base = f", base {Path(extras['base_weights']).name} (SHA-256 ok)" if "base_weights" in extras else ""
    parameters = sum(p.numel() for p in loaded.model.parameters())
    record(Check(
        "rebuild", True,
        f"{extras['name']} {extras['version']} ({extras['mode']}{base}): {type(loaded.model).__name__}, "
        f"{parameters:,} parameters, labels {loaded.label_names}, in {time.perf_counter() - started:.1f} s",
    ))  # fmt: skip
    try:
        record(_example_check(loaded, folder))
    except (MedsegError, OSError, KeyError, ValueError) as err:
        record(Check("example", False, f"{type(err).__name__}: {err}"))
    return report


def run_verify(path: str | Path, device: str = "cpu") -> int:
    """``medseg verify RELEASE_DIR [--device cpu]``: print each check; exit code 0 only if all passed.

    The default device is the CPU, where the expected output was made at export in float32: on a GPU, medseg predict
    runs under bf16 autocast, whose rounding may move a few boundary voxels of a tiny example.
    """
    print(f"medseg verify {path} (device {device})")
    report = verify_release(path, device=device, echo=print)
    if report.passed:
        print("medseg verify: all checks passed.")
        return 0
    print("medseg verify: FAILED.", file=sys.stderr)
    return 1
