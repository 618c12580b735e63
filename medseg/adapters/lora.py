"""``lora``, ``lora_bonly`` and ``dora``: low-rank updates of chosen linear layers, through the ``peft`` library.

``peft.inject_adapter_in_model`` replaces each targeted ``nn.Linear`` by a ``peft`` LoRA layer that keeps the
original as ``base_layer`` and adds ``lora_A`` (rank x in) and ``lora_B`` (out x rank); its output is
``W x + (alpha / rank) * B A dropout(x)``. ``B`` starts at zero, so the adapted model equals the base model at
initialisation. The targeted layers of every family are plain ``nn.Linear`` (SAM ``attn.qkv``, ``attn.proj``,
``mlp.lin1``/``lin2``; timm ViT and TinyViT ``attn.qkv``, ``attn.proj``, ``mlp.fc1``/``fc2``), which ``peft``
supports; convolutions (patch embeddings, TinyViT's MBConv stages, necks) are not targeted.

* ``lora_bonly``: the asymmetric variant of Zhu et al. 2024, "Asymmetry in Low-Rank Adapters of Foundation Models":
  ``A`` stays at its random initialisation (frozen) and only ``B`` trains, halving the trainable parameters with
  little loss. ``A`` is still saved in the adapter checkpoint, since it is random.
* ``dora``: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (``peft``'s ``use_dora=True``): a
  trainable magnitude vector per output feature on top of the LoRA direction update. ``peft`` can merge it.

Pattern matching is medseg's (:mod:`medseg.adapters.targets`): the patterns are resolved to full module names first,
so a pattern that matches nothing is an error listing the model's modules, and ``peft`` gets exact names.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from medseg.adapters.blocks import late_sites
from medseg.adapters.targets import in_scope, resolve_targets
from medseg.errors import ConfigError

__all__ = ["DEFAULT_LORA_TARGETS", "apply_dora", "apply_lora", "apply_lora_bonly"]

#: The attention projections of every supported family.
DEFAULT_LORA_TARGETS = ("qkv", "proj")


def apply_lora(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_LORA_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    train_a: bool = True,
    use_dora: bool = False,
    last_k_blocks: int | None = None,
) -> list[str]:
    """Inject LoRA into the ``nn.Linear`` layers matching ``targets`` (in the last ``last_k_blocks`` blocks only).

    Args:
        targets: module name patterns, e.g. ``["qkv"]``, ``["attn.qkv", "attn.proj"]``, ``["mlp"]``.
        rank: rank ``r`` of the update (number of rows of ``A``).
        alpha: the update is scaled by ``alpha / rank``; keeping ``alpha`` fixed while changing the rank changes the
            effective learning rate of the update.
        dropout: dropout probability on the LoRA branch input.
        train_a: ``False`` freezes ``A`` at its random initialisation (asymmetric LoRA, B only).
        use_dora: weight-decomposed LoRA (DoRA).
        last_k_blocks: late adaptation: only targets inside the last ``k`` transformer blocks (``None``: all).

    Returns:
        The names of the parameters made trainable.
    """
    from peft import LoraConfig, inject_adapter_in_model  # lazy: peft costs ~3 s to import; only LoRA/DoRA need it

    if rank < 1:
        raise ConfigError(f"lora: rank must be a positive integer, got {rank}.")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora: dropout must be in [0, 1), got {dropout}.")
    method = "dora" if use_dora else "lora"
    late = late_sites(model, last_k_blocks, method)
    names = in_scope(list(resolve_targets(model, targets, (nn.Linear,), method)), late, targets, method)
    state = {param: param.requires_grad for param in model.parameters()}
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=names,
        use_dora=bool(use_dora),
        bias="none",
    )
    inject_adapter_in_model(config, model)
    for param, requires_grad in state.items():  # peft freezes everything else; restore what other methods set
        param.requires_grad_(requires_grad)
    trainable = []
    for name, param in model.named_parameters():
        if ".lora_" not in name:
            continue
        param.requires_grad_(train_a or ".lora_A." not in name)
        if param.requires_grad:
            trainable.append(name)
    return trainable


def apply_lora_bonly(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_LORA_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    last_k_blocks: int | None = None,
) -> list[str]:
    """Asymmetric LoRA: ``A`` frozen at its random initialisation, only ``B`` trains (see :func:`apply_lora`)."""
    return apply_lora(model, targets, rank, alpha, dropout, train_a=False, last_k_blocks=last_k_blocks)


def apply_dora(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_LORA_TARGETS,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    train_a: bool = True,
    last_k_blocks: int | None = None,
) -> list[str]:
    """DoRA: LoRA plus a trainable magnitude per output feature (see :func:`apply_lora`)."""
    return apply_lora(model, targets, rank, alpha, dropout, train_a=train_a, use_dora=True, last_k_blocks=last_k_blocks)
