"""SAM ViT-B/L/H image encoders (``segment_anything``) behind the :class:`~medseg.backbones.base.Backbone` contract.

The modules are ``segment_anything``'s own classes, built with exactly the hyperparameters of its ``build_sam.py``,
so the official ``sam_vit_*.pth`` files (full SAM state dicts: ``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``) load strictly. Promptable models get the prompt encoder and mask decoder with their pretrained
weights from :func:`build_sam_components`, and run them with :func:`decode_masks`.

Input size. SAM was pretrained at 1024 x 1024 pixels. ``img_size`` builds the encoder for another side length (e.g.
256 for CT slices): the absolute position embedding and the relative position tables of the global-attention blocks
are then resized once, when the checkpoint is loaded (:func:`adapt_sam_state_dict`). Independently of that, any input
whose sides are multiples of 16 runs: the absolute position embedding is interpolated on the fly, and
``segment_anything``'s ``get_rel_pos`` interpolates the relative position tables of the global blocks.

Attention. The encoder's attention modules are switched to :class:`~medseg.backbones.attention.FusedSamAttention`
(``attention="fused"``, the default): the same module with the same parameters, computed by
``scaled_dot_product_attention`` with the decomposed relative-position term as its additive mask.
``attention="reference"`` keeps ``segment_anything``'s code. Official files load strictly either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from medseg.backbones.attention import check_attention_mode, set_attention
from medseg.backbones.base import Backbone, BackboneOutput, InputSpec
from medseg.backbones.registry import BackboneEntry, get_entry, register_backbone
from medseg.backbones.weights import load_state_dict_strict, read_checkpoint, resolve_checkpoint, strip_prefixes

__all__ = [
    "SAM_ARCHS",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "SamBackbone",
    "SamComponents",
    "adapt_sam_state_dict",
    "build_sam_components",
    "decode_masks",
    "select_blocks",
]

SAM_URL_ROOT = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_PATCH_SIZE = 16
SAM_PROMPT_DIM = 256
SAM_IMAGE_SIZE = 1024
# Pixel statistics of SAM's preprocessing, on intensities in 0-255 (segment_anything/build_sam.py).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# The encoder hyperparameters of segment_anything/build_sam.py, with the official file of each size.
SAM_ARCHS: dict[str, dict[str, Any]] = {
    "sam_vit_b": {
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
        "global_attn_indexes": (2, 5, 8, 11),
        "filename": "sam_vit_b_01ec64.pth",
    },
    "sam_vit_l": {
        "embed_dim": 1024,
        "depth": 24,
        "num_heads": 16,
        "global_attn_indexes": (5, 11, 17, 23),
        "filename": "sam_vit_l_0b3195.pth",
    },
    "sam_vit_h": {
        "embed_dim": 1280,
        "depth": 32,
        "num_heads": 16,
        "global_attn_indexes": (7, 15, 23, 31),
        "filename": "sam_vit_h_4b8939.pth",
    },
}


class SamComponents(NamedTuple):
    """The three modules of a SAM-style model, with the state-dict prefixes of the official files."""

    image_encoder: nn.Module
    prompt_encoder: nn.Module
    mask_decoder: nn.Module


def _arch(name: str, arch: Mapping[str, Any] | None) -> dict[str, Any]:
    if name not in SAM_ARCHS:
        raise KeyError(f"{name!r} is not a SAM size; expected one of {sorted(SAM_ARCHS)}")
    config = {k: v for k, v in SAM_ARCHS[name].items() if k != "filename"}
    unknown = set(arch or {}) - set(config)
    if unknown:
        raise TypeError(f"unknown SAM architecture overrides {sorted(unknown)}; allowed: {sorted(config)}")
    config.update(arch or {})
    return config


def _build_modules(name: str, img_size: int, arch: Mapping[str, Any] | None) -> SamComponents:
    """SAM's ``_build_sam`` for one size, without loading anything (standard initialisation)."""
    if img_size % SAM_PATCH_SIZE:
        raise ValueError(f"img_size must be a multiple of {SAM_PATCH_SIZE} pixels, got {img_size}")
    config = _arch(name, arch)
    grid = img_size // SAM_PATCH_SIZE
    image_encoder = ImageEncoderViT(
        depth=config["depth"],
        embed_dim=config["embed_dim"],
        img_size=img_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=config["num_heads"],
        patch_size=SAM_PATCH_SIZE,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(config["global_attn_indexes"]),
        window_size=14,
        out_chans=SAM_PROMPT_DIM,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=SAM_PROMPT_DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=SAM_PROMPT_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=SAM_PROMPT_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return SamComponents(image_encoder, prompt_encoder, mask_decoder)


def resize_abs_pos(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize SAM's absolute position embedding ``(1, h, w, D)`` to ``grid`` tokens (rows, columns)."""
    if tuple(pos_embed.shape[1:3]) == tuple(grid):
        return pos_embed
    resized = F.interpolate(
        pos_embed.permute(0, 3, 1, 2).float(), size=grid, mode="bicubic", align_corners=False, antialias=False
    )
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resize a relative-position table ``(L, head_dim)`` as ``segment_anything.get_rel_pos`` does."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.float().t().unsqueeze(0), size=length, mode="linear")
    return resized.squeeze(0).t().to(table.dtype)


def adapt_sam_state_dict(state: Mapping[str, torch.Tensor], encoder: nn.Module, prefix: str = "") -> dict:
    """Resize the size-dependent tensors of an image-encoder state dict to ``encoder``'s input size.

    The official files are for 1024 x 1024 inputs: ``pos_embed`` is a 64 x 64 grid and the global blocks' ``rel_pos_h``
    and ``rel_pos_w`` tables have 127 rows. An encoder built for another ``img_size`` has the same keys with other
    shapes; everything else (the windowed blocks' 27-row tables included) is independent of the input size.

    Args:
        state: state dict whose encoder keys start with ``prefix``.
        encoder: the ``ImageEncoderViT`` the state is for.
        prefix: ``"image_encoder."`` for full SAM state dicts, ``""`` for encoder-only ones.
    """
    own = encoder.state_dict()
    out = dict(state)
    for key, target in own.items():
        full = prefix + key
        if full not in out or out[full].shape == target.shape:
            continue
        if key == "pos_embed" and out[full].ndim == 4:
            out[full] = resize_abs_pos(out[full], tuple(target.shape[1:3]))
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and out[full].shape[1:] == target.shape[1:]:
            out[full] = _resize_rel_pos(out[full], target.shape[0])
    return out


def build_sam_components(
    name: str,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    *,
    img_size: int | None = None,
    arch: Mapping[str, Any] | None = None,
    attention: str = "fused",
) -> SamComponents:
    """SAM's image encoder, prompt encoder and mask decoder, with their pretrained weights loaded strictly.

    The checkpoint is found as for :func:`~medseg.backbones.registry.create_backbone` (explicit path, then
    ``$MEDSEG_WEIGHTS/<official file name>``), and all three modules must match it exactly. For LiteMedSAM's
    TinyViT, prompt encoder and mask decoder use :func:`medseg.backbones.components.build_components`.

    Args:
        name: ``sam_vit_b``, ``sam_vit_l`` or ``sam_vit_h``.
        pretrained: ``False`` gives the same modules with standard initialisation (the scratch twin).
        checkpoint: explicit path of the official full-SAM file.
        img_size: side length in pixels the modules are built for (SAM: a multiple of 16, default 1024; LiteMedSAM:
            256 only).
        arch: overrides of :data:`SAM_ARCHS` entries (``depth``, ``embed_dim``, ``num_heads``,
            ``global_attn_indexes``), for tiny test models only; official files do not fit them.
        attention: ``fused`` (default) or ``reference`` attention in the image encoder (see the module docstring).
    """
    check_attention_mode(attention)
    entry = get_entry(name)
    if entry.family != "sam":
        raise ValueError(
            f"{name!r} is a {entry.family} backbone; build_sam_components builds sam_vit_b/l/h (LiteMedSAM and SAM "
            f"alike: medseg.backbones.components.build_components)."
        )
    components = _build_modules(name, img_size or SAM_IMAGE_SIZE, arch)
    set_attention(components.image_encoder, attention)
    if pretrained:
        path = resolve_checkpoint(entry, checkpoint)
        container = nn.ModuleDict(components._asdict())
        state = adapt_sam_state_dict(strip_prefixes(read_checkpoint(path)), components.image_encoder, "image_encoder.")
        load_state_dict_strict(container, state, path, f"the official full SAM file '{entry.filename}'")
    return components


class SamBackbone(Backbone):
    """SAM's ViT image encoder: ``features`` is the neck output ``(B, 256, H/16, W/16)``.

    Intermediates are the outputs of the requested transformer blocks, ``(B, D, H/16, W/16)`` with ``D`` the ViT
    width (768/1024/1280). SAM has no class token. Inputs are RGB-like images with intensities in 0-255, normalised
    with SAM's pixel mean and standard deviation (see :attr:`input_spec` and :meth:`Backbone.normalise`).

    Args:
        image_encoder: ``segment_anything``'s ``ImageEncoderViT``.
        attention: ``fused`` or ``reference`` to switch the encoder's attention; ``None`` keeps it as built.
        activation_checkpointing: ``none``, ``all`` or every ``k``-th block (see
            :meth:`~medseg.backbones.base.Backbone.set_activation_checkpointing`).
    """

    patch_size = SAM_PATCH_SIZE

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        name: str = "sam",
        in_channels: int = 1,
        channel_mode: str = "repeat",
        attention: str | None = None,
        activation_checkpointing: bool | int | str | None = "none",
    ) -> None:
        super().__init__(in_channels=in_channels, channel_mode=channel_mode, pretrained_in_chans=3)
        self.image_encoder = image_encoder
        self.name = name
        self.embed_dim = SAM_PROMPT_DIM
        self.block_dim = image_encoder.patch_embed.proj.out_channels
        self.num_blocks = len(image_encoder.blocks)
        image_size = image_encoder.img_size
        self.input_spec = InputSpec(
            image_size=image_size, in_chans=3, mean=SAM_PIXEL_MEAN, std=SAM_PIXEL_STD, value_range=(0.0, 255.0)
        )
        if attention is not None:
            self.set_attention(attention)
        self.set_activation_checkpointing(activation_checkpointing)

    def compute_blocks(self) -> tuple[list[nn.Module], list[nn.Module]]:
        return list(self.image_encoder.blocks), [self.image_encoder.neck]

    def forward_features(self, x: torch.Tensor, layers: Sequence[int] = ()) -> BackboneOutput:
        """Run SAM's encoder on ``(B, 3, H, W)`` with H and W multiples of 16 (pixels)."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"SAM input sides must be multiples of {self.patch_size} pixels, got {height}x{width}")
        wanted = select_blocks(layers, self.num_blocks)
        encoder = self.image_encoder
        runner = self.block_runner(x)
        x = encoder.patch_embed(x)  # (B, H/16, W/16, D)
        if encoder.pos_embed is not None:
            x = x + resize_abs_pos(encoder.pos_embed, (x.shape[1], x.shape[2]))
        found: dict[int, torch.Tensor] = {}
        for index, block in enumerate(encoder.blocks):
            x = runner(index, block, x)
            if index in wanted:
                found[index] = x.permute(0, 3, 1, 2)
        features = encoder.neck(x.permute(0, 3, 1, 2))
        return BackboneOutput(features=features, intermediates=[found[i] for i in wanted])


def select_blocks(layers: Sequence[int], num_blocks: int) -> list[int]:
    """Non-negative block indices for ``layers`` (negative ones count from the end), in the order requested."""
    out = []
    for layer in layers:
        index = layer + num_blocks if layer < 0 else layer
        if not 0 <= index < num_blocks:
            raise IndexError(f"block index {layer} out of range for a backbone with {num_blocks} blocks")
        out.append(index)
    return out


def decode_masks(
    prompt_encoder: nn.Module,
    mask_decoder: nn.Module,
    image_embeddings: torch.Tensor,
    boxes: torch.Tensor | None = None,
    points: tuple[torch.Tensor, torch.Tensor] | None = None,
    masks: torch.Tensor | None = None,
    multimask_output: bool = False,
    image_pe: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's prompt-to-mask path for a batch of images with one prompt set each.

    ``segment_anything``'s mask decoder repeats every image embedding once per prompt, so it is called image by image
    here; this keeps batch ``b`` of the prompts with image ``b`` for SAM and LiteMedSAM alike.

    Args:
        image_embeddings: ``(B, 256, h, w)`` backbone features.
        boxes: ``(B, 4)`` or ``(B, 1, 4)`` boxes ``x0, y0, x1, y1`` in pixels of the model input.
        points: ``(coords (B, N, 2) in pixels (x, y), labels (B, N))`` with SAM's labels (1 positive, 0 negative).
        masks: ``(B, 1, 4h, 4w)`` low-resolution mask logits from a previous step.
        image_pe: ``prompt_encoder.get_dense_pe()`` computed ahead (it depends on no input), or ``None``.

    Returns:
        ``(low_res_logits (B, M, 4h, 4w), iou_predictions (B, M))`` with ``M`` 1, or 3 with ``multimask_output``.
    """
    logits, ious = [], []
    dense_pe = prompt_encoder.get_dense_pe() if image_pe is None else image_pe
    for b in range(image_embeddings.shape[0]):
        box = None if boxes is None else boxes[b].reshape(1, -1, 4)
        point = None if points is None else (points[0][b : b + 1], points[1][b : b + 1])
        mask = None if masks is None else masks[b : b + 1]
        sparse, dense = prompt_encoder(points=point, boxes=box, masks=mask)
        low_res, iou = mask_decoder(
            image_embeddings=image_embeddings[b : b + 1],
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        logits.append(low_res)
        ious.append(iou)
    return torch.cat(logits), torch.cat(ious)


def _make_builder(name: str):
    def build(
        checkpoint: Path | None,
        in_channels: int = 1,
        channel_mode: str = "repeat",
        img_size: int = SAM_IMAGE_SIZE,
        arch: Mapping[str, Any] | None = None,
        attention: str = "fused",
        activation_checkpointing: bool | int | str | None = "none",
    ) -> SamBackbone:
        """Build the ``name`` encoder; ``checkpoint=None`` is the scratch twin."""
        check_attention_mode(attention)
        encoder = _build_modules(name, img_size, arch).image_encoder
        if checkpoint is not None:
            state = strip_prefixes(read_checkpoint(checkpoint))
            if any(k.startswith("image_encoder.") for k in state):
                state = {k[len("image_encoder.") :]: v for k, v in state.items() if k.startswith("image_encoder.")}
            state = adapt_sam_state_dict(state, encoder)
            filename = SAM_ARCHS[name]["filename"]
            load_state_dict_strict(encoder, state, checkpoint, f"the official SAM file '{filename}'")
        return SamBackbone(
            encoder, name=name, in_channels=in_channels, channel_mode=channel_mode, attention=attention,
            activation_checkpointing=activation_checkpointing,
        )  # fmt: skip

    build.__name__ = f"build_{name}"
    return build


for _name, _config in SAM_ARCHS.items():
    register_backbone(
        BackboneEntry(
            name=_name,
            family="sam",
            builder=_make_builder(_name),
            filename=_config["filename"],
            url=SAM_URL_ROOT + _config["filename"],
        )
    )
