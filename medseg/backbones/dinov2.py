"""DINOv2 backbones (``dinov2_vit{s,b,l,g}14`` and their 4-register ``_reg`` variants) on timm's architectures.

Weights are the official facebookresearch hub files (``dinov2_vitb14_pretrain.pth``,
``dinov2_vitb14_reg4_pretrain.pth``, ... under https://dl.fbaipublicfiles.com/dinov2/), a flat state dict in the
layout of the official ``DinoVisionTransformer``; :func:`convert_dinov2_checkpoint` maps it onto timm's
``vit_*_patch14_dinov2`` / ``vit_*_patch14_reg4_dinov2`` modules.

Input convention (:data:`DINOV2_INPUT_SPEC`): RGB in ``[0, 1]`` normalised with the ImageNet mean/std, at 518 px.
518 (a 37 x 37 patch grid) is where the released position embeddings live: DINOv2 ends its pretraining with a short
high-resolution phase, and at 518 no interpolation is needed. Other sizes work when they are multiples of 14 px
(224 is the official linear-evaluation size, 504 or 532 rather than 512); the embeddings are then resampled at every
forward exactly as the official model does (bicubic, no antialiasing, scale factor ``(grid + 0.1) / 37``), which
timm's ``dynamic_img_size`` does not reproduce. ``img_size=`` only changes the advertised ``input_spec.image_size``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from medseg.backbones.base import InputSpec
from medseg.backbones.registry import BackboneEntry, register_backbone
from medseg.backbones.vit import PosEmbedResize, TimmViTBackbone, build_vit_backbone

__all__ = [
    "DINOV2_INPUT_SPEC",
    "DINOV2_POS_RESIZE",
    "DINOV2_URL_ROOT",
    "build_dinov2",
    "convert_dinov2_checkpoint",
]

DINOV2_URL_ROOT = "https://dl.fbaipublicfiles.com/dinov2"
DINOV2_INPUT_SPEC = InputSpec(image_size=518, in_chans=3, value_range=(0.0, 1.0))
#: Official ``DinoVisionTransformer.interpolate_pos_encoding`` with the hub defaults
#: ``interpolate_antialias=False, interpolate_offset=0.1``.
DINOV2_POS_RESIZE = PosEmbedResize(mode="bicubic", antialias=False, offset=0.1)

# registry name -> (official architecture tag, timm architecture). "_reg" names use the "_reg4" files.
_VARIANTS = {
    "dinov2_vits14": ("vits14", "vit_small_patch14_dinov2"),
    "dinov2_vitb14": ("vitb14", "vit_base_patch14_dinov2"),
    "dinov2_vitl14": ("vitl14", "vit_large_patch14_dinov2"),
    "dinov2_vitg14": ("vitg14", "vit_giant_patch14_dinov2"),
    "dinov2_vits14_reg": ("vits14", "vit_small_patch14_reg4_dinov2"),
    "dinov2_vitb14_reg": ("vitb14", "vit_base_patch14_reg4_dinov2"),
    "dinov2_vitl14_reg": ("vitl14", "vit_large_patch14_reg4_dinov2"),
    "dinov2_vitg14_reg": ("vitg14", "vit_giant_patch14_reg4_dinov2"),
}

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def convert_dinov2_checkpoint(state: Mapping[str, torch.Tensor], vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """Map an official DINOv2 state dict onto timm's module names; the one place where the layouts meet.

    ======================================  ========================================================================
    official key                            timm key
    ======================================  ========================================================================
    ``blocks.C.N.*`` (``block_chunks>0``)   ``blocks.N.*`` (chunk index dropped; N is already the global index)
    ``blocks.N.mlp.w12.*`` / ``w3.*``       ``blocks.N.mlp.fc1.*`` / ``fc2.*`` (ViT-g SwiGLU; same ``x1, x2``
                                            chunk order as timm's ``SwiGLUPacked``)
    ``register_tokens``                     ``reg_token``
    ``cls_token`` (register models)         ``cls_token + pos_embed[:, :1]``: timm builds register models with
                                            ``no_embed_class``, so the class position is folded into the token
    ``pos_embed`` (register models)         ``pos_embed[:, 1:]``
    ``mask_token``                          dropped: it only replaces masked patches in iBOT pretraining and is
                                            never used when encoding an image
    anything else                           unchanged (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
                                            ``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``mlp.fc1``...)
    ======================================  ========================================================================

    This reproduces ``timm.models.vision_transformer._convert_dinov2`` (checked in the tests) and adds the chunked
    block keys of checkpoints saved with FSDP block chunks.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        key = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)
        key = "reg_token" if key == "register_tokens" else key
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value
    pos = out.get("pos_embed")
    if vit.no_embed_class and pos is not None and "cls_token" in out and pos.shape[1] == vit.pos_embed.shape[1] + 1:
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def build_dinov2(checkpoint: Path | None, **kwargs) -> TimmViTBackbone:
    """Build a DINOv2 backbone; the registry binds ``timm_name`` and ``filename`` for each name.

    The scratch twin keeps timm's initialisation with LayerScale at 1e-5, as in DINOv2 training. ``img_size``
    defaults to 518 (the 37x37 grid of the released position embeddings); ``intermediate_norm=True`` matches the
    official ``get_intermediate_layers(norm=True)``. Other options: :func:`~medseg.backbones.vit.build_vit_backbone`.
    """
    return build_vit_backbone(
        checkpoint, family="DINOv2", input_spec=DINOV2_INPUT_SPEC, pos_resize=DINOV2_POS_RESIZE,
        convert=convert_dinov2_checkpoint, **kwargs,
    )  # fmt: skip


def _register() -> None:
    for name, (tag, timm_name) in _VARIANTS.items():
        filename = f"dinov2_{tag}{'_reg4' if name.endswith('_reg') else ''}_pretrain.pth"
        builder = functools.partial(build_dinov2, timm_name=timm_name, filename=filename)
        url = f"{DINOV2_URL_ROOT}/dinov2_{tag}/{filename}"
        register_backbone(BackboneEntry(name=name, family="dinov2", builder=builder, filename=filename, url=url))


_register()
