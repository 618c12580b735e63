"""Training throughput of the dense and promptable tasks in 2-D and 3-D: real loop, model alone, data path alone.

For each configuration (``medseg train`` overrides, see :data:`CONFIGURATIONS`) three rates in optimisation steps per
second, each after ``--warmup`` untimed steps (:mod:`medseg.benchmark.throughput`):

* ``loop`` (a): the real training loop (Lightning ``Trainer`` from the config; no logger, checkpoints or validation);
* ``model`` (b): the task's training step on one batch already on the device (the promptable task's click rounds
  included), backward and optimiser step, same shapes and precision;
* ``data`` (c): the train dataloader with the configured workers, the copy to the device and, for the promptable
  task, its prompt sampling and click simulation around a null model; its wall time per step is split into the data
  part and the prompt part (``parts_ms_per_step``).

Every rate also records the main process's CPU milliseconds per step (``cpu_ms_per_step``), which a shared machine's
load moves much less than the wall rate.

``loop / model`` is the headline ratio (issue 17 aims at >= 0.8 on a CUDA machine), and ``data`` should reach 20
steps/s on a 2-core CPU for ``quickstart`` and ``promptable_litemedsam`` so that the data path can feed a GPU. The JSON
records the machine (:func:`medseg.benchmark.machine.machine_facts`) and the load average before and after each
configuration: on a shared machine the numbers are indicative only, and ``--threads 1`` keeps two intra-op threads
from thrashing against other processes (measured 5-10x slower). Datasets come from ``$MEDSEG_DATA`` (``medseg prepare
synthetic mni-tissue``). ``promptable_litemedsam`` holds about 13 GB on a CPU (8 slices of 256 px, 4 click rounds).
A configuration that fails is recorded with its error and the others are kept (exit status 1). Usage::

    python tools/bench_train.py --steps 10 --warmup 2 --threads 1 --table      # CPU, every configuration
    python tools/bench_train.py --device cuda --steps 50 --warmup 5 --table    # CUDA; precision from the config,
                                                                               # auto = bf16-mixed on a bf16 GPU
    python tools/bench_train.py --configs quickstart --override data.num_workers=4 --precision bf16-mixed
    python tools/bench_train.py --configs promptable_litemedsam promptable_synthetic --modes data --threads 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.atomic import atomic_write_json
from medseg.benchmark.machine import machine_facts
from medseg.benchmark.throughput import PRECISIONS, check_configuration, measure_configuration
from medseg.console import quiet_third_party
from medseg.errors import ConfigError, MedsegError
from medseg.inference.sources import resolve_device
from medseg.paths import check_output_folder

__all__ = ["CONFIGURATIONS", "main", "table"]

#: name -> ``medseg train`` overrides; the experiments of issue 17's table.
CONFIGURATIONS: dict[str, list[str]] = {
    # LiteMedSAM + LoRA + UNETR on mni-tissue, 2 slices of 256 px per step (dense, 2-D)
    "quickstart": ["experiment=quickstart"],
    # tiny 4.7 M-parameter SAM from scratch, 64 px, 2 volumes x 4 slices (promptable, 2-D)
    "promptable_synthetic": ["experiment=promptable_synthetic"],
    # the same task with LiteMedSAM's shapes: pretrained LiteMedSAM + LoRA on mni-tissue, 256 px (LiteMedSAM runs at
    # 256 px only, so the experiment's img_size of 64 must follow the backbone)
    "promptable_litemedsam": [
        "experiment=promptable_synthetic",
        "backbone=litemedsam",
        "init=pretrained",
        "adapter=lora",
        "data=mni_tissue",
        "backbone.img_size=256",
    ],
    # tiny volumetric SAM, 3-D patches of 32 x 32 x 16 voxels (promptable, 3-D)
    "promptable_synthetic_3d": ["experiment=promptable_synthetic_3d"],
    # a 12.7 k-parameter 2-D UNet as bench_synthetic's (channels 8-16-32), synthetic_unet's data (dense, 2-D)
    "synthetic_unet": [
        "experiment=synthetic_unet",
        "model.channels=[8,16,32]",
        "model.strides=[2,2]",
        "model.num_res_units=1",
    ],
}
MODES = ("loop", "model", "data")
DEFAULT_FOLDER = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def _rate(record: dict, mode: str) -> str:
    value = (record.get(mode) or {}).get("steps_per_s")
    return "-" if value is None else f"{value:.2f}"


def _parts(record: dict) -> str:
    parts = (record.get("data") or {}).get("parts_ms_per_step")
    return "-" if not parts else f"{parts['data']:.1f} + {parts['prompts']:.1f}"


def table(result: dict) -> str:
    """The markdown table of a result: one row per configuration."""
    lines = [
        f"device {result['device']}, {result['steps']} timed steps after {result['warmup']} warm-up steps",
        "",
        "| configuration | task | batch (image) | precision | workers | (a) loop steps/s | (b) model steps/s "
        "| (c) data + prompts steps/s | (c) ms/step: data + prompts | (a)/(b) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for record in result["configurations"]:
        if "error" in record:
            lines.append(f"| `{record['name']}` | failed: {record['error']} |")
            continue
        shape = ((record.get("model") or {}).get("batch_shapes") or {}).get("image")
        ratio = record.get("loop_over_model")
        lines.append(
            f"| `{record['name']}` | {record['task']} | {' x '.join(map(str, shape)) if shape else '-'} | "
            f"{record['precision']} | {record['num_workers']} | {_rate(record, 'loop')} | {_rate(record, 'model')} | "
            f"{_rate(record, 'data')} | {_parts(record)} | {'-' if ratio is None else f'{ratio:.2f}'} |"
        )
    return "\n".join(lines)


def _default_output(device: str) -> Path:
    return DEFAULT_FOLDER / f"train_throughput_{device}.json"


def run(args: argparse.Namespace, argv: list[str]) -> int:
    device = resolve_device(args.device)
    output = args.output or _default_output(device.type)
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a .json file path.")
    check_output_folder(output.parent)
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = {name: [*CONFIGURATIONS[name], *args.override] for name in args.configs}
    for overrides in jobs.values():  # every config and dataset checked before minutes of measuring
        check_configuration(overrides, device, args.precision)
    records = [_measure(name, overrides, device, args) for name, overrides in jobs.items()]
    result = {
        "machine": machine_facts(),
        "command": "python tools/bench_train.py " + " ".join(argv),
        "device": str(device),
        "steps": args.steps,
        "warmup": args.warmup,
        "unit": "optimisation steps per second: timed steps / their wall seconds",
        "configurations": records,
    }
    atomic_write_json(output, result)
    print(f"[bench_train] wrote {output}")
    if args.table:
        print(table(result))
    failed = [r["name"] for r in records if "error" in r]
    if failed:
        print(f"bench_train.py: error: {', '.join(failed)} failed (see above and in {output})", file=sys.stderr)
    return 1 if failed else 0


def _measure(name: str, overrides: list[str], device: torch.device, args: argparse.Namespace) -> dict:
    """One configuration's record; a failure becomes ``{"name", "overrides", "error"}`` so that it does not discard
    the minutes already spent measuring the others (a bug's traceback is printed, a user error's message only)."""
    print(f"[bench_train] {name}: {' '.join(overrides)}", flush=True)

    def progress(mode: str) -> None:
        print(f"[bench_train] {name}: measuring {mode}", flush=True)

    settings = {"precision": args.precision, "modes": args.modes, "progress": progress}
    try:
        return measure_configuration(name, overrides, device, args.steps, args.warmup, **settings)
    except Exception as error:
        if not isinstance(error, MedsegError):
            traceback.print_exc()
        message = " ".join(str(error).split())
        print(f"bench_train.py: error: {name}: {message}", file=sys.stderr, flush=True)
        return {"name": name, "overrides": overrides, "error": f"{type(error).__name__}: {message}"}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_train.py", description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGURATIONS), default=list(CONFIGURATIONS))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--steps", type=_positive, default=10, help="timed optimisation steps per mode")
    parser.add_argument("--warmup", type=_positive, default=2, help="untimed steps before them")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--precision", choices=[*PRECISIONS, "auto"], default=None, help="default: the config's")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE",
        help="a Hydra override for every configuration, e.g. data.num_workers=4 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=None, help="default: " + _default_output("<device>").name)
    parser.add_argument("--table", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    quiet_third_party()
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # the "GPU available: ..." lines of every Trainer
    try:
        return run(args, sys.argv[1:] if argv is None else list(argv))
    except MedsegError as error:
        print(f"bench_train.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        lightning_log.setLevel(level)


if __name__ == "__main__":
    raise SystemExit(main())
