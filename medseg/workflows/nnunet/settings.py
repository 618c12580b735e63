"""What an nnU-Net arm is asked to do: ``cfg.nnunet`` and the run's step budget, checked before anything runs.

The settings are read from the composed config once, in the parent process, and handed to nnU-Net's process as
plain JSON (:meth:`NnunetSettings.to_json`), so that the worker needs neither Hydra nor the config and a bad value
fails here in one line that names the field, not as a traceback from inside nnU-Net after minutes of preprocessing.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from medseg.errors import ConfigError

__all__ = ["MISSING_EXTRA", "NnunetSettings", "require_nnunet", "resolve_device"]

MISSING_EXTRA = "nnU-Net arms need the nnunet extra: pip install 'medseg[nnunet]'"
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")


def require_nnunet() -> None:
    """Fail in one line when ``nnunetv2`` is not installed: the arm is an optional extra, not a dependency."""
    if importlib.util.find_spec("nnunetv2") is None:
        raise ConfigError(MISSING_EXTRA)


def resolve_device(accelerator: Any) -> str:
    """The torch device nnU-Net trains on, from Lightning's ``trainer.accelerator`` (``auto``: CUDA when present)."""
    name = str(accelerator or "auto").lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={name} but no CUDA device is visible: use trainer=cpu.")
        return "cuda"
    if name in ("cpu", "mps"):
        return name
    raise ConfigError(f"trainer.accelerator={accelerator!r}: nnU-Net arms run on cpu, gpu/cuda, mps or auto.")


def _whole(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field}={value!r} must be a whole number >= {minimum}.")
    return value


def _optional_whole(value: Any, field: str) -> int | None:
    return None if value is None else _whole(value, field, 0)


def _optional_bool(value: Any, field: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} must be true, false or null (null: nnU-Net's default).")
    return value


@dataclass(frozen=True)
class NnunetSettings:
    """One nnU-Net arm, as :mod:`medseg.workflows.nnunet.worker` runs it.

    Attributes:
        configuration: nnU-Net's configuration (``2d``, ``3d_fullres``, ``3d_lowres``), planned by nnU-Net itself.
        planner: nnU-Net's experiment planner class (``ExperimentPlanner``, or a ResEnc preset such as
            ``nnUNetPlannerResEncM``).
        max_steps: training iterations (= optimisation steps), ``trainer.max_steps`` of the run.
        iterations_per_epoch: nnU-Net's epoch length (250 by default); the last epoch is shortened to the budget.
        val_iterations_per_epoch: nnU-Net's validation batches per full epoch (50); scaled down for a short epoch.
        lr: initial learning rate, or ``None`` for nnU-Net's own 1e-2 (SGD, Nesterov, momentum 0.99).
        device: ``cpu``, ``cuda`` or ``mps``.
        seed: seeds Python, NumPy and torch in nnU-Net's process (nnU-Net itself is not deterministic).
        num_processes: workers of fingerprint extraction and preprocessing.
        da_processes: data-augmentation workers (``nnUNet_n_proc_DA``; 0: in the main process; ``None``: nnU-Net's).
        compile: ``torch.compile`` on CUDA (``nnUNet_compile``; ``None``: nnU-Net's default, on).
        use_mirroring: nnU-Net's test-time mirroring.
        tile_step_size: sliding-window step of nnU-Net's predictor, as a fraction of the patch.
    """

    configuration: str
    planner: str
    max_steps: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    lr: float | None
    device: str
    seed: int
    num_processes: int
    da_processes: int | None
    compile: bool | None
    use_mirroring: bool
    tile_step_size: float

    @classmethod
    def from_config(cls, cfg: DictConfig) -> NnunetSettings:
        """Read ``cfg.nnunet``, ``cfg.trainer`` and ``cfg.seed``.

        Raises:
            ConfigError: a value nnU-Net would reject or that would not train (the field and the fix are named).
        """
        node = OmegaConf.to_container(cfg.nnunet, resolve=True)
        if not isinstance(node, dict):
            raise ConfigError(f"nnunet={node!r} must be a mapping: select it with +nnunet=2d or +nnunet=3d_fullres.")
        known = {f for f in cls.__dataclass_fields__} - {"max_steps", "device", "seed"}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ConfigError(f"nnunet has unknown keys {unknown}; the keys are {sorted(known)}.")
        configuration = str(node.get("configuration"))
        if configuration not in CONFIGURATIONS:
            raise ConfigError(f"nnunet.configuration={configuration!r} must be one of {CONFIGURATIONS}.")
        steps = cfg.trainer.get("max_steps", -1)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(
                f"trainer.max_steps={steps!r}: an nnU-Net arm trains a number of iterations, give a whole number >= 1."
            )
        lr = node.get("lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0):
            raise ConfigError(f"nnunet.lr={lr!r} must be a positive number, or null for nnU-Net's own 1e-2.")
        step = node.get("tile_step_size", 0.5)
        if isinstance(step, bool) or not isinstance(step, int | float) or not 0 < step <= 1:
            raise ConfigError(f"nnunet.tile_step_size={step!r} must be in (0, 1] (nnU-Net's default: 0.5).")
        mirroring = _optional_bool(node.get("use_mirroring", True), "nnunet.use_mirroring")
        return cls(
            configuration=configuration,
            planner=str(node.get("planner") or "ExperimentPlanner"),
            max_steps=steps,
            iterations_per_epoch=_whole(node.get("iterations_per_epoch", 250), "nnunet.iterations_per_epoch", 1),
            val_iterations_per_epoch=_whole(
                node.get("val_iterations_per_epoch", 50), "nnunet.val_iterations_per_epoch", 1
            ),
            lr=None if lr is None else float(lr),
            device=resolve_device(cfg.trainer.get("accelerator", "auto")),
            seed=int(cfg.get("seed", 0)),
            num_processes=_whole(node.get("num_processes", 2), "nnunet.num_processes", 1),
            da_processes=_optional_whole(node.get("da_processes"), "nnunet.da_processes"),
            compile=_optional_bool(node.get("compile"), "nnunet.compile"),
            use_mirroring=True if mirroring is None else mirroring,
            tile_step_size=float(step),
        )

    def epochs(self) -> int:
        """nnU-Net epochs the budget spans (the last one possibly shorter)."""
        return -(-self.max_steps // self.iterations_per_epoch)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NnunetSettings:
        return cls(**data)
