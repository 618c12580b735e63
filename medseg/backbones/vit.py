"""A timm ``VisionTransformer`` behind the :class:`~medseg.backbones.base.Backbone` interface (DINOv2 and MAE).

Both families are plain ViTs that timm already implements with the official parameter layout, so the architecture is
never re-written here: :func:`build_timm_vit` asks timm for it (``pretrained=False``: nothing is ever downloaded) and
:class:`TimmViTBackbone` only drives its sub-modules, for two reasons timm's own forward does not cover:

* **Position embeddings at other input sizes follow the family's official code**, not timm's. timm's
  ``dynamic_img_size`` resamples with ``antialias=True`` and an exact output size; official DINOv2 resamples with
  ``antialias=False`` and a scale factor of ``(grid + 0.1) / M`` (a historical offset kept for compatibility), and
  the MAE fine-tuning code resamples to an exact size without antialiasing. The difference is far above float noise
  (see ``tests/backbones/test_dinov2.py``), so :class:`PosEmbedResize` records each family's rule and the embeddings
  stay at the checkpoint's grid, resampled at every forward as the official DINOv2 model does.
* **Every output the decoders need comes from one pass**: the final normalised feature map, the raw outputs of any
  blocks (UNETR-style skips), and the CLS token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medseg.backbones.attention import check_attention_mode
from medseg.backbones.base import Backbone, BackboneOutput, InputSpec
from medseg.backbones.weights import load_state_dict_strict, read_checkpoint, strip_prefixes
from medseg.errors import InputShapeError, WeightsError

__all__ = [
    "InputShapeError",
    "PosEmbedResize",
    "TimmViTBackbone",
    "build_timm_vit",
    "build_vit_backbone",
    "guess_checkpoint_family",
    "load_vit_checkpoint",
    "resize_pos_embed",
]


@dataclass(frozen=True)
class PosEmbedResize:
    """How a family's official code resamples patch position embeddings to another grid.

    Attributes:
        mode: ``torch.nn.functional.interpolate`` mode (both families: ``"bicubic"``, ``align_corners=False``).
        antialias: low-pass filter when shrinking the grid (both official codes: ``False``).
        offset: in grid cells. ``0`` interpolates to the exact target size (MAE's ``interpolate_pos_embed``);
            ``> 0`` passes ``scale_factor=((h + offset) / M, (w + offset) / N)`` instead, as official DINOv2 does
            with ``offset=0.1``, which shifts the sampling positions slightly.
    """

    mode: str = "bicubic"
    antialias: bool = False
    offset: float = 0.0


def resize_pos_embed(
    pos_embed: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int], how: PosEmbedResize
) -> torch.Tensor:
    """Resample patch position embeddings ``(1, M*N, D)`` on an ``(M, N)`` grid to ``(1, h*w, D)`` on ``(h, w)``.

    The grid is returned unchanged when it already matches, as in both official codes. Computation is in float32
    (DINOv2 does the same) and the result has the input's dtype.
    """
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed
    (m, n), (h, w) = src_grid, dst_grid
    dim = pos_embed.shape[-1]
    grid = pos_embed.float().reshape(1, m, n, dim).permute(0, 3, 1, 2)
    scale = ((h + how.offset) / m, (w + how.offset) / n)
    target = {"scale_factor": scale} if how.offset else {"size": (h, w)}
    grid = F.interpolate(grid, mode=how.mode, align_corners=False, antialias=how.antialias, **target)
    if tuple(grid.shape[-2:]) != (h, w):  # a scale-factor rounding surprise must not pass silently
        raise RuntimeError(f"position embeddings resampled to {tuple(grid.shape[-2:])}, expected {(h, w)}")
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)


def build_timm_vit(timm_name: str, img_size: int, arch: Mapping | None = None) -> VisionTransformer:
    """Build timm architecture ``timm_name`` with standard random initialisation and no classifier head.

    Args:
        timm_name: a timm model name, e.g. ``"vit_small_patch14_dinov2"``; it fixes the official hyperparameters.
        img_size: side in pixels of the position-embedding grid, i.e. the checkpoint's grid times the patch size.
        arch: extra ``timm.create_model`` keyword arguments that replace the official ones (``depth``,
            ``embed_dim``, ``num_heads``, ``img_size``...). Meant for tests and ablations; a pretrained checkpoint
            only loads into the architecture it was trained with.
    """
    kwargs: dict = {"img_size": img_size, "num_classes": 0, "global_pool": "", "dynamic_img_size": True}
    kwargs.update(arch or {})
    return timm.create_model(timm_name, pretrained=False, **kwargs)


def guess_checkpoint_family(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name the model a state dict most likely belongs to, for error messages (``None`` when unsure)."""
    keys = set(state)
    if any(k.startswith("image_encoder.") for k in keys) or any(k.startswith("prompt_encoder.") for k in keys):
        return "SAM-style (image_encoder/prompt_encoder)"
    if "register_tokens" in keys or any(".ls1.gamma" in k or ".mlp.w12." in k for k in keys):
        return "DINOv2"
    if any(k.startswith("decoder_") for k in keys):
        return "MAE pretraining (encoder + decoder)"
    if "cls_token" in keys and "pos_embed" in keys and any(k.startswith("blocks.") for k in keys):
        return "plain ViT (MAE/timm layout)"
    return None


def load_vit_checkpoint(
    vit: VisionTransformer,
    path: str | Path,
    convert: Callable[[dict[str, torch.Tensor], VisionTransformer], dict[str, torch.Tensor]],
    expected: str,
) -> None:
    """Read an official checkpoint, map its keys with the family's ``convert`` and load it strictly into ``vit``.

    A mismatch raises :class:`~medseg.errors.WeightsError` naming the file, the keys at fault and, when it can be
    told, which model family the file actually belongs to.
    """
    state = strip_prefixes(read_checkpoint(path))
    try:
        load_state_dict_strict(vit, convert(dict(state), vit), source=path, expected=expected)
    except WeightsError as err:
        family = guess_checkpoint_family(state)
        hint = f" The file looks like a {family} checkpoint." if family else ""
        raise WeightsError(f"{err}{hint}") from err


class TimmViTBackbone(Backbone):
    """A timm ViT with class token (and optional register tokens) as a medseg backbone.

    Attributes:
        vit: the timm ``VisionTransformer``; its parameter names are those of the official checkpoints after the
            family's key mapping.
        pos_resize: the family's rule for inputs whose patch grid differs from the checkpoint's.
        intermediate_norm: apply the final norm to returned intermediates as well (DINOv2's
            ``get_intermediate_layers(norm=True)``); by default they are raw block outputs.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        input_spec: InputSpec,
        pos_resize: PosEmbedResize,
        in_channels: int = 1,
        channel_mode: str = "repeat",
        intermediate_norm: bool = False,
        attention: str | None = None,
        activation_checkpointing: bool | int | str | None = "none",
    ) -> None:
        super().__init__(in_channels=in_channels, channel_mode=channel_mode, pretrained_in_chans=input_spec.in_chans)
        if vit.cls_token is None or vit.pos_embed is None:
            raise ValueError("TimmViTBackbone needs a ViT with a class token and absolute position embeddings")
        self.vit = vit
        self.pos_resize = pos_resize
        self.intermediate_norm = intermediate_norm
        self.input_spec = input_spec
        self.embed_dim = self.block_dim = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]
        self.num_blocks = len(vit.blocks)
        if input_spec.image_size % self.patch_size:
            raise InputShapeError(
                f"image_size {input_spec.image_size} is not a multiple of the patch size {self.patch_size}"
            )
        if attention is not None:
            self.set_attention(attention)
        self.set_activation_checkpointing(activation_checkpointing)

    def compute_blocks(self) -> tuple[list[nn.Module], list[nn.Module]]:
        return list(self.vit.blocks), [self.vit.norm]

    def _layer_indices(self, layers: Sequence[int]) -> list[int]:
        out = []
        for layer in layers:
            if not -self.num_blocks <= layer < self.num_blocks:
                raise IndexError(f"block index {layer} out of range for {self.num_blocks} blocks")
            out.append(layer % self.num_blocks)
        return out

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens plus position embeddings, behind the class (and register) tokens."""
        vit = self.vit
        patches = vit.patch_embed(x)  # (B, h, w, D): built with dynamic_img_size, so any multiple of the patch
        batch, h, w, dim = patches.shape
        patches = patches.reshape(batch, h * w, dim)
        prefix = [vit.cls_token.expand(batch, -1, -1)]
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(batch, -1, -1))
        prefix_tokens = torch.cat(prefix, dim=1)
        pos_embed = vit.pos_embed
        if not vit.no_embed_class:  # pos_embed covers the prefix tokens too (MAE, DINOv2 without registers)
            prefix_tokens = prefix_tokens + pos_embed[:, : vit.num_prefix_tokens]
            pos_embed = pos_embed[:, vit.num_prefix_tokens :]
        src_grid = tuple(vit.patch_embed.grid_size)
        patches = patches + resize_pos_embed(pos_embed, src_grid, (h, w), self.pos_resize)
        tokens = torch.cat([prefix_tokens, patches], dim=1)
        return vit.norm_pre(vit.patch_drop(vit.pos_drop(tokens))), (h, w)

    def forward_features(self, x: torch.Tensor, layers: Sequence[int] = ()) -> BackboneOutput:
        """Args:
        x: ``(B, 3, H, W)`` normalised as ``input_spec`` says; H and W multiples of ``patch_size`` (pixels).
        layers: blocks whose outputs to return as intermediates (negative indices count from the end).

        Returns:
            :class:`BackboneOutput` with ``features`` ``(B, D, H/p, W/p)`` after the final norm, ``intermediates``
            ``(B, D, H/p, W/p)`` and ``cls_token`` ``(B, D)`` after the final norm.
        """
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise InputShapeError(
                f"{getattr(self, 'name', 'ViT')} needs height and width that are multiples of its "
                f"patch size {self.patch_size} px, got {height}x{width}; resize or pad the input (e.g. to "
                f"{self.input_spec.image_size}x{self.input_spec.image_size})."
            )
        wanted = self._layer_indices(layers)
        runner = self.block_runner(x)
        tokens, (h, w) = self._tokens(x)
        saved: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.vit.blocks):
            tokens = runner(index, block, tokens)
            if index in wanted:
                saved[index] = tokens
        out = self.vit.norm(tokens)
        n_prefix = self.vit.num_prefix_tokens

        def to_map(t: torch.Tensor) -> torch.Tensor:
            return t[:, n_prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[-1], h, w)

        intermediates = [to_map(self.vit.norm(saved[i]) if self.intermediate_norm else saved[i]) for i in wanted]
        return BackboneOutput(features=to_map(out), intermediates=intermediates, cls_token=out[:, 0])


def build_vit_backbone(
    checkpoint: Path | None,
    *,
    timm_name: str,
    filename: str,
    family: str,
    input_spec: InputSpec,
    pos_resize: PosEmbedResize,
    convert: Callable[[Mapping[str, torch.Tensor], VisionTransformer], dict[str, torch.Tensor]],
    in_channels: int = 1,
    channel_mode: str = "repeat",
    img_size: int | None = None,
    intermediate_norm: bool = False,
    arch: Mapping | None = None,
    attention: str = "fused",
    activation_checkpointing: bool | int | str | None = "none",
) -> TimmViTBackbone:
    """Build a timm-ViT family backbone (DINOv2, MAE) from its official checkpoint, or its scratch twin.

    Args:
        checkpoint: official checkpoint file, or ``None`` for the scratch twin (timm's standard initialisation).
        timm_name: timm architecture carrying the official hyperparameters.
        filename: official file name, quoted in error messages.
        family: family name for messages (``"DINOv2"``, ``"MAE"``).
        input_spec: the family's pretrained input convention.
        pos_resize: how the family's official code resamples position embeddings.
        convert: maps the official key layout onto timm's (``convert(state, vit) -> state``).
        in_channels, channel_mode: input channels of the medical image and how they map onto RGB
            (see :class:`~medseg.backbones.base.ChannelAdapter`).
        img_size: side in pixels the pipeline will feed (a multiple of the patch size); sets
            ``input_spec.image_size``. The position embeddings stay at the checkpoint's grid and are resampled.
        intermediate_norm: apply the final LayerNorm to intermediates as well.
        arch: timm keyword arguments replacing official ones (``depth``, ``embed_dim``, ``num_heads``,
            ``img_size`` = side of the position-embedding grid in pixels); for tests with tiny models.
        attention: ``fused`` (default: timm's SDPA path, whatever ``TIMM_FUSED_ATTN`` says) or ``reference``.
        activation_checkpointing: ``none``, ``all`` or every ``k``-th block.
    """
    check_attention_mode(attention)
    native = int((arch or {}).get("img_size", input_spec.image_size))
    vit = build_timm_vit(timm_name, img_size=native, arch=arch)
    if checkpoint is not None:
        load_vit_checkpoint(vit, checkpoint, convert, expected=f"the official {family} {filename}")
    spec = dataclasses.replace(input_spec, image_size=img_size or native)
    return TimmViTBackbone(
        vit, spec, pos_resize, in_channels, channel_mode, intermediate_norm, attention, activation_checkpointing
    )
