"""Parameter-efficient adaptation of pretrained backbones: one small module per method, chosen by name.

=============  =====================================================  ==========================================
method         what trains                                            backbones
=============  =====================================================  ==========================================
full           everything                                             all
frozen         nothing in the backbone (heads only; no graph kept)    all
bitfit         bias terms                                             all
norm           LayerNorm weights and biases                           all
lora           low-rank A, B on targeted linear layers (peft)         all (TinyViT: attention-stage linears)
lora_bonly     B only; A frozen at random init (asymmetric LoRA)      all
dora           LoRA + per-output magnitude (peft ``use_dora``)        all
adaptformer    bottleneck MLP parallel to each block's MLP            all (TinyViT: attention stages)
adapter3d      down -> depthwise Conv3d (D, H, W) -> up, per block    all (TinyViT: attention stages)
ssf            per-feature scale and shift after linear/LayerNorm     all
vpt            prompt tokens, shallow or deep                         dinov2_*, mae_* (not SAM, not TinyViT)
=============  =====================================================  ==========================================

Configs: ``conf/adapter/*.yaml`` build an :class:`AdapterConfig`; see :mod:`medseg.adapters.apply`.

Memory-lean options: ``last_k_blocks: k`` (every method but ``frozen``) adapts the last ``k`` blocks only, so the
blocks below keep no activations; ``frozen_dtype: bf16`` (top level) keeps the frozen weights in bfloat16
(:mod:`medseg.adapters.precision`). Activation checkpointing is a backbone setting
(``backbone.activation_checkpointing``) and works with every method here.
"""

from __future__ import annotations

from medseg.adapters.adapter3d import Adapter3d, VolumeDepthError, set_volume_depth, volume_depth
from medseg.adapters.apply import METHODS, AdapterConfig, apply_adapters
from medseg.adapters.merge import (
    adapter_state_dict,
    load_adapter,
    merge_adapters,
    read_adapter_metadata,
    save_adapter,
    unmerge_adapters,
)
from medseg.adapters.report import format_parameter_report, parameter_report, print_parameter_report
from medseg.adapters.targets import TargetError

__all__ = [
    "METHODS",
    "Adapter3d",
    "AdapterConfig",
    "TargetError",
    "VolumeDepthError",
    "adapter_state_dict",
    "apply_adapters",
    "format_parameter_report",
    "load_adapter",
    "merge_adapters",
    "parameter_report",
    "print_parameter_report",
    "read_adapter_metadata",
    "save_adapter",
    "set_volume_depth",
    "unmerge_adapters",
    "volume_depth",
]
