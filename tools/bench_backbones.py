"""Forward throughput, model FLOP utilisation (MFU) and peak memory of the registered backbones.

Each (backbone, batch size, device, dtype, attention) configuration runs in a fresh Python subprocess, so that the
peak resident memory the kernel reports (``ru_maxrss``) belongs to that configuration alone: ``tracemalloc`` does not
see torch's allocations. Scratch twins (``pretrained=False``) are measured, because the official files are not
needed to time an architecture that is identical either way. On CUDA the peak is ``torch.cuda.max_memory_allocated``.

MFU. The FLOPs of one forward are counted once per configuration with :class:`torch.utils.flop_counter.FlopCounterMode`
(matrix products and convolutions, attention included; a multiply-add counts 2; counted on the reference attention,
whose matrix products the counter sees on every device), and divided by a matrix-multiply
rate measured in the same process on the same device and dtype (a square ``torch.mm``: bf16 on CUDA, fp32 or bf16 on
CPU). ``mfu = flops_per_image * images_per_s / matmul_flops_per_s``: the fraction of what this device sustains on
plain matrix products, not of a datasheet peak.

``--dtypes``: ``fp32`` (no autocast) and/or ``bf16`` (bf16 autocast); default bf16 on CUDA, fp32 on CPU.
``--attention``: ``fused`` (scaled_dot_product_attention, the default) and/or ``reference`` (the families' own
attention code), to compare the two. ``--image-size`` overrides the standard input size (e.g. SAM at 512 px on CPU).

Usage::

    python tools/bench_backbones.py --names litemedsam sam_vit_b --batch-sizes 1 8 --repeats 3
    python tools/bench_backbones.py --names sam_vit_b --device cuda --batch-sizes 8 32 --attention fused reference

Results are written atomically after every configuration; ``--resume`` keeps the records already in ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "backbones.json"


def _maxrss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _matmul_rate(device: str, dtype, seconds: float = 0.5, rounds: int = 3) -> float:
    """Sustained FLOP/s of a square matrix product on ``device`` in ``dtype`` (2 n^3 FLOPs per product).

    The best of ``rounds`` measurements: on a shared CPU, other jobs only ever slow a round down.
    """
    return max(_matmul_round(device, dtype, seconds) for _ in range(rounds))


def _matmul_round(device: str, dtype, seconds: float) -> float:
    import torch

    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        torch.mm(a, b)
    sync()
    count, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        count += 1
        if count % 4 == 0:
            sync()
            if time.perf_counter() - start >= seconds:
                break
    return 2 * n**3 * count / (time.perf_counter() - start)


def _forward_flops(model, x, autocast) -> int:
    """FLOPs of one forward of ``model`` on ``x`` (FlopCounterMode: matmuls, convolutions, attention).

    Counted with the reference attention: FlopCounterMode has no formula for every fused SDPA kernel (the CPU one is
    missed), and the arithmetic of the model is the same whichever kernel computes it.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medseg.backbones.attention import attention_mode

    mode = attention_mode(model)
    model.set_attention("reference")
    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(), autocast, counter:
            model(x)
    finally:
        if mode in ("fused", "reference"):
            model.set_attention(mode)
    return counter.get_total_flops()


def _worker(
    name: str, batch: int, device: str, repeats: int, warmup: int, dtype: str, attention: str, image_size: int
) -> dict:
    """Measure one configuration in this (fresh) process and return its record."""
    import torch

    from medseg.backbones import create_backbone

    rss_import = _maxrss_mb()
    kwargs = {"attention": attention}
    if image_size and not name.startswith("litemedsam"):
        kwargs["img_size"] = image_size
    model = create_backbone(name, pretrained=False, **kwargs).eval()
    size = model.input_spec.image_size
    params = sum(p.numel() for p in model.parameters())
    x = torch.rand(batch, model.channel_adapter.in_channels, size, size)
    amp_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16")
    if device == "cuda":
        model, x = model.cuda(), x.cuda()
    rss_model = _maxrss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def forward() -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.inference_mode(), autocast:
            out = model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.features.shape[0] == batch
        return time.perf_counter() - start, time.process_time() - cpu_start

    for _ in range(warmup):
        forward()
    times, cpu_times = zip(*[forward() for _ in range(repeats)])
    peak_rss = _maxrss_mb()  # before the FLOP count, which runs the reference attention
    cuda_peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    flops = _forward_flops(model, x, autocast)
    rate = _matmul_rate(device, amp_dtype)
    median = statistics.median(times)
    images_per_s = batch / median
    record = {
        "name": name,
        "device": device,
        "dtype": f"{dtype}-autocast" if dtype == "bf16" else "fp32",
        "attention": attention,
        "batch": batch,
        "image_size": size,
        "params_m": round(params / 1e6, 3),
        "repeats": repeats,
        "warmup": warmup,
        "latency_s_median": round(median, 4),
        "latency_s_min": round(min(times), 4),
        "ms_per_image": round(1000 * median / batch, 2),
        "images_per_s": round(images_per_s, 4),
        "gflops_per_image": round(flops / batch / 1e9, 2),
        "matmul_tflops_measured": round(rate / 1e12, 3),
        "mfu": round(flops / batch * images_per_s / rate, 4),
        # CPU seconds of all threads: unlike wall time, barely inflated when other jobs share the cores.
        "cpu_s_median": round(statistics.median(cpu_times), 4),
        "peak_rss_mb": round(peak_rss, 1),
        "forward_rss_delta_mb": round(peak_rss - rss_model, 1),
        "model_rss_delta_mb": round(rss_model - rss_import, 1),
    }
    if device == "cuda":
        record["cuda_peak_allocated_mb"] = round(cuda_peak / 2**20, 1)
        record["gpu"] = torch.cuda.get_device_name(0)
    return record


def _markdown(records: list[dict]) -> str:
    """One row per record, for a README table."""
    lines = [
        "| backbone | device | attention | input (px) | batch | params (M) | img/s | ms / image | GFLOP / img | MFU "
        "| peak RSS (MiB) | CUDA peak (MiB) | load before |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["name"], r["device"], r.get("dtype", ""), r.get("attention", ""), r["batch"])  # noqa: E731
    for r in sorted(records, key=key):
        mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else ""
        lines.append(
            f"| {r['name']} | {r['device']} ({r['dtype']}) | {r.get('attention', 'reference')} | {r['image_size']} | "
            f"{r['batch']} | {r['params_m']} | {r.get('images_per_s', '')} | {r['ms_per_image']} | "
            f"{r.get('gflops_per_image', '')} | {mfu} | {r['peak_rss_mb']} | {r.get('cuda_peak_allocated_mb', '')} | "
            f"{r.get('loadavg_1m_before', '')} |"
        )
    return "\n".join(lines)


def _key(record: dict) -> tuple:
    # records of the earlier tool have no attention field: they ran the families' own attention
    dtype = "bf16" if record.get("dtype", "fp32").startswith("bf16") else "fp32"
    attention = record.get("attention", "reference")
    return record["name"], record["device"], record["batch"], dtype, attention, record.get("requested_size", 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", nargs="+", help="backbones to measure (default: every registered one)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards before timing")
    parser.add_argument("--device", "--devices", dest="devices", nargs="+", default=None,
                        help="cpu and/or cuda (default: cpu, plus cuda if any)")  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=None,
                        help="fp32 and/or bf16 autocast (default: bf16 on cuda, fp32 on cpu)")  # fmt: skip
    parser.add_argument("--attention", nargs="+", choices=["fused", "reference"], default=["fused"])
    parser.add_argument("--image-size", type=int, default=0, help="input side in pixels (0: each backbone's own)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--resume", action="store_true", help="keep records already in --output and skip them")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per configuration")
    parser.add_argument("--table", action="store_true", help="only print the markdown table of --output")
    worker = ("NAME", "BATCH", "DEVICE", "REPEATS", "WARMUP", "DTYPE", "ATTENTION", "SIZE")
    parser.add_argument("--worker", nargs=8, metavar=worker, help="internal")
    args = parser.parse_args(argv)

    if args.worker:
        name, batch, device, repeats, warmup, dtype, attention, size = args.worker
        record = _worker(name, int(batch), device, int(repeats), int(warmup), dtype, attention, int(size))
        print(json.dumps(record))
        return 0

    if args.table:
        print(_markdown(json.loads(args.output.read_text())["results"]))
        return 0

    import torch

    from medseg.atomic import atomic_write_json
    from medseg.backbones import list_backbones
    from medseg.benchmark.machine import machine_facts

    names = args.names or list_backbones()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    previous = json.loads(args.output.read_text()) if args.resume and args.output.is_file() else {}
    records: list[dict] = list(previous.get("results", []))
    done = {_key(r) for r in records}
    commands = [*previous.get("commands", []), " ".join(["python", *sys.argv])]
    payload = {"machine": machine_facts(), "commands": commands, "results": records, "failures": []}
    configs = [
        (name, device, batch, dtype, attention)
        for name in names
        for device in devices
        for dtype in args.dtypes or (["bf16"] if device == "cuda" else ["fp32"])
        for attention in args.attention
        for batch in args.batch_sizes
    ]
    for name, device, batch, dtype, attention in configs:
        config = {"name": name, "device": device, "batch": batch, "dtype": dtype, "attention": attention}
        if (name, device, batch, dtype, attention, args.image_size) in done:
            continue
        print(f"[bench] {' '.join(str(v) for v in config.values())} ...", file=sys.stderr, flush=True)
        load = os.getloadavg()[0]  # other work on the machine inflates CPU latencies: keep it on record
        command = [sys.executable, __file__, "--worker", name, str(batch), device, str(args.repeats)]
        command += [str(args.warmup), dtype, attention, str(args.image_size)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False)
        except subprocess.TimeoutExpired:
            payload["failures"].append({**config, "error": "timeout"})
            continue
        if proc.returncode != 0:
            error = (proc.stderr.strip().splitlines() or ["?"])[-1]
            payload["failures"].append({**config, "error": error})
            print(f"[bench]   failed: {error}", file=sys.stderr, flush=True)
            continue
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        record.update(requested_size=args.image_size, loadavg_1m_before=round(load, 2))
        records.append(record)
        mfu, peak = 100 * record["mfu"], record["peak_rss_mb"]
        print(f"[bench]   {record['images_per_s']} img/s, MFU {mfu:.1f} %, peak {peak} MiB", file=sys.stderr)
        atomic_write_json(args.output, payload)
    atomic_write_json(args.output, payload)
    print(_markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
