"""Forward latency and peak memory of every registered backbone at its standard input size.

Each (backbone, batch size, device) configuration runs in a fresh Python subprocess, so that the peak resident memory
the kernel reports (``ru_maxrss``) belongs to that configuration alone: ``tracemalloc`` does not see torch's
allocations. Scratch twins (``pretrained=False``) are measured, because the official files are not needed to time an
architecture that is identical either way. On CUDA the forward runs under bf16 autocast and the peak is
``torch.cuda.max_memory_allocated``.

Usage::

    python tools/bench_backbones.py --names litemedsam sam_vit_b --batch-sizes 1 8 --repeats 3

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


def _worker(name: str, batch: int, device: str, repeats: int, warmup: int) -> dict:
    """Measure one configuration in this (fresh) process and return its record."""
    import torch

    from medseg.backbones import create_backbone

    rss_import = _maxrss_mb()
    model = create_backbone(name, pretrained=False).eval()
    size = model.input_spec.image_size
    params = sum(p.numel() for p in model.parameters())
    x = torch.rand(batch, model.channel_adapter.in_channels, size, size)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    if device == "cuda":
        model, x = model.cuda(), x.cuda()
        torch.cuda.reset_peak_memory_stats()
    rss_model = _maxrss_mb()

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
    record = {
        "name": name,
        "device": device,
        "dtype": "bf16-autocast" if device == "cuda" else "fp32",
        "batch": batch,
        "image_size": size,
        "params_m": round(params / 1e6, 3),
        "repeats": repeats,
        "warmup": warmup,
        "latency_s_median": round(statistics.median(times), 4),
        "latency_s_min": round(min(times), 4),
        "ms_per_image": round(1000 * statistics.median(times) / batch, 1),
        # CPU seconds of all threads: unlike wall time, barely inflated when other jobs share the cores.
        "cpu_s_median": round(statistics.median(cpu_times), 4),
        "peak_rss_mb": round(_maxrss_mb(), 1),
        "forward_rss_delta_mb": round(_maxrss_mb() - rss_model, 1),
        "model_rss_delta_mb": round(rss_model - rss_import, 1),
    }
    if device == "cuda":
        record["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return record


def _markdown(records: list[dict]) -> str:
    """One row per record, for a README table."""
    lines = [
        "| backbone | device | input (px) | batch | params (M) | latency (s) | ms / image | CPU s | peak RSS (MiB) "
        "| CUDA peak (MiB) | load before |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["name"], r["device"], r["batch"])):
        lines.append(
            f"| {r['name']} | {r['device']} ({r['dtype']}) | {r['image_size']} | {r['batch']} | {r['params_m']} | "
            f"{r['latency_s_median']} | {r['ms_per_image']} | {r.get('cpu_s_median', '')} | {r['peak_rss_mb']} | "
            f"{r.get('cuda_peak_allocated_mb', '')} | {r.get('loadavg_1m_before', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", nargs="+", help="backbones to measure (default: every registered one)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards before timing")
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if any)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--resume", action="store_true", help="keep records already in --output and skip them")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per configuration")
    parser.add_argument("--table", action="store_true", help="only print the markdown table of --output")
    parser.add_argument("--worker", nargs=5, metavar=("NAME", "BATCH", "DEVICE", "REPEATS", "WARMUP"), help="internal")
    args = parser.parse_args(argv)

    if args.worker:
        name, batch, device, repeats, warmup = args.worker
        print(json.dumps(_worker(name, int(batch), device, int(repeats), int(warmup))))
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
    done = {(r["name"], r["device"], r["batch"]) for r in records}
    commands = [*previous.get("commands", []), " ".join(["python", *sys.argv])]
    payload = {"machine": machine_facts(), "commands": commands, "results": records, "failures": []}
    for name in names:
        for device in devices:
            for batch in args.batch_sizes:
                if (name, device, batch) in done:
                    continue
                print(f"[bench] {name} {device} batch {batch} ...", file=sys.stderr, flush=True)
                load = os.getloadavg()[0]  # other work on the machine inflates CPU latencies: keep it on record
                command = [sys.executable, __file__, "--worker", name, str(batch), device]
                command += [str(args.repeats), str(args.warmup)]
                try:
                    proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False)
                except subprocess.TimeoutExpired:
                    payload["failures"].append({"name": name, "device": device, "batch": batch, "error": "timeout"})
                    continue
                if proc.returncode != 0:
                    error = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    payload["failures"].append({"name": name, "device": device, "batch": batch, "error": error})
                    print(f"[bench]   failed: {error}", file=sys.stderr, flush=True)
                    continue
                record = {**json.loads(proc.stdout.strip().splitlines()[-1]), "loadavg_1m_before": round(load, 2)}
                records.append(record)
                print(f"[bench]   {record['latency_s_median']} s, peak {record['peak_rss_mb']} MiB", file=sys.stderr)
                atomic_write_json(args.output, payload)
    atomic_write_json(args.output, payload)
    print(_markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
