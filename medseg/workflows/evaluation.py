"""What ``medseg evaluate`` runs: predict the test cases of a run on their native grid and write its ``summary.json``.

The reported metrics of a run are computed here and only here: each test volume is predicted whole (slice by slice or
sliding window, :func:`medseg.inference.predict_logits`), its softmax is mapped back through the inverse of the
deterministic transforms onto the input file's own grid and the argmax taken there
(:func:`medseg.inference.native_label_map`), written as a label map with the input's affine, and scored against the
reference file with :func:`medseg.evaluation.evaluate_folder` (Dice, HD95 in mm, NSD at a tolerance in mm).
Validation cases never take part.

Training (:func:`medseg.workflows.training.train`) calls :func:`evaluate_model` after training; ``medseg evaluate
run_dir=...`` runs :func:`evaluate`, which re-evaluates a finished run from its saved config and checkpoint
(``conf/evaluate.yaml``).

Cost. The model is loaded once and sent to the evaluation device once (:func:`evaluation_device`: CUDA when there is
one). That move matters after training: Lightning's teardown leaves a trained module on the CPU, so without it the
test cases of a GPU run were predicted on the CPU. Each case is then read and preprocessed once, predicted in
batches of slices or windows (:func:`medseg.inference.predict_logits`), inverted with the datamodule's own transform
instance, written and scored at once (:func:`medseg.evaluation.score_case`); :class:`medseg.evaluation.timing.
EvaluationClock` times each phase, and ``summary.json`` records ``seconds_per_case``, the phase split
(``eval_seconds``) and each case's ``seconds``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from medseg.config import instantiate
from medseg.data.transforms import target_spacing
from medseg.errors import ConfigError
from medseg.evaluation import build_summary, score_case, write_summary
from medseg.evaluation.interactive import summarize_interactive
from medseg.evaluation.interactive_run import InteractiveSettings, evaluate_case, evaluate_case_3d, load_native_case
from medseg.evaluation.segfm3d import PROTOCOL, Segfm3dSettings, summarize_segfm3d
from medseg.evaluation.segfm3d_run import evaluate_case_segfm3d
from medseg.evaluation.timing import EvaluationClock, with_case_seconds
from medseg.inference import native_label_map, predict_logits, write_label_map
from medseg.inference.cache import EmbeddingCache
from medseg.inference.prepared import intensity_transforms
from medseg.runs import SUMMARY, select_checkpoint
from medseg.tasks.checkpointing import load_weights
from medseg.workflows.memory import peak_memory_mb

__all__ = ["evaluate", "evaluate_model", "evaluate_promptable_model", "evaluation_device"]

log = logging.getLogger("medseg.evaluate")


def _check_references(datamodule: Any) -> None:
    """Refuse, before predicting anything, test cases without a reference label map."""
    if any(c.label is None for c in datamodule.info.test):
        raise ConfigError(
            f"{datamodule.info.root} has test images without reference labels (labelsTs/); a run can only be "
            f"evaluated on labelled test cases."
        )


def evaluation_device(device: str | torch.device | None = None) -> torch.device:
    """Where the test cases are predicted: ``device`` when given, else CUDA when available, else the CPU."""
    if device is not None and str(device) != "":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on_device(task: Any, device: str | torch.device | None) -> torch.nn.Module:
    """The task's model, moved (with the task) to the evaluation device, once for every case."""
    target = evaluation_device(device)
    (task if isinstance(task, torch.nn.Module) else task.model).to(target)
    return task.model


def evaluate_model(
    task: Any,
    datamodule: Any,
    run_dir: str | Path,
    extras: dict[str, Any] | None = None,
    started: float | None = None,
    max_cases: int | None = None,
    nsd_tolerance_mm: float = 2.0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Predict every test case whole, write it on the native grid, score it, and write ``run_dir/summary.json``.

    Args:
        task: a :class:`~medseg.tasks.SegmentationTask` (its model and ``inference`` settings are used).
        datamodule: the run's datamodule; its ``deterministic_transform`` is inverted.
        run_dir: the run folder; predictions go to ``predictions/``.
        extras: run facts for the summary (trainable parameters, memory, times).
        started: ``time.perf_counter()`` at the start of the run, for ``wall_time_s``.
        max_cases: evaluate only the first cases (debug runs); ``None``: all.
        nsd_tolerance_mm: NSD tolerance (mm).
        device: where the model predicts (:func:`evaluation_device`; default CUDA when available). The task is
            moved there and stays there.

    Returns:
        The summary (see :func:`medseg.evaluation.build_summary`), with ``seconds_per_case``, ``eval_seconds``
        and per-case ``seconds`` (:mod:`medseg.evaluation.timing`).
    """
    if hasattr(task, "evaluation") and hasattr(task.model, "decode"):  # a promptable task: simulated users
        return evaluate_promptable_model(
            task, datamodule, run_dir, extras, started, max_cases, nsd_tolerance_mm, device=device
        )
    run_dir = Path(run_dir)
    clock = EvaluationClock()
    datamodule.setup("test")
    _check_references(datamodule)
    dataset = datamodule.dataset_for("test")
    cases = _test_cases(datamodule, max_cases)
    predictions = _fresh_predictions(run_dir)
    model = _on_device(task, device)
    suffix = datamodule.info.file_ending
    scored = []
    for index, case in enumerate(cases):
        with clock.phase("load", case.case_id):
            item = dataset[datamodule.test_ids.index(case.case_id)]
        with clock.phase("predict", case.case_id):
            logits = predict_logits(model, item["image"], spatial_dims=int(model.spatial_dims), **task.inference)
        with clock.phase("invert", case.case_id):
            native = native_label_map(logits, item, datamodule.deterministic_transform)
        with clock.phase("write", case.case_id):
            written = write_label_map(native, case.images[0], predictions / f"{case.case_id}{suffix}")
        with clock.phase("metrics", case.case_id):
            scored.append(score_case(written, case.label, datamodule.label_names, nsd_tolerance_mm, suffix=suffix))
        log.info("Predicted test case %d/%d: %s", index + 1, len(cases), case.case_id)
    summary = _summarise(scored, clock, datamodule, run_dir, extras, started)
    log.info(
        "Test foreground mean Dice %.4f (%.2f s per case) -> %s",
        summary["foreground_mean"]["dice"] or 0.0, summary["seconds_per_case"], run_dir / SUMMARY,
    )  # fmt: skip
    return summary


def _test_cases(datamodule: Any, max_cases: int | None) -> list[Any]:
    cases = [c for c in datamodule.info.test if c.case_id in set(datamodule.test_ids)]
    return cases if max_cases is None else cases[:max_cases]


def _fresh_predictions(run_dir: Path) -> Path:
    """``run_dir/predictions/``, emptied of an earlier evaluation's label maps."""
    predictions = run_dir / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    for stale in predictions.glob("*.nii.gz"):
        stale.unlink()
    return predictions


def _summarise(
    scored: list[dict[str, Any]],
    clock: EvaluationClock,
    datamodule: Any,
    run_dir: Path,
    extras: dict[str, Any] | None,
    started: float | None,
    more: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build ``summary.json`` from the scored cases (sorted by case id, as :func:`medseg.evaluation.evaluate_folder`
    orders its files) with the run's facts and the clock's, and write it to ``run_dir``. The clock stops here, so
    the summary's own writing is the only thing it leaves out."""
    facts = {**(extras or {}), **clock.facts(), **(more or {})}
    if started is not None:
        facts["wall_time_s"] = round(time.perf_counter() - started, 1)
    per_case = sorted(with_case_seconds(scored, clock.cases), key=lambda case: case["case_id"])
    summary = build_summary(per_case, datamodule.label_names, facts)
    write_summary(run_dir / SUMMARY, summary)
    return summary


def evaluate_promptable_model(
    task: Any,
    datamodule: Any,
    run_dir: str | Path,
    extras: dict[str, Any] | None = None,
    started: float | None = None,
    max_cases: int | None = None,
    nsd_tolerance_mm: float = 2.0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Evaluate a promptable run with a simulated user on the test cases' native grid; write ``summary.json``.

    Per object: Dice after 1..k clicks, NoC@85/90, box Dice and the Dice of slice propagation from one box on its
    middle slice (:mod:`medseg.evaluation.interactive_run`), summarised under ``interactive``. The propagated
    objects of a case form its label map (``predictions/``), scored like any run (Dice, HD95, NSD per class), so the
    usual fields mean "one box per object, propagated". ``task.evaluation`` sets the cost (clicks, objects, cases).

    A 3-D model is clicked in 3-D on the whole volume (sliding windows, :func:`~medseg.evaluation.interactive_run.
    evaluate_case_3d`), zoomed to the run's ``Spacingd`` spacing if it has one; its box Dice is from the tight 3-D
    box, its propagation Dice is ``null`` (a 2-D-model metric), and its label map holds each object's box-prompt mask.

    With ``task.evaluation.protocol=segfm3d`` the simulated user is the CVPR 2025 challenge's instead (one box, five
    clicks per class; :mod:`medseg.evaluation.segfm3d`): ``summary.json`` gets a ``protocol`` section in place of
    ``interactive``, and the case's label map is its last step's.

    Args:
        task: a :class:`~medseg.tasks.promptable.PromptableTask`.
        max_cases: cap on the test cases, overriding ``task.evaluation.max_cases`` when given.
        Others: as :func:`evaluate_model`.
    """
    run_dir = Path(run_dir)
    clock = EvaluationClock()
    settings = InteractiveSettings.from_mapping(task.evaluation)
    datamodule.setup("test")
    _check_references(datamodule)
    cases = _test_cases(datamodule, settings.max_cases if max_cases is None else max_cases)
    predictions = _fresh_predictions(run_dir)
    intensity = intensity_transforms(datamodule.deterministic_transform)
    model = _on_device(task, device).eval()
    suffix = datamodule.info.file_ending
    per_case, scored = {}, []
    for index, case in enumerate(cases):
        with clock.phase("load", case.case_id):
            native = load_native_case(case.case_id, case.images, case.label, intensity)
        with clock.phase("predict", case.case_id), torch.no_grad():
            if settings.protocol == PROTOCOL:  # the CVPR 2025 challenge's box + 5 clicks, 2-D and 3-D models alike
                objects, label_map = evaluate_case_segfm3d(
                    model, native, datamodule.label_names, settings, getattr(task, "slice_axis", 2),
                    target_spacing(datamodule), float(task.inference.get("overlap", 0.25)),
                )  # fmt: skip
            elif int(model.spatial_dims) == 3:
                objects, label_map = evaluate_case_3d(
                    model, native, datamodule.label_names, settings, target_spacing(datamodule),
                    overlap=float(task.inference.get("overlap", 0.25)),
                )  # fmt: skip
            else:
                objects, label_map = evaluate_case(
                    model, native, datamodule.label_names, settings, task.slice_axis, EmbeddingCache(max_items=4096)
                )
        per_case[case.case_id] = objects
        with clock.phase("invert", case.case_id):
            label_map = native.native(label_map)
        with clock.phase("write", case.case_id):
            written = write_label_map(label_map, case.images[0], predictions / f"{case.case_id}{suffix}")
        with clock.phase("metrics", case.case_id):
            scored.append(score_case(written, case.label, datamodule.label_names, nsd_tolerance_mm, suffix=suffix))
        count = len(objects["classes"]) if settings.protocol == PROTOCOL else len(objects)
        log.info("Interactive test case %d/%d: %s (%d objects)", index + 1, len(cases), case.case_id, count)
    if settings.protocol == PROTOCOL:
        section = {"protocol": summarize_segfm3d(per_case, Segfm3dSettings.from_mapping(settings.segfm3d))}
        summary = _summarise(scored, clock, datamodule, run_dir, extras, started, section)
        mean = summary["protocol"]["mean"]
        log.info("Test segfm3d DSC_AUC %.4f, final DSC %.4f -> %s", mean.get("dsc_auc", 0.0),
                 mean.get("final_dsc", 0.0), run_dir / SUMMARY)  # fmt: skip
        return summary
    interactive = {"interactive": summarize_interactive(per_case, settings.max_clicks)}
    summary = _summarise(scored, clock, datamodule, run_dir, extras, started, interactive)
    dices = summary["interactive"]["foreground_mean"].get("dice_at_k") or [0.0]
    log.info("Test interactive Dice@1 %.4f, Dice@%d %.4f -> %s", dices[0], len(dices), dices[-1], run_dir / SUMMARY)
    return summary


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Re-evaluate a finished run: rebuild its data and model from ``<run_dir>/.hydra/config.yaml``, load a checkpoint.

    Raises:
        ConfigError: the run folder has no saved config or no checkpoint.
    """
    started = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{saved} not found: run_dir must be a folder written by `medseg train`.")
    run_cfg = OmegaConf.load(saved)
    if cfg.get("overrides"):
        run_cfg = OmegaConf.merge(run_cfg, OmegaConf.from_dotlist(list(cfg.overrides)))
    checkpoint = select_checkpoint(run_dir, str(cfg.ckpt))
    if checkpoint is None:
        raise ConfigError(f"{run_dir}/checkpoints holds no checkpoint ({cfg.ckpt}); train the run first.")
    datamodule = instantiate(run_cfg.data)
    datamodule.setup("test")
    model = instantiate(run_cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.num_channels)
    task = instantiate(run_cfg.task, model=model, label_names=datamodule.label_names)
    load_weights(task, checkpoint)
    device = evaluation_device(cfg.get("device"))
    task.to(device)
    extras = {"checkpoint": checkpoint.name, **peak_memory_mb()}
    report = task.trainable_report()
    extras.update({"trainable_params": int(report.get("trainable", 0)), "total_params": int(report.get("total", 0))})
    return evaluate_model(
        task, datamodule, run_dir, extras=extras, started=started, max_cases=cfg.get("max_cases"),
        nsd_tolerance_mm=float(cfg.nsd_tolerance_mm), device=device,
    )  # fmt: skip
