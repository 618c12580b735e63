"""Benchmark the adapter methods: trainable parameters, peak training memory and time per training step.

Each (backbone, method) runs in its own subprocess, so peak memory is that configuration's alone:

* CPU: peak resident set size of the worker (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), reported in total and
  as the increase over the model being built and adapted ("training increment": activations, gradients, optimiser
  state). A worker may be capped with ``--mem-limit-gb`` (address-space limit); it then reports "out of memory"
  instead of pushing the machine into swapping or the OOM killer.
* CUDA (when available, or ``--device cuda``): bf16 autocast, ``torch.cuda.max_memory_allocated``.

A training step: batch 2 at the backbone's native size (litemedsam 256 x 256, real weights; sam_vit_b 1024 x 1024,
``pretrained=False``: the official file is not needed for timing), forward through the adapted backbone, a 1x1
convolution head on the 256-channel features, binary cross-entropy against a fixed random mask at feature
resolution, backward, Adam step. Times are wall-clock seconds per step after ``--warmup`` untimed steps; with
``--jobs N`` that many workers run at once (each with ``--threads`` intra-op threads), which the JSON records.

Memory-lean variants (issue 18), selectable in ``--methods`` next to the plain methods:

* ``*_late``: the method in the last ``--late-k`` blocks only (``last_k_blocks``); the blocks below keep no activations;
* ``*_ckpt``: activation checkpointing of every block (``activation_checkpointing: all``);
* ``*_bf16``: frozen weights kept in bfloat16 (``frozen_dtype: bf16``; on CPU the backbone enters bf16 autocast);
* ``lora_lean``: all three together.

``--image-size`` runs the SAM backbones at another side (e.g. 512 px on a CPU, where 1024 px takes minutes per step);
the JSON records it. ``peak_memory_ratio_vs_full`` is the figure of the issue's target (LoRA at most 0.5x of full).

Usage::

    python tools/bench_adapters.py --backbones litemedsam sam_vit_b --steps 2 --warmup 1 \
        --out docs/benchmarks/adapters.json
    python tools/bench_adapters.py --backbones sam_vit_b --image-size 512 --steps 1 --warmup 0 \
        --methods full lora lora_late lora_ckpt lora_bf16 lora_lean --out docs/benchmarks/adapters_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

METHODS = ("full", "frozen", "bitfit", "norm", "lora", "lora_bonly", "dora", "adaptformer", "adapter3d", "ssf")
#: variant name -> (base method, adapter options, backbone compute settings); ``LATE`` stands for ``--late-k``.
VARIANTS = {
    "full_ckpt": ("full", {}, {"activation_checkpointing": "all"}),
    "full_late": ("full", {"last_k_blocks": "LATE"}, {}),
    "lora_late": ("lora", {"last_k_blocks": "LATE"}, {}),
    "lora_ckpt": ("lora", {}, {"activation_checkpointing": "all"}),
    "lora_bf16": ("lora", {"frozen_dtype": "bf16"}, {}),
    "lora_lean": ("lora", {"last_k_blocks": "LATE", "frozen_dtype": "bf16"}, {"activation_checkpointing": "all"}),
    "adaptformer_late": ("adaptformer", {"last_k_blocks": "LATE"}, {}),
    "adapter3d_late": ("adapter3d", {"last_k_blocks": "LATE"}, {}),
}
SIZES = {"litemedsam": 256, "sam_vit_b": 1024}
BATCH = 2
BF16_CPU_NOTE = (
    "CPU: the *_bf16 and lora_lean variants run the backbone under bf16 autocast (a backbone with bf16 weights enters "
    "it itself), the others in float32, so their activations are bf16 as well; on CUDA every variant runs in bf16 "
    "autocast."
)


def variant(name: str, late_k: int) -> tuple[dict, dict]:
    """(adapter config, backbone keyword arguments) of a plain method or a memory-lean variant."""
    if name in METHODS:
        return {"method": name}, {}
    method, options, compute = VARIANTS[name]
    config = {"method": method, **{k: late_k if v == "LATE" else v for k, v in options.items()}}
    return config, dict(compute)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(
    backbone: str,
    method: str,
    steps: int,
    warmup: int,
    device: str,
    threads: int,
    late_k: int = 4,
    image_size: int = 0,
    attention: str = "fused",
) -> dict:
    """One configuration, in this process: returns its measurements."""
    import torch
    from torch import nn

    from medseg.adapters import apply_adapters
    from medseg.backbones import create_backbone

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config, compute = variant(method, late_k)
    kwargs = {"attention": attention, **compute}
    size = SIZES[backbone]
    if backbone.startswith("sam") and image_size:
        size = kwargs["img_size"] = image_size
    model = create_backbone(backbone, pretrained=backbone == "litemedsam", **kwargs)
    report = apply_adapters(model, config)
    head = nn.Conv2d(model.embed_dim, 1, kernel_size=1)
    model.to(device).train()
    head.to(device).train()
    params = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, size, size, generator=generator).to(device)
    grid = size // (16 if backbone.startswith("sam") else 4)
    target = (torch.rand(BATCH, 1, grid, grid, generator=generator) > 0.5).float().to(device)
    cuda = device.startswith("cuda")
    rss_built = _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated() / 2**20

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = head(model(x).features)
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    times = []
    for index in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    out = {
        "backbone": backbone,
        "method": method,
        "adapter_config": config,
        "backbone_settings": kwargs,
        "image_size": size,
        "trainable_backbone_params": report["trainable"],
        "total_backbone_params": report["total"],
        "trainable_percent": round(report["trainable_percent"], 4),
        "head_params": sum(p.numel() for p in head.parameters()),
        "step_seconds": [round(t, 3) for t in times],
        "step_seconds_mean": round(sum(times) / len(times), 3) if times else None,
    }
    if cuda:
        out["peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["training_increment_mb"] = round(out["peak_mb"] - base_alloc, 1)
    else:
        out["peak_mb"] = round(_rss_mb(), 1)
        out["training_increment_mb"] = round(out["peak_mb"] - rss_built, 1)
    return out


def _steps(args: argparse.Namespace, backbone: str) -> int:
    return args.sam_steps if backbone.startswith("sam") and args.sam_steps is not None else args.steps


def _run_worker(args: argparse.Namespace, backbone: str, method: str) -> dict:
    command = [
        sys.executable, __file__, "--worker", "--backbones", backbone, "--methods", method, "--steps",
        str(_steps(args, backbone)), "--warmup", str(args.warmup), "--device", args.device,
        "--threads", str(args.threads), "--late-k", str(args.late_k), "--image-size", str(args.image_size),
        "--attention", args.attention,
    ]  # fmt: skip
    if args.mem_limit_gb:
        command += ["--mem-limit-gb", str(args.mem_limit_gb)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        result = json.loads(lines[-1])
    else:
        tail = (done.stderr or "").strip().splitlines()[-3:]
        memory = any("memory" in line.lower() or "alloc" in line.lower() for line in tail) or done.returncode == -9
        result = {"backbone": backbone, "method": method, "error": "out of memory" if memory else " | ".join(tail)}
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    return result


def _ratios(results: list[dict]) -> dict:
    """Peak memory of each method relative to ``full``, per backbone (total peak and training increment)."""
    out: dict[str, dict] = {}
    for backbone in {r["backbone"] for r in results}:
        rows = {r["method"]: r for r in results if r["backbone"] == backbone and "peak_mb" in r}
        if "full" not in rows:
            continue
        full = rows["full"]
        out[backbone] = {
            m: {
                "peak": round(r["peak_mb"] / full["peak_mb"], 3),
                "training_increment": round(r["training_increment_mb"] / max(full["training_increment_mb"], 1e-9), 3),
            }
            for m, r in rows.items()
        }
    return out


def markdown(results: list[dict]) -> str:
    lines = [
        "| backbone | method | trainable params | % | peak MB | training increment MB | s / step |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['backbone']} | {r['method']} | | | {r['error']} | | |")
            continue
        lines.append(
            f"| {r['backbone']} | {r['method']} | {r['trainable_backbone_params']:,} | {r['trainable_percent']:.2f} | "
            f"{r['peak_mb']:,.0f} | {r['training_increment_mb']:,.0f} | {r['step_seconds_mean']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, *VARIANTS])
    parser.add_argument("--sam-methods", nargs="+", default=None, choices=[*METHODS, *VARIANTS],
                        help="methods for sam_vit_b (default: --methods)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per configuration")
    parser.add_argument("--sam-steps", type=int, default=None, help="timed steps for sam_vit_b (default: --steps)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--mem-limit-gb", type=float, default=0.0, help="address-space cap per worker (CPU)")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run at once (use with --threads 1)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--late-k", type=int, default=4, help="blocks adapted by the *_late variants")
    parser.add_argument("--image-size", type=int, default=0, help="input side of the SAM backbones (0: 1024 px)")
    parser.add_argument("--attention", choices=["fused", "reference"], default="fused")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/adapters.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        if args.mem_limit_gb:
            limit = int(args.mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(
            json.dumps(
                worker(
                    args.backbones[0], args.methods[0], args.steps, args.warmup, args.device, args.threads,
                    args.late_k, args.image_size, args.attention,
                )
            )
        )  # fmt: skip
        return 0

    configs = [
        (backbone, method)
        for backbone in args.backbones
        for method in (args.sam_methods if backbone.startswith("sam") and args.sam_methods else args.methods)
    ]
    order = {config: i for i, config in enumerate(configs)}
    results: list[dict] = []
    # longest first, so that with --jobs > 1 the short configurations fill in around them
    queue = sorted(configs, key=lambda c: (not c[0].startswith("sam"), order[c]))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(_run_worker, args, b, m): (b, m) for b, m in queue}
        for future in as_completed(futures):
            result = future.result()
            print(json.dumps(result), flush=True)
            results.append(result)
            results.sort(key=lambda r: order[(r["backbone"], r["method"])])
            _write(args, results)  # partial results survive an interrupted run
    print(markdown(results))
    return 0


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _write(args: argparse.Namespace, results: list[dict]) -> None:
    from medseg.benchmark.machine import machine_facts

    payload = {
        "command": "python tools/bench_adapters.py " + " ".join(sys.argv[1:]),
        "device": args.device,
        "dtype": "bfloat16 autocast" if args.device.startswith("cuda") else "float32",
        "host": machine_facts(),
        "memory_measure": (
            "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "ru_maxrss of a worker process"
        ),
        "batch": BATCH,
        "input_sizes": {**SIZES, **({"sam_vit_b": args.image_size} if args.image_size else {})},
        "attention": args.attention,
        "late_k": args.late_k,
        "variants": {name: list(variant(name, args.late_k)) for name in VARIANTS},
        "steps": {b: _steps(args, b) for b in args.backbones},
        "threads_per_worker": args.threads or "torch default",
        "concurrent_workers": args.jobs,
        "mem_limit_gb_per_worker": args.mem_limit_gb or None,
        "warmup": args.warmup,
        "step": "adapted backbone -> 1x1 conv head on the 256-channel features -> BCE vs fixed random mask -> Adam",
        "methods_by_backbone": {
            b: (args.sam_methods if b.startswith("sam") and args.sam_methods else args.methods) for b in args.backbones
        },
        "notes": [
            "vpt is not benchmarked: it applies to token-sequence ViTs (dinov2_*, mae_*), not litemedsam/sam_vit_b.",
            *([BF16_CPU_NOTE] if not args.device.startswith("cuda") else []),
            *(
                [f"sam_vit_b was cut to {args.sam_methods} to fit a ~30 min CPU budget (one step ~1-3 min)."]
                if args.sam_methods and "sam_vit_b" in args.backbones
                else []
            ),
        ],
        "results": results,
        "peak_memory_ratio_vs_full": _ratios(results),
        "table": markdown(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
