"""MAE backbones (``mae_vit_base``, ``mae_vit_large``, ``mae_vit_huge``: patch 16, 16, 14 px) on timm's ViTs.

Weights are the official pretraining files ``mae_pretrain_vit_{base,large,huge}.pth`` from
https://dl.fbaipublicfiles.com/mae/pretrain/, each ``{"model": state_dict}`` in the timm-0.3.2 ``VisionTransformer``
layout that the MAE repository builds on, which current timm reproduces key for key (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``). The pretraining
encoder ends with ``norm`` (the fine-tuned files replace it by ``fc_norm`` and a ``head``, and are rejected).

Input convention (:data:`MAE_INPUT_SPEC`): RGB in ``[0, 1]`` normalised with the ImageNet mean/std, at 224 px.
Other sizes work when they are multiples of the patch size: the position embeddings are resampled to the patch grid
as MAE's own fine-tuning code does (``util/pos_embed.interpolate_pos_embed``: bicubic to the exact size, no
antialiasing), here at every forward and for non-square grids as well.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from medseg.backbones.base import InputSpec
from medseg.backbones.registry import BackboneEntry, register_backbone
from medseg.backbones.vit import PosEmbedResize, TimmViTBackbone, build_vit_backbone

__all__ = [
    "MAE_DROPPED_KEYS",
    "MAE_INPUT_SPEC",
    "MAE_POS_RESIZE",
    "MAE_URL_ROOT",
    "build_mae",
    "convert_mae_checkpoint",
]

MAE_URL_ROOT = "https://dl.fbaipublicfiles.com/mae/pretrain"
MAE_INPUT_SPEC = InputSpec(image_size=224, in_chans=3, value_range=(0.0, 1.0))
MAE_POS_RESIZE = PosEmbedResize(mode="bicubic", antialias=False, offset=0.0)
#: Keys of a full MAE pretraining state dict that belong to the reconstruction decoder (prefix match).
MAE_DROPPED_KEYS = ("mask_token", "decoder_")

# registry name -> timm architecture with the official MAE encoder hyperparameters
_VARIANTS = {
    "mae_vit_base": "vit_base_patch16_224",
    "mae_vit_large": "vit_large_patch16_224",
    "mae_vit_huge": "vit_huge_patch14_224",
}


def convert_mae_checkpoint(state: Mapping[str, torch.Tensor], vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """Keep the encoder of an official MAE state dict; the encoder keys already carry timm's names.

    Legitimately dropped: ``mask_token`` and every ``decoder_*`` key (``decoder_embed``, ``decoder_pos_embed``,
    ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``). They exist only in full pretraining states (the
    ``mae_visualize_*`` files, or a checkpoint of ``main_pretrain.py``) and serve pixel reconstruction, not encoding.
    Everything else is loaded strictly: a missing or extra encoder key, e.g. the ``fc_norm``/``head`` of a
    fine-tuned file or the ``ls1.gamma`` of a DINOv2 file, is an error. ``pos_embed`` is the fixed 2-D sin-cos
    table MAE stores as a (frozen) parameter; it is loaded as is and, as in MAE fine-tuning, trainable afterwards.
    """
    del vit  # same signature as the other families' converters; MAE needs no architecture-dependent mapping
    return {k: v for k, v in state.items() if not k.startswith(MAE_DROPPED_KEYS)}


def build_mae(checkpoint: Path | None, **kwargs) -> TimmViTBackbone:
    """Build an MAE encoder backbone; the registry binds ``timm_name`` and ``filename`` for each name.

    The scratch twin keeps timm's standard ViT initialisation with learned position embeddings; ``img_size``
    defaults to 224. Other options: :func:`~medseg.backbones.vit.build_vit_backbone`.
    """
    return build_vit_backbone(
        checkpoint, family="MAE", input_spec=MAE_INPUT_SPEC, pos_resize=MAE_POS_RESIZE,
        convert=convert_mae_checkpoint, **kwargs,
    )  # fmt: skip


def _register() -> None:
    for name, timm_name in _VARIANTS.items():
        filename = f"mae_pretrain_{name.removeprefix('mae_')}.pth"
        builder = functools.partial(build_mae, timm_name=timm_name, filename=filename)
        url = f"{MAE_URL_ROOT}/{filename}"
        register_backbone(BackboneEntry(name=name, family="mae", builder=builder, filename=filename, url=url))


_register()
