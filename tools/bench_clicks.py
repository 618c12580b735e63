"""Click simulation time: the scipy reference (object after object, on the CPU) against the batched device version.

For a batch of ``--batch`` objects, in 2-D (256 x 256, LiteMedSAM's input) and 3-D (64^3 patches), each figure is the
median over ``--repeats`` of one call for the whole batch:

* ``reference_first_ms`` / ``reference_correction_ms``: :class:`medseg.prompts.ClickSimulator` ``first_click`` /
  ``next_click`` for every object in turn, from host (NumPy) masks (a copy of the masks to the host is not counted).
* ``host_correction_ms``: :func:`medseg.prompts.host_clicks.correction_clicks` on the batch (scipy, one labelling
  for the batch, distance transforms on the chosen regions' boxes), what the promptable task runs on a CPU, without
  its memo (a round whose regions all changed); ``host_same_clicks``: how many equal the reference's.
* ``first_ms`` / ``correction_ms``: :func:`medseg.prompts.device_clicks.first_clicks` /
  :func:`~medseg.prompts.device_clicks.correction_clicks` on the batch, on each device asked for (CUDA only when
  present), with float64 (``--dtype``) distances; CUDA times are taken after a synchronise.
* ``same_clicks``: how many of the batch's clicks equal the reference's (first and correction).

The objects are smooth random blobs; the predictions are the objects shifted by a few voxels with random blobs added
and removed, so that each has several error regions of both kinds, as a model in training makes. The machine is shared:
the 1-minute load average is recorded. Usage::

    .venv/bin/python tools/bench_clicks.py --devices cpu cuda --table
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.atomic import atomic_write_json
from medseg.benchmark.machine import machine_facts
from medseg.prompts.device_clicks import correction_clicks, first_clicks
from medseg.prompts.host_clicks import correction_clicks as host_correction_clicks
from medseg.prompts.simulate import ClickSimulator

__all__ = ["main"]

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "clicks.json"
CASES = {"2d": ((256, 256), (1.0, 1.0)), "3d": ((64, 64, 64), (1.0, 1.0, 1.0))}


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, fraction: float) -> np.ndarray:
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return smooth > np.quantile(smooth, 1 - fraction)


def _batch(shape: tuple[int, ...], batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` objects and imperfect predictions of them (a shift, spurious and missing blobs)."""
    rng = np.random.default_rng(seed)
    sigma = shape[0] / 16
    gt = np.stack([_blobs(rng, shape, sigma, 0.15) for _ in range(batch)])
    pred = []
    for item in gt:
        shifted = np.roll(item, tuple(int(v) for v in rng.integers(-3, 4, size=len(shape))), tuple(range(len(shape))))
        noise = _blobs(rng, shape, sigma / 3, 0.04)
        pred.append(shifted ^ noise)
    return gt, np.stack(pred)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (CUDA kernels, allocator)
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _device_figures(
    gt: np.ndarray,
    pred: np.ndarray,
    spacing: tuple[float, ...],
    firsts: list,
    corrections: list,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
) -> dict:
    """Times of the batched clicks on ``device``, and how many equal the reference's ``firsts`` and ``corrections``."""
    target, current = torch.from_numpy(gt).to(device), torch.from_numpy(pred).to(device)
    given = torch.tensor([[list(c)] for (c, _) in firsts], device=device)
    coords, _ = first_clicks(target, spacing, dtype)
    fixed, labels, valid = correction_clicks(target, current, spacing, given, dtype=dtype)
    same = sum(tuple(c) == f for c, (f, _) in zip(coords.tolist(), firsts))
    found = [(tuple(c), lab) if ok else None for c, lab, ok in zip(fixed.tolist(), labels.tolist(), valid.tolist())]
    same += sum(a == b for a, b in zip(found, corrections))
    return {
        "first_ms": _median_ms(lambda: first_clicks(target, spacing, dtype), repeats, device),
        "correction_ms": _median_ms(
            lambda: correction_clicks(target, current, spacing, given, dtype=dtype), repeats, device
        ),
        "same_clicks": f"{same}/{2 * len(gt)}",
    }


def _case(name: str, batch: int, repeats: int, devices: list[torch.device], dtype: torch.dtype) -> dict:
    shape, spacing = CASES[name]
    gt, pred = _batch(shape, batch, seed=0)
    reference = ClickSimulator(spacing=spacing)
    cpu = torch.device("cpu")
    firsts = [reference.first_click(g) for g in gt]
    previous = [[click] for click in firsts]
    given = [[coord] for coord, _ in firsts]
    host = host_correction_clicks(gt, pred, given, spacing)
    corrections = [reference.next_click(g, p, c) for g, p, c in zip(gt, pred, previous)]
    row = {
        "shape": list(shape),
        "spacing": list(spacing),
        "batch": batch,
        "reference_first_ms": _median_ms(lambda: [reference.first_click(g) for g in gt], repeats, cpu),
        "reference_correction_ms": _median_ms(
            lambda: [reference.next_click(g, p, c) for g, p, c in zip(gt, pred, previous)], repeats, cpu
        ),
        "host_correction_ms": _median_ms(lambda: host_correction_clicks(gt, pred, given, spacing), repeats, cpu),
        "host_same_clicks": f"{sum(a == b for a, b in zip(host, corrections))}/{len(gt)}",
        "devices": {},
    }
    for device in devices:
        row["devices"][device.type] = _device_figures(gt, pred, spacing, firsts, corrections, device, dtype, repeats)
    return row


def _table(results: dict) -> str:
    lines = [
        "| case | batch | reference first / correction (ms) | host batched correction (ms) | device "
        "| first / correction (ms) | same clicks (host, device) |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for name, row in results["cases"].items():
        ref = f"{row['reference_first_ms']:.1f} / {row['reference_correction_ms']:.1f}"
        host = f"{row['host_correction_ms']:.1f}"
        for device, figures in row["devices"].items():
            mine = f"{figures['first_ms']:.1f} / {figures['correction_ms']:.1f}"
            shape = "x".join(str(s) for s in row["shape"])
            same = f"{row['host_same_clicks']}, {figures['same_clicks']}"
            lines.append(f"| {name} {shape} | {row['batch']} | {ref} | {host} | {device} | {mine} | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="objects per batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure (median reported)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped without a GPU")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="device distances")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--table", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    load_before = os.getloadavg()[0]
    cases = {name: _case(name, args.batch, args.repeats, devices, getattr(torch, args.dtype)) for name in args.cases}
    results = {
        "machine": machine_facts(),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "cases": cases,
    }
    atomic_write_json(args.output, results)
    if args.table:
        print(_table(results))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
