"""``medseg <verb>``: the command line, with verbs in the order of a user's workflow.

Every verb imports its work when it runs (``# lazy``: ``medseg --help`` stays instant, without torch, MONAI or Hydra),
and every :class:`~medseg.errors.MedsegError` is printed as one readable line with a non-zero exit code; ``--debug``
shows the traceback instead. Other libraries'
deprecation warnings and notices are hidden (:func:`medseg.console.quiet_third_party`) unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from medseg.console import quiet_third_party
from medseg.errors import MedsegError

__all__ = ["main"]


def _cmd_prepare(args: argparse.Namespace) -> int:
    from medseg.data.prepare.command import run_prepare  # lazy: --help stays instant

    return run_prepare(args.names, check=args.check, output=args.output, force=args.force, seed=args.seed)


def _cmd_validate(args: argparse.Namespace) -> int:
    from medseg.data.prepare.command import run_prepare  # lazy: --help stays instant

    return run_prepare(args.datasets, check=True, only_check=True)


def _cmd_convert(args: argparse.Namespace) -> int:
    from medseg.data.convert import convert_dataset  # lazy: --help stays instant

    options = {"modality": args.modality} if args.modality else {}
    convert_dataset(
        args.format, args.source, dataset_id=args.id, name=args.name, output=args.output, force=args.force, **options
    )
    return 0


def _run_hydra_verb(main: Callable[[], object], config_name: str, args: argparse.Namespace) -> int:
    """Run a command module's Hydra ``main()`` with the verb's overrides, once the config is checked."""
    # lazy (both): Hydra, which --help does not need
    from medseg.config import CONFIG_DIR
    from medseg.launch import run_hydra_entry

    return run_hydra_entry(main, CONFIG_DIR, config_name, args.overrides, prog=f"medseg {config_name}")


def _cmd_train(args: argparse.Namespace) -> int:
    from medseg.train import main  # lazy: --help stays instant

    return _run_hydra_verb(main, "train", args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from medseg.evaluate import main  # lazy: --help stays instant

    return _run_hydra_verb(main, "evaluate", args)


def _cmd_predict(args: argparse.Namespace) -> int:
    # lazy (these five): --help stays instant
    from medseg.inference.predictor import PredictOptions, predict_cases
    from medseg.inference.preflight import preflight
    from medseg.inference.prompted import window_from_text
    from medseg.inference.sources import is_classifier_folder
    from medseg.workflows.models import load_model

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    options = PredictOptions(
        window=args.window, tta=args.tta, save_probabilities=args.save_probabilities, slice_axis=args.slice_axis,
        progress=not args.no_progress, precision=args.precision, batch_size=args.batch_size, series=args.series,
        compile=args.compile, output_format=args.output_format,
    )  # fmt: skip
    # Inputs, prompts path and every output path fail here, before the model loads (and long before inference).
    kind = "classifier" if Path(args.model).is_dir() and is_classifier_folder(args.model) else None
    preflight(
        args.input, args.output, args.prompts, args.save_probabilities, args.cache_dir, kind, args.series,
        output_format=args.output_format,
    )  # fmt: skip
    if args.window is not None:
        window_from_text(args.window)
    loaded = load_model(args.model, device=args.device, ckpt=args.ckpt)
    report = predict_cases(
        loaded, args.input, args.output, prompts=args.prompts, options=options, cache_dir=args.cache_dir,
        debug=args.debug,
    )  # fmt: skip
    done = sum(1 for files in report.written.values() if files)
    print(f"medseg predict: {done} case(s) written to {args.output} with {loaded.source}.")
    if report.failed:
        print(f"medseg predict: {len(report.failed)} case(s) failed:", file=sys.stderr)
        for name, message in report.failed.items():
            print(f"  {name}: {message}", file=sys.stderr)
        return 1
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from medseg.quickstart import main  # lazy: --help stays instant

    return main(args.overrides)


def _cmd_classify(args: argparse.Namespace) -> int:
    from medseg.classify import main  # lazy: --help stays instant

    return _run_hydra_verb(main, "classify", args)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from medseg.benchmark.runner import run_benchmark  # lazy: --help stays instant

    return run_benchmark(args.overrides)


def _cmd_export(args: argparse.Namespace) -> int:
    from medseg.release.export import run_export  # lazy: --help stays instant

    return run_export(
        args.run_dir,
        args.output,
        name=args.name,
        version=args.version,
        merge=args.merge,
        adapter_only=args.adapter_only,
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    from medseg.release.verify import run_verify  # lazy: --help stays instant

    return run_verify(args.release_dir, device=args.device)


_HYDRA_VERBS = ("train", "evaluate", "quickstart", "classify", "benchmark")
_HYDRA_EPILOG = (
    "Overrides are Hydra's: key=value, group=option, +new_key=value; -m sweeps comma-separated values "
    "(e.g. adapter=lora,ssf init=pretrained,scratch). --cfg job prints the composed config."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description="Adapt foundation models to CT and MRI segmentation.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    prepare = verbs.add_parser(
        "prepare",
        help="build a demo dataset (synthetic, mni-tissue) in $MEDSEG_DATA, or check one with --check",
        description="Build the named datasets in the nnU-Net v2 layout, then (with --check) validate them. "
        "A name that is not a builder is looked up as an existing dataset and only checked.",
    )
    prepare.add_argument("names", nargs="+", metavar="NAME", help="builder name (synthetic, mni-tissue) or dataset")
    prepare.add_argument("--check", action="store_true", help="validate the dataset(s); exit non-zero on problems")
    prepare.add_argument("--output", default=None, help="folder for the datasets (default: $MEDSEG_DATA)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if the dataset already exists")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the builders' randomness")
    prepare.set_defaults(func=_cmd_prepare)

    validate = verbs.add_parser("validate", help="report every problem of a dataset in one pass (same as --check)")
    validate.add_argument("datasets", nargs="+", metavar="DATASET", help="path, DatasetNNN_Name, ID or short name")
    validate.set_defaults(func=_cmd_validate)

    convert = verbs.add_parser("convert", help="convert a public dataset's download into the nnU-Net v2 layout")
    convert.add_argument("format", help="source layout: msd, btcv, kits, amos, brats")
    convert.add_argument("source", help="the downloaded (extracted) dataset folder")
    convert.add_argument("--id", type=int, required=True, help="nnU-Net dataset ID (3 digits) for DatasetNNN_Name")
    convert.add_argument("--name", default=None, help="dataset name (default: from the source)")
    convert.add_argument("--output", default=None, help="folder for the dataset (default: $MEDSEG_DATA)")
    convert.add_argument("--force", action="store_true", help="replace an existing dataset of the same name")
    convert.add_argument("--modality", default=None, help="AMOS only: ct (default) or mri, which cases to convert")
    convert.set_defaults(func=_cmd_convert)

    train = verbs.add_parser(
        "train",
        help="train (or resume) a run from conf/train.yaml with Hydra overrides, then evaluate it on the test cases",
        description="Train one run, e.g. `medseg train experiment=quickstart trainer.max_steps=10`, or a sweep with "
        "-m. Re-running the same command resumes from the run folder's last.ckpt.",
        epilog=_HYDRA_EPILOG,
    )
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides and flags (-m, --cfg job)")
    train.set_defaults(func=_cmd_train)

    evaluate = verbs.add_parser(
        "evaluate",
        help="re-evaluate a trained run on its test cases (native grid) and rewrite its summary.json",
        description="e.g. `medseg evaluate run_dir=results/Dataset991_MNITissue/... ckpt=last`",
        epilog=_HYDRA_EPILOG,
    )
    evaluate.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides (run_dir=..., ckpt=...)")
    evaluate.set_defaults(func=_cmd_evaluate)

    predict = verbs.add_parser(
        "predict",
        help="segment a NIfTI file, a folder of them, or a DICOM series with a run, a release or litemedsam",
        description="Writes OUTPUT_DIR/<case>.nii.gz label maps in each input's exact shape and affine (DICOM: NIfTI "
        "with its RAS affine). Promptable models (litemedsam) need --prompts; failed cases are listed at the end.",
    )
    predict.add_argument("-i", "--input", required=True, help="NIfTI file, DICOM series folder, or folder of inputs")
    predict.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    predict.add_argument(
        "-m", "--model", required=True, help="run folder (train or classify), release folder or name, or 'litemedsam'"
    )
    predict.add_argument(
        "--prompts", default=None, help="JSON prompts file (voxel or world RAS mm), or a folder of <case>.json files"
    )
    predict.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU if there is one)")
    predict.add_argument(
        "--window", default=None, help="litemedsam on CT: LEVEL:WIDTH in HU (40:400) or a preset (abdomen, lung, "
        "bone, brain, soft_tissue, liver); default: the 0.5/99.5 percentiles of voxels > 0 (MR)",
    )  # fmt: skip
    predict.add_argument(
        "--save-probabilities", action="store_true",
        help="dense models: also write <case>.npz (float32 'probabilities' (K, X, Y, Z) on the input grid, 'labels')",
    )  # fmt: skip
    predict.add_argument("--tta", action="store_true", help="dense models: average mirrored predictions (nnU-Net)")
    predict.add_argument(
        "--slice-axis", type=int, default=2, help="array axis a promptable 2D model slices along (default 2, the last)"
    )
    predict.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
        help="auto (default): bf16 autocast on a GPU, fp32 on CPU; bf16 on a CPU with bf16 instructions is ~2x faster",
    )  # fmt: skip
    predict.add_argument(
        "--batch-size", type=int, default=None, help="promptable 2D models: slices per encoder call (default 1 on CPU, "
        "8 on a GPU)",
    )  # fmt: skip
    predict.add_argument(
        "--compile", action="store_true", help="torch.compile the model first (promptable: the click path, and the "
        "encoder on a GPU); pays off over many slices or cases, the first call of each shape compiles",
    )  # fmt: skip
    predict.add_argument("--cache-dir", default=None, help="keep image embeddings on disk for later runs")
    predict.add_argument(
        "--series", default=None, help="DICOM folders holding several series: the one to read (SeriesInstanceUID or "
        "a unique SeriesDescription; without it such a folder is refused with the list of its series)",
    )  # fmt: skip
    predict.add_argument(
        "--output-format", choices=("seg", "nifti", "both"), default=None,
        help="DICOM SEG (<case>.dcm, referencing the source series), NIfTI (<case>.nii.gz) or both; default: SEG "
        "for DICOM inputs, NIfTI for NIfTI inputs",
    )  # fmt: skip
    predict.add_argument("--ckpt", default="best", help="run folders: best (default), last, or a .ckpt path")
    predict.add_argument("--no-progress", action="store_true", help="no progress bars")
    predict.add_argument(  # SUPPRESS: `medseg --debug predict` keeps working
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks for errors"
    )
    predict.set_defaults(func=_cmd_predict)

    quickstart = verbs.add_parser(
        "quickstart",
        help="LiteMedSAM + LoRA on mni-tissue, pretrained vs scratch with the same budget, on CPU; prints a table",
        description="Trains and evaluates experiment=quickstart twice (init=pretrained, init=scratch) and prints "
        "the test metrics side by side. Extra Hydra overrides apply to both arms.",
    )
    quickstart.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides for both arms")
    quickstart.set_defaults(func=_cmd_quickstart)

    classify = verbs.add_parser(
        "classify",
        help="train and test a slice/volume classifier: protocol=knn|linear|peft|full, any backbone",
        description="e.g. `medseg classify protocol=linear backbone=dinov2_vits14`, or the whole ladder (every "
        "protocol x init, one table) with `medseg classify experiment=cls_quickstart`.",
        epilog=_HYDRA_EPILOG,
    )
    classify.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides and flags (-m, --cfg job)")
    classify.set_defaults(func=_cmd_classify)

    benchmark = verbs.add_parser(
        "benchmark",
        help="transfer vs scratch grid (arms x label fractions x seeds, equal budgets, lr searched on validation) "
        "with bootstrap CIs, paired tests and a report",
        description="e.g. `medseg benchmark experiment=bench_mni_tissue`. Re-running the same command resumes: "
        "finished runs (complete summary.json) are skipped, failed ones retried.",
        epilog=_HYDRA_EPILOG,
    )
    benchmark.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides (experiment=NAME, ...)")
    benchmark.set_defaults(func=_cmd_benchmark)

    export = verbs.add_parser(
        "export", help="turn a run folder into a release (safetensors, config, metadata, card, example, checksums)"
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `medseg train`")
    export.add_argument("-o", "--output", required=True, metavar="RELEASE_DIR", help="folder to create (new or empty)")
    export.add_argument("--name", default=None, help="release name, lower case (default: from the run folder)")
    export.add_argument("--version", default="0.1.0", help="semantic version X.Y.Z")
    mode = export.add_mutually_exclusive_group()
    mode.add_argument("--merge", action="store_true", help="all weights, adapters folded in; no base file needed")
    mode.add_argument(
        "--adapter-only",
        action="store_true",
        help="adapter deltas + decoder on the named base weights (default for an adapted pretrained backbone)",
    )
    export.set_defaults(func=_cmd_export)

    verify = verbs.add_parser(
        "verify", help="check a release: checksums, rebuild, example output; exit 0 only if all hold"
    )
    verify.add_argument("release_dir", metavar="RELEASE_DIR", help="a release folder (see `medseg export`)")
    verify.add_argument("--device", default="cpu", help="cpu (default: the expected output was made there) or cuda")
    verify.set_defaults(func=_cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Hydra's own flags (-m, --cfg job, ...) pass through to the Hydra verbs untouched.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.verb not in _HYDRA_VERBS:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*unknown, *args.overrides]
    quiet_third_party(debug=args.debug)
    try:
        return int(args.func(args) or 0)
    except MedsegError as err:
        if args.debug:
            raise
        print(f"medseg {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
