"""``medseg classify``: one rung of the classification ladder (``protocol=knn|linear|peft|full``), or the whole ladder.

:func:`train_classifier` builds the data module, the classifier and the protocol from ``conf/classify.yaml``, fits
(kNN/linear on cached frozen features, or Lightning training for PEFT/full), scores the validation and test cases,
and writes into the run folder ``summary.json`` (per-case probabilities, metrics, subgroups), ``predictions.csv``,
``confusion_matrix.png``, the weights ``classifier.safetensors`` and ``classifier.yaml`` (what
:func:`load_classifier` needs). A config with ``ladder`` set (``experiment=cls_quickstart``) runs every
(init, protocol) arm in turn with :func:`run_ladder` and prints one table.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from medseg.classification_protocols import FROZEN_PROTOCOLS, PROTOCOLS, KNNHead, fit_knn, fit_linear_probe
from medseg.config import instantiate
from medseg.errors import ConfigError, WeightsError
from medseg.inference.precision import inference_precision

__all__ = [
    "CONFIG_DIR",
    "load_classifier",
    "main",
    "predict_probabilities",
    "predict_split",
    "run_ladder",
    "train_classifier",
]

log = logging.getLogger("medseg.classify")
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
WEIGHTS_FILE, CONFIG_FILE = "classifier.safetensors", "classifier.yaml"


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
    from medseg.tasks.feature_cache import FeatureCache

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
    from medseg.train import build_callbacks, build_loggers, resolve_precision

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
    from safetensors.torch import save_file

    from medseg.atomic import atomic_path, atomic_write_text

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
    from medseg.train import resolve_precision

    trained = str(resolve_precision(cfg.trainer.get("precision", "auto")))
    return "bf16" if trained.startswith("bf16") else "fp16" if trained.startswith("16") else "fp32"


def train_classifier(cfg: DictConfig) -> dict[str, float]:
    """Run one protocol on one data/model config; write the run folder; return ``val/*`` and ``test/*`` metrics."""
    from medseg.evaluation.classification import classification_metrics
    from medseg.evaluation.cls_summary import build_classification_summary, write_classification_outputs

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


def load_classifier(run_dir: str | Path, device: str | torch.device = "cpu"):
    """A :class:`~medseg.inference.loaded.LoadedModel` (kind ``classifier``) from a ``medseg classify`` run folder.

    The model is rebuilt from ``classifier.yaml`` with a scratch backbone (no official weights needed) and then
    loaded strictly from ``classifier.safetensors``.
    """
    from safetensors.torch import load_file

    from medseg.inference.cache import weights_hash
    from medseg.inference.loaded import LoadedModel

    run_dir = Path(run_dir)
    if not (run_dir / WEIGHTS_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise WeightsError(f"{run_dir} has no {WEIGHTS_FILE} + {CONFIG_FILE}; train it with `medseg classify` first.")
    record = OmegaConf.load(run_dir / CONFIG_FILE)
    model_cfg = OmegaConf.to_container(record.model, resolve=True)
    model_cfg.update(num_outputs=len(record.label.names), in_channels=int(record.data.in_channels),
                     label_kind=str(record.label.kind), spatial_dims=int(record.data.spatial_dims))  # fmt: skip
    if "pretrained" in model_cfg:
        model_cfg["pretrained"] = False
    model = instantiate(OmegaConf.create(model_cfg))
    state = load_file(str(run_dir / WEIGHTS_FILE))
    if record.head == "knn":
        model.head = KNNHead(state["head.bank"], state["head.targets"], **record.knn)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return LoadedModel(
        model=model, kind="classifier", config=record, label_names=dict(enumerate(record.label.names)),
        source=str(run_dir), weights_id=weights_hash(model),
    )  # fmt: skip


def predict_probabilities(loaded: Any, image: Any) -> np.ndarray:
    """Class probabilities ``(K,)`` of one case, preprocessed exactly as in training.

    Args:
        loaded: a ``LoadedModel`` of kind ``classifier`` (:func:`load_classifier`).
        image: a file path, a list of channel file paths, or an already read channel-first image (array or tensor,
            before the preset's intensity transforms).
    """
    from medseg.data.cls_datamodule import classification_transform

    if loaded.kind != "classifier":
        raise ConfigError(f"predict_probabilities needs a classifier, got a {loaded.kind!r} model.")
    data = loaded.config.data
    is_path = isinstance(image, (str, Path, list, tuple))
    transform = classification_transform(
        OmegaConf.to_container(data.preprocess, resolve=True), int(data.spatial_dims), int(data.size),
        int(data.num_slices), load=is_path,
    )  # fmt: skip
    if not is_path:
        from monai.data import MetaTensor

        image = image if isinstance(image, MetaTensor) else MetaTensor(torch.as_tensor(np.asarray(image)).float())
    sample = transform({"image": image})
    device = next(iter(loaded.model.parameters())).device
    with torch.no_grad():
        probs = loaded.model.probabilities(sample["image"][None].to(device))
    return probs[0].float().cpu().numpy()


def run_ladder(cfg: DictConfig, base_overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Run every (init, protocol) arm of ``cfg.ladder`` as its own run and print the table; returns the summaries.

    Each arm is ``conf/classify.yaml`` composed with ``base_overrides`` plus ``init=...`` and ``protocol=...``, so
    it is exactly the run ``medseg classify <overrides> init=... protocol=...`` would make, in its own run folder.
    The arms share one feature cache, so kNN and the linear probe of one init encode each case once.
    """
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from medseg.classify_table import ladder_table
    from medseg.console import wide_console

    console = wide_console()
    summaries: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    kept = [o for o in base_overrides if not o.split("=")[0].lstrip("+~").startswith(("protocol", "init", "ladder"))]
    for init in cfg.ladder.inits:
        for protocol in cfg.ladder.protocols:
            overrides = [*kept, f"init={init}", f"protocol={protocol}", "ladder=null"]
            arm = compose("classify", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(arm)
            with_dir = OmegaConf.merge(arm, {"run_dir": str(arm.hydra.run.dir)})
            console.rule(f"ladder: init={init} protocol={protocol} -> {with_dir.run_dir}")
            train_classifier(with_dir)
            summaries[f"{init}/{protocol}"] = json.loads((Path(with_dir.run_dir) / "summary.json").read_text())
    console.print(ladder_table(summaries))
    console.print(f"ladder: {time.perf_counter() - started:.0f} s in total")
    return summaries


def main() -> float | None:
    """Hydra entry point (``python -m medseg.classify``); ``medseg classify`` should call it with the overrides."""
    import hydra

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="classify")
    def _main(cfg: DictConfig) -> float | None:
        if cfg.get("ladder"):
            from hydra.core.hydra_config import HydraConfig

            run_ladder(cfg, list(HydraConfig.get().overrides.task))
            return None
        metrics = train_classifier(cfg)
        wanted = cfg.get("optimized_metric")
        return metrics.get(wanted) if wanted else None

    return _main()


if __name__ == "__main__":
    main()
