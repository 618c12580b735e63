"""One rung of the classification ladder on one dataset: fit, score the held-out cases, write the run folder.

:func:`train_classifier` builds the data module, the classifier and the protocol from ``conf/classify.yaml``, fits
(kNN/linear on cached frozen features, :mod:`.protocols` and :mod:`.features`, or Lightning training of
:class:`~medseg.tasks.classification.ClassificationTask` for PEFT/full), scores the validation and test cases, and
writes into the run folder ``summary.json`` (per-case probabilities, metrics, subgroups), ``predictions.csv``,
``confusion_matrix.png``, the weights ``classifier.safetensors`` and ``classifier.yaml`` (what
:func:`medseg.inference.classified.load_classifier` needs to predict with the run). ``medseg classify`` and the
ladder (:mod:`.ladder`) call it; it lives here, not in the command, so that nothing imports a command module.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from medseg.atomic import atomic_path, atomic_write_text
from medseg.config import instantiate
from medseg.errors import ConfigError
from medseg.evaluation.classification.metrics import classification_metrics
from medseg.evaluation.classification.summary import build_classification_summary, write_classification_outputs
from medseg.inference.classified import CONFIG_FILE, WEIGHTS_FILE
from medseg.inference.precision import inference_precision
from medseg.models.knn import KNNHead
from medseg.workflows.classification.features import FeatureCache
from medseg.workflows.classification.protocols import FROZEN_PROTOCOLS, PROTOCOLS, fit_knn, fit_linear_probe
from medseg.workflows.training import build_callbacks, build_loggers, resolve_precision

__all__ = ["build_model", "predict_split", "save_classifier", "train_classifier"]

log = logging.getLogger("medseg.classify")


def build_model(cfg: DictConfig, datamodule: Any) -> torch.nn.Module:
    """The classifier of ``cfg.model``, sized by the data module (outputs, channels, label kind, 2-D/3-D)."""
    return instantiate(
        cfg.model, num_outputs=datamodule.num_outputs, in_channels=datamodule.in_channels,
        label_kind=datamodule.spec.kind, spatial_dims=datamodule.spatial_dims,
    )  # fmt: skip


def predict_split(model: torch.nn.Module, datamodule: Any, split: str) -> tuple[list[str], np.ndarray]:
    """Case ids and ``(N, K)`` probabilities of the preprocessed cases of ``split``, in eval mode."""
    device = next(iter(model.parameters())).device
    model.eval()
    ids, probs = [], []
    with torch.no_grad():
        for batch in datamodule.eval_dataloader(split):
            probs.append(model.probabilities(batch["image"].to(device)).float().cpu())
            ids += [str(c) for c in batch["case_id"]]
    return ids, (torch.cat(probs).numpy() if probs else np.zeros((0, model.num_outputs)))


def _fit_frozen(cfg: DictConfig, model: Any, datamodule: Any, protocol: str) -> tuple[dict[str, Any], dict]:
    cache = FeatureCache(cfg.protocol.get("cache_dir"))
    signature = datamodule.preprocessing_signature()
    features = {}
    for split in ("train", "val", "test"):
        ids = getattr(datamodule, f"{split}_ids")
        features[split] = cache.features(model, datamodule.eval_dataloader(split), signature) if ids else ([], None)
    train_ids, x = features["train"]
    y = datamodule.targets(train_ids)
    facts: dict[str, Any] = {}
    if protocol == "knn":
        model.head = fit_knn(
            x, y, datamodule.num_outputs, datamodule.spec.kind, int(cfg.protocol.k), str(cfg.protocol.weights),
            float(cfg.protocol.temperature),
        )  # fmt: skip
        facts["knn_k"] = int(cfg.protocol.k)
    else:
        val_ids, xv = features["val"]
        head, facts = fit_linear_probe(
            x, y, datamodule.num_outputs, datamodule.spec.kind, xv, datamodule.targets(val_ids) if val_ids else None,
            l2_grid=list(cfg.protocol.l2_grid), max_iter=int(cfg.protocol.max_iter), seed=int(cfg.seed),
        )  # fmt: skip
        model.head = head.to(x.device)
    probabilities = {}
    with torch.no_grad():
        for split in ("val", "test"):
            ids, z = features[split]
            if ids:
                probabilities[split] = (ids, model.activate(model.head(z)).float().numpy())
    return {**facts, **cache.stats()}, probabilities


def _fit_trained(cfg: DictConfig, model: Any, datamodule: Any, run_dir: Path) -> dict[str, Any]:
    task = instantiate(cfg.task, model=model, class_names=datamodule.class_names)
    loggers = build_loggers(cfg)
    callbacks = [
        c for c in build_callbacks(cfg) if loggers or not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)
    ]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir),
        precision=resolve_precision(cfg.trainer.get("precision", "auto")),
    )  # fmt: skip
    val = datamodule.eval_dataloader("val") if datamodule.val_ids else None
    trainer.fit(task, train_dataloaders=datamodule.train_dataloader(), val_dataloaders=val)
    return {"steps_trained": int(trainer.global_step)}


def save_classifier(run_dir: Path, model: torch.nn.Module, cfg: DictConfig, datamodule: Any, protocol: str) -> None:
    """Write ``classifier.safetensors`` and ``classifier.yaml`` (model and data config, label spec, head kind)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(run_dir / WEIGHTS_FILE) as temporary:
        save_file(state, str(temporary))
    record = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {
            "preprocess": OmegaConf.to_container(cfg.data.preprocess, resolve=True),
            "spatial_dims": datamodule.spatial_dims, "size": datamodule.size, "num_slices": datamodule.num_slices,
            "in_channels": datamodule.in_channels,
        },
        "label": datamodule.spec.to_dict(),
        "protocol": protocol,
        "head": "knn" if isinstance(model.head, KNNHead) else "linear",
        "knn": {k: getattr(model.head, k) for k in ("k", "weights", "temperature")} if protocol == "knn" else None,
    }  # fmt: skip
    atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(record)))


def _no_grad_precision(cfg: DictConfig) -> str:
    """Feature extraction and test predictions run in the numerics of training (``bf16-mixed`` -> ``bf16``), so a
    bf16 ladder is bf16 throughout; the feature cache keys on it (:mod:`medseg.inference.precision`)."""
    trained = str(resolve_precision(cfg.trainer.get("precision", "auto")))
    return "bf16" if trained.startswith("bf16") else "fp16" if trained.startswith("16") else "fp32"


def train_classifier(cfg: DictConfig) -> dict[str, float]:
    """Run one protocol on one data/model config; write the run folder; return ``val/*`` and ``test/*`` metrics."""
    started = time.perf_counter()
    protocol = str(cfg.protocol.name)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol.name must be one of {PROTOCOLS}, got {protocol!r}.")
    L.seed_everything(int(cfg.seed), workers=True)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = build_model(cfg, datamodule)
    report = model.trainable_report()
    numerics = inference_precision(_no_grad_precision(cfg), next(iter(model.parameters())).device)
    if protocol in FROZEN_PROTOCOLS:
        with numerics:
            facts, probabilities = _fit_frozen(cfg, model, datamodule, protocol)
        report = {"trainable": sum(p.numel() for p in model.head.parameters()), "total": report["total"]}
    else:
        facts = _fit_trained(cfg, model, datamodule, run_dir)
        with numerics:
            probabilities = {
                s: predict_split(model, datamodule, s) for s in ("val", "test") if getattr(datamodule, f"{s}_ids")
            }
    fit_seconds = time.perf_counter() - started
    save_classifier(run_dir, model, cfg, datamodule, protocol)
    kind, names = datamodule.spec.kind, datamodule.class_names
    metrics: dict[str, float] = {}
    if "val" in probabilities:
        ids, probs = probabilities["val"]
        for key, value in classification_metrics(probs, datamodule.targets(ids), kind, names).items():
            if isinstance(value, float):
                metrics[f"val/{key}"] = value
    if "test" not in probabilities:
        raise ConfigError(f"{datamodule.table_path} has no test cases (rows with split 'test'); nothing to evaluate.")
    ids, probs = probabilities["test"]
    extras = {
        "dataset": str(cfg.data.dataset), "protocol": protocol, "init": str(cfg.get("init", "?")),
        "model": str(cfg.get("model_name", "?")), "adapter": str(cfg.get("adapter_name", "?")),
        "label_fraction": float(datamodule.label_fraction), "num_train_cases": len(datamodule.train_ids),
        "num_val_cases": len(datamodule.val_ids), "trainable_params": int(report["trainable"]),
        "total_params": int(report["total"]), "fit_wall_time_s": round(fit_seconds, 1), "seed": int(cfg.seed), **facts,
    }  # fmt: skip
    summary = build_classification_summary(
        ids, probs, datamodule.targets(ids), kind, names, datamodule.subgroups(ids), extras=extras
    )
    summary["eval_wall_time_s"] = round(time.perf_counter() - started - fit_seconds, 1)
    write_classification_outputs(run_dir, summary)
    for key, value in summary["mean"].items():
        if isinstance(value, float):
            metrics[f"test/{key}"] = value
    log.info("%s: test AUROC %s, accuracy %.3f -> %s", protocol, summary["mean"]["auroc_macro"],
             summary["mean"]["accuracy"], run_dir)  # fmt: skip
    return metrics
