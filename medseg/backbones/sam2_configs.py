"""The SAM 2 models medseg knows, and their networks built from the ``sam2`` package's own Hydra configs.

Every network is instantiated from the YAML file that ships inside ``sam2`` (``configs/sam2.1/sam2.1_hiera_*.yaml``,
the files ``sam2.build_sam.build_sam2`` composes), with ``hydra.utils.instantiate``, so the modules, their
hyperparameters and their parameter names are exactly the reference ones and the official ``sam2.1_hiera_*.pt`` files
load strictly. Three settings are applied on top, as the official code applies them:

* ``image_size``: the side length the prompt encoder and mask decoder are built for (SAM 2.1: 1024 px). The memory
  attention's rotary position tables follow it (``feat_sizes = image_size / 16``), which is what MedSAM2's
  ``sam2.1_hiera_t512.yaml`` does for its 512 px model: MedSAM2 is SAM 2.1 Hiera-T with only the input size changed
  (bowang-lab/MedSAM2 issue 21), so its checkpoint has the same keys as ``sam2.1_hiera_tiny.pt``.
* ``postprocessing``: the three ``sam_mask_decoder_extra_args`` that ``build_sam2`` adds for inference by default
  (fall back to the best of the multimask outputs when the single mask is unstable); they hold no weights.
* ``arch``: overrides of the Hiera trunk for tiny test models (the neck's channel list follows); official files do
  not fit them.

The ``sam2`` package is an optional extra (it builds from source, see :data:`MISSING_EXTRA`). Importing it has one
side effect that medseg must undo: its ``__init__`` initialises Hydra's global state with its own config module when
nothing else has, after which any later ``hydra.initialize_config_dir`` in the same process (``medseg.launch``, the
benchmark, tests) fails with "GlobalHydra is already initialized". :func:`require_sam2` imports it and clears that
state again; medseg never composes ``sam2``'s configs through Hydra's search path, it reads the files directly.
"""

from __future__ import annotations

import importlib
import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from medseg.errors import ConfigError

__all__ = [
    "ARCH_KEYS",
    "MISSING_EXTRA",
    "SAM2_ALIASES",
    "SAM2_MODELS",
    "Sam2Model",
    "build_sam2_image_encoder",
    "build_sam2_model",
    "require_sam2",
    "sam2_model_config",
]

MISSING_EXTRA = (
    "SAM 2 backbones need the sam2 extra: SAM2_BUILD_CUDA=0 pip install --no-build-isolation 'sam2==1.1.0' "
    "(or medseg[sam2]; it builds from source against the installed torch)"
)
SAM2_URL_ROOT = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
MEDSAM2_URL = "https://huggingface.co/wanglab/MedSAM2 (MedSAM2_latest.pt)"
#: Input sides must be multiples of the trunk's total stride; SAM 2's hidden dimension of the prompt path.
SAM2_PROMPT_DIM = 256
SAM2_FEATURE_STRIDE = 16
#: Hiera trunk arguments a test may override (``arch=``); the neck's ``backbone_channel_list`` follows them.
ARCH_KEYS = (
    "embed_dim",
    "num_heads",
    "stages",
    "global_att_blocks",
    "window_spec",
    "window_pos_embed_bkg_spatial_size",
)
_POSTPROCESSING = {
    "dynamic_multimask_via_stability": True,
    "dynamic_multimask_stability_delta": 0.05,
    "dynamic_multimask_stability_thresh": 0.98,
}


@dataclass(frozen=True)
class Sam2Model:
    """One registered SAM 2 model.

    Attributes:
        name: registry name.
        config: the model's YAML file inside the ``sam2`` package.
        filename: the official checkpoint file users download (``{"model": state_dict}`` of ``SAM2Base``).
        url: where to get it.
        image_size: side length in pixels the model was trained at.
    """

    name: str
    config: str
    filename: str
    url: str
    image_size: int


def _official(name: str, size: str, filename: str) -> Sam2Model:
    config = f"configs/sam2.1/sam2.1_hiera_{size}.yaml"
    return Sam2Model(name, config, filename, SAM2_URL_ROOT + filename, 1024)


SAM2_MODELS: dict[str, Sam2Model] = {
    "sam2_hiera_t": _official("sam2_hiera_t", "t", "sam2.1_hiera_tiny.pt"),
    "sam2_hiera_s": _official("sam2_hiera_s", "s", "sam2.1_hiera_small.pt"),
    "sam2_hiera_b_plus": _official("sam2_hiera_b_plus", "b+", "sam2.1_hiera_base_plus.pt"),
    "sam2_hiera_l": _official("sam2_hiera_l", "l", "sam2.1_hiera_large.pt"),
    # MedSAM2 (Ma et al. 2025): SAM 2.1 Hiera-T fine-tuned on 3-D medical images at 512 x 512 pixels.
    "medsam2": Sam2Model("medsam2", "configs/sam2.1/sam2.1_hiera_t.yaml", "MedSAM2_latest.pt", MEDSAM2_URL, 512),
}
#: Official spellings that are awkward in Hydra overrides and file names, and the registry name they stand for.
SAM2_ALIASES = {"sam2_hiera_b+": "sam2_hiera_b_plus"}


def require_sam2() -> None:
    """Import ``sam2`` (once), undoing its Hydra initialisation; a one-line error when the extra is missing.

    Raises:
        ConfigError: ``sam2`` is not installed (:data:`MISSING_EXTRA`).
    """
    from hydra.core.global_hydra import GlobalHydra  # lazy: Hydra (~0.7 s) stays out of `import medseg.backbones`

    before = GlobalHydra.instance().is_initialized()
    try:
        importlib.import_module("sam2")
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] == "sam2":
            raise ConfigError(MISSING_EXTRA) from None
        raise
    finally:
        if not before and GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()


def _model(name: str) -> Sam2Model:
    name = SAM2_ALIASES.get(name, name)
    if name not in SAM2_MODELS:
        raise ConfigError(f"{name!r} is not a SAM 2 model; expected one of {', '.join(sorted(SAM2_MODELS))}.")
    return SAM2_MODELS[name]


def _check_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if unknown:
        raise ConfigError(f"unknown SAM 2 architecture overrides {unknown}; allowed: {', '.join(ARCH_KEYS)}.")
    arch = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in arch.items()}
    if "stages" in arch and len(arch["stages"]) != 4:
        raise ConfigError(f"arch.stages must list 4 stages (SAM 2's FPN neck has 4 levels), got {arch['stages']}.")
    return arch


def sam2_model_config(
    name: str, img_size: int | None = None, arch: Mapping[str, Any] | None = None, postprocessing: bool = True
) -> Any:
    """The ``model`` node of ``name``'s YAML in the ``sam2`` package, with medseg's settings (module docstring).

    Args:
        name: a key of :data:`SAM2_MODELS` or an alias.
        img_size: side in pixels (a multiple of 32); ``None``: the model's own (1024; MedSAM2 512).
        arch: Hiera trunk overrides (:data:`ARCH_KEYS`), tiny test models only.
        postprocessing: add ``build_sam2``'s inference-time mask-decoder settings.

    Returns:
        An OmegaConf ``DictConfig`` with ``_target_`` entries, ready for ``hydra.utils.instantiate``.
    """
    from omegaconf import OmegaConf  # lazy: OmegaConf stays out of `import medseg.backbones`

    require_sam2()
    model = _model(name)
    size = model.image_size if img_size is None else int(img_size)
    if size <= 0 or size % 32:
        raise ConfigError(
            f"SAM 2 img_size must be a positive multiple of 32 pixels (Hiera's stride), got {img_size}; "
            f"set backbone.img_size (the model's own size is {model.image_size})."
        )
    with importlib.resources.as_file(importlib.resources.files("sam2").joinpath(model.config)) as path:
        cfg = OmegaConf.load(path).model
    cfg.image_size = size
    layer = cfg.memory_attention.layer
    layer.self_attention.feat_sizes = [size // SAM2_FEATURE_STRIDE] * 2
    layer.cross_attention.feat_sizes = [size // SAM2_FEATURE_STRIDE] * 2
    if arch:
        trunk = cfg.image_encoder.trunk
        for key, value in _check_arch(arch).items():
            trunk[key] = value
        embed = int(trunk.embed_dim)
        cfg.image_encoder.neck.backbone_channel_list = [embed * 2**i for i in range(3, -1, -1)]
    if postprocessing:
        cfg.sam_mask_decoder_extra_args = dict(_POSTPROCESSING)
    return cfg


def build_sam2_image_encoder(
    name: str, img_size: int | None = None, arch: Mapping[str, Any] | None = None
) -> nn.Module:
    """``sam2``'s ``ImageEncoder`` (Hiera trunk + FPN neck) of ``name``, with standard initialisation."""
    from hydra.utils import instantiate  # lazy: Hydra (~0.7 s) stays out of `import medseg.backbones`

    return instantiate(sam2_model_config(name, img_size, arch).image_encoder, _recursive_=True)


def build_sam2_model(
    name: str, img_size: int | None = None, arch: Mapping[str, Any] | None = None, postprocessing: bool = True
) -> nn.Module:
    """The whole ``SAM2Base`` of ``name`` (encoder, memory attention and encoder, prompt encoder, mask decoder)."""
    from hydra.utils import instantiate  # lazy: Hydra (~0.7 s) stays out of `import medseg.backbones`

    return instantiate(sam2_model_config(name, img_size, arch, postprocessing), _recursive_=True)
