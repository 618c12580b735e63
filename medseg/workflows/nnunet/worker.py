"""nnU-Net's process: fingerprint (with the integrity check), plan, preprocess, train, predict. Run as
``python -m medseg.workflows.nnunet.worker <spec.json>`` with the run's ``nnUNet_*`` folders in the environment.

Everything here is nnU-Net's own code, called through its Python API in the order of its command-line tools
(``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``, ``nnUNetv2_train``, ``nnUNetv2_predict``); medseg only
decides the cases (the raw dataset and ``splits_final.json`` the parent wrote) and the length of training
(:class:`~medseg.workflows.nnunet.trainer.StepBudgetTrainer`). It runs in its own process because nnU-Net reads its
folders from the environment once, at import: a process per run is what keeps runs from sharing them.

The spec (written by :mod:`medseg.workflows.nnunet.workflow`) names the dataset, the settings, the test images and
where predictions and ``result.json`` go. ``result.json`` is written last, so it exists only when every stage ran:
the split nnU-Net trained on, the iterations it ran, the plan it chose, parameter counts, times and peak memory.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import nnunetv2
import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.experiment_planning.plan_and_preprocess_api import (
    extract_fingerprint_dataset,
    plan_experiment_dataset,
    preprocess_dataset,
)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medseg.atomic import atomic_write_json
from medseg.workflows.memory import peak_memory_mb
from medseg.workflows.nnunet.flops import step_flops
from medseg.workflows.nnunet.settings import NnunetSettings
from medseg.workflows.nnunet.trainer import StepBudgetTrainer

__all__ = ["main", "run"]


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def plan_and_preprocess(dataset_id: int, settings: NnunetSettings) -> str:
    """nnU-Net's fingerprint (after ``verify_dataset_integrity``), plans and preprocessing; returns the plans name."""
    processes = settings.num_processes
    extract_fingerprint_dataset(dataset_id, num_processes=processes, check_dataset_integrity=True, clean=True)
    planner = recursive_find_python_class(
        join(nnunetv2.__path__[0], "experiment_planning"), settings.planner, "nnunetv2.experiment_planning"
    )
    if planner is None:
        raise SystemExit(
            f"nnunet.planner={settings.planner!r} is no nnU-Net experiment planner (e.g. ExperimentPlanner)"
        )
    plans, plans_identifier = plan_experiment_dataset(dataset_id, planner)
    if settings.configuration not in plans["configurations"]:
        raise SystemExit(
            f"nnU-Net planned no {settings.configuration!r} configuration for this dataset (it planned "
            f"{sorted(plans['configurations'])}): choose one of those with +nnunet=..."
        )
    preprocess_dataset(
        dataset_id, plans_identifier, configurations=(settings.configuration,), num_processes=(processes,),
        verbose=False, show_progress_bar=False,
    )  # fmt: skip
    return plans_identifier


def train(dataset_name: str, plans_identifier: str, settings: NnunetSettings) -> StepBudgetTrainer:
    """nnU-Net's trainer on fold 0 of the run's ``splits_final.json``, for ``settings.max_steps`` iterations."""
    if settings.da_processes is not None:
        # Only now: nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails at 0.
        os.environ["nnUNet_n_proc_DA"] = str(settings.da_processes)  # noqa: SIM112 (nnU-Net's name)
    folder = join(nnUNet_preprocessed, dataset_name)
    plans = load_json(join(folder, plans_identifier + ".json"))
    plans["continue_training"] = False
    trainer = StepBudgetTrainer(
        plans, settings.configuration, 0, load_json(join(folder, "dataset.json")), torch.device(settings.device)
    )
    trainer.set_budget(
        settings.max_steps, settings.iterations_per_epoch, settings.val_iterations_per_epoch, settings.lr
    )
    trainer.run_training()
    return trainer


def predictor_for(trainer: StepBudgetTrainer, settings: NnunetSettings) -> nnUNetPredictor:
    """nnU-Net's predictor with the final checkpoint, built as ``initialize_from_trained_model_folder`` builds it but
    from the trainer's class (nnU-Net would look the class up by name inside its own package, and not find it)."""
    checkpoint = torch.load(join(trainer.output_folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    plans_manager = PlansManager(load_json(join(trainer.output_folder_base, "plans.json")))
    dataset_json = load_json(join(trainer.output_folder_base, "dataset.json"))
    configuration = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
    network = type(trainer).build_network_architecture(
        plans_manager, configuration, determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False,
    )  # fmt: skip
    network.load_state_dict(checkpoint["network_weights"])
    predictor = nnUNetPredictor(
        tile_step_size=settings.tile_step_size, use_gaussian=True, use_mirroring=settings.use_mirroring,
        perform_everything_on_device=settings.device == "cuda", device=torch.device(settings.device),
        allow_tqdm=False,
    )  # fmt: skip
    predictor.manual_initialization(
        network, plans_manager, configuration, [checkpoint["network_weights"]], dataset_json,
        checkpoint["trainer_name"], checkpoint.get("inference_allowed_mirroring_axes"),
    )  # fmt: skip
    return predictor


def _move_records(predictions: Path, folder: Path) -> None:
    """Move the JSON records nnU-Net's predictor leaves next to its label maps (its arguments, plans, dataset.json)
    into ``nnunet/prediction/``: ``predictions/`` holds label maps only, as every other arm's."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("predict_from_raw_data_args.json", "dataset.json", "plans.json"):
        if (predictions / name).is_file():
            (predictions / name).replace(folder / name)


def training_flops(trainer: StepBudgetTrainer) -> dict[str, Any]:
    """FLOPs of one of the trainer's steps (``train_flops_per_step``) on a twin of its network on the ``meta`` device,
    at its planned batch and patch, with deep supervision as it trained (:func:`~medseg.workflows.nnunet.flops.
    step_flops`); ``None`` with the reason in ``train_flops_note`` when it cannot be counted."""
    try:
        network = type(trainer).build_network_architecture(
            trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
            trainer.label_manager.num_segmentation_heads, trainer.enable_deep_supervision,
        ).to("meta")  # fmt: skip
        shape = (int(trainer.batch_size), int(trainer.num_input_channels), *trainer.configuration_manager.patch_size)
        flops = float(step_flops(network, torch.zeros(shape, device="meta")))
    except Exception as err:  # a report column: the run stands without it
        return {"train_flops_per_step": None, "train_flops_note": f"not counted: {type(err).__name__}: {err}"[:300]}
    return {"train_flops_per_step": flops, "train_flops_note": f"one step on a batch of {shape}, forward + backward"}


def _facts(trainer: StepBudgetTrainer, plans_identifier: str) -> dict[str, Any]:
    configuration = trainer.configuration_manager
    parameters = list(trainer.network.parameters())
    tr_keys, val_keys = trainer.do_split()
    logged = trainer.logger.get_value("mean_fg_dice", step=None) if trainer.current_epoch else []
    return {
        "train_keys": [str(k) for k in tr_keys],
        "val_keys": [str(k) for k in val_keys],
        "steps_trained": int(trainer.steps_trained),
        "epochs": int(trainer.num_epochs),
        "initial_lr": float(trainer.initial_lr),
        "val_pseudo_dice": float(logged[-1]) if len(logged) else None,
        "plans": plans_identifier,
        "configuration": trainer.configuration_name,
        "batch_size": int(trainer.batch_size),
        "patch_size": [int(s) for s in configuration.patch_size],
        "spacing": [float(s) for s in configuration.spacing],
        "trainable_params": int(sum(p.numel() for p in parameters if p.requires_grad)),
        "total_params": int(sum(p.numel() for p in parameters)),
        "trainer": type(trainer).__name__,
        "output_folder": str(trainer.output_folder),
        **training_flops(trainer),
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Every stage for one spec; returns (and writes to ``spec["result"]``) what the parent records."""
    settings = NnunetSettings.from_json(spec["settings"])
    _seed(settings.seed)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    dataset_name = spec["dataset_name"]
    dataset_id = int(dataset_name[len("Dataset") : len("Dataset") + 3])
    times = {}
    started = time.perf_counter()
    plans_identifier = plan_and_preprocess(dataset_id, settings)
    times["preprocess_wall_time_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    trainer = train(dataset_name, plans_identifier, settings)
    times["train_wall_time_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    result = {**_facts(trainer, plans_identifier), **times}
    cases = spec.get("test_cases") or []
    if cases:
        predictor = predictor_for(trainer, settings)
        output = Path(spec["predictions"])
        predictor.predict_from_files_sequential(
            [list(case["images"]) for case in cases], [str(output / case["case_id"]) for case in cases],
            save_probabilities=False, overwrite=True,
        )  # fmt: skip
        _move_records(output, Path(spec["result"]).parent / "prediction")
    result["predict_wall_time_s"] = round(time.perf_counter() - started, 1)
    result["predicted_cases"] = [case["case_id"] for case in cases]
    result.update(peak_memory_mb())
    atomic_write_json(spec["result"], result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m medseg.workflows.nnunet.worker <spec.json>", file=sys.stderr)
        return 2
    run(json.loads(Path(args[0]).read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
