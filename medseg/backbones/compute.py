"""How a backbone runs its blocks when it trains: activation checkpointing and the frozen prefix.

Two ways to keep fewer activations for backward, applied block by block by every family's ``forward_features``
through :class:`BlockRunner`:

* **Activation checkpointing** (``activation_checkpointing: none | all | k``): a checkpointed block keeps only its
  input and recomputes its inside during backward (``torch.utils.checkpoint``, non-reentrant), trading one more
  forward of the block for its activations. ``k`` checkpoints blocks ``0, k, 2k, ...``. It only acts in training
  mode with gradients enabled; results and gradients are the same as without it.
* **The frozen prefix**: when the parameters of the first ``j`` blocks and of everything in front of them (patch
  embedding, position embedding, channel adapter) are frozen, nothing below block ``j`` can receive a gradient, so
  those blocks run under :func:`torch.no_grad` as long as their input needs no gradient either: late adaptation
  (``last_k_blocks``) then keeps no activation of the frozen blocks, by construction rather than by autograd's
  bookkeeping. Any trainable parameter outside the blocks and the family's head modules (the neck, the final norm)
  disables it: such a parameter (visual prompts, a trainable projection of the input) may act in front of every
  block. The stem itself runs with autograd as usual (it records nothing when nothing in it trains), and a block
  input that requires gradients (a model outside the backbone that adds a trainable embedding to the patch tokens
  through a hook, like the volumetric model's depth embedding) keeps that block and the ones after it on autograd.

Forward state replayed on recompute. A checkpointed block is run again during backward, after the forward of the
whole model. Modules whose forward reads state set from outside the block (adapter3d's volume depth, set by
``volume_depth`` around the forward; shallow visual prompts carried from one block to the next) declare the names
of those attributes in ``_medseg_replay``; their values at forward time are restored for the recomputation, so the
recomputed block sees exactly what the forward saw. BatchNorm layers that train (LiteMedSAM's convolutions under
full fine-tuning) would update their running statistics a second time when recomputed; their buffers are put back
after the recomputation, so the statistics match a run without checkpointing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from medseg.errors import ConfigError

__all__ = ["REPLAY_ATTRIBUTE", "BlockRunner", "checkpoint_interval", "frozen_prefix_blocks"]

#: Attribute naming the attributes a module's forward reads from state set outside it (see the module docstring).
REPLAY_ATTRIBUTE = "_medseg_replay"


def checkpoint_interval(spec: Any) -> int:
    """Blocks between two checkpointed ones: ``0`` for none, ``1`` for all, ``k`` for every k-th.

    Accepts ``none``/``all``, a positive integer (or its string), and booleans (``true`` = all), as written in
    ``backbone.activation_checkpointing`` or the older ``model.grad_checkpointing``.

    Raises:
        ConfigError: anything else.
    """
    if spec is None or spec is False:
        return 0
    if spec is True:
        return 1
    text = str(spec).strip().lower()
    if text in {"none", "false", "0", "off"}:
        return 0
    if text in {"all", "true", "1", "on"}:
        return 1
    if text.isdigit():
        return int(text)
    raise ConfigError(
        f"activation_checkpointing must be none, all, or a positive integer k (checkpoint every k-th block), got "
        f"{spec!r}; set backbone.activation_checkpointing."
    )


def frozen_prefix_blocks(model: nn.Module, blocks: Sequence[nn.Module], heads: Sequence[nn.Module] = ()) -> int:
    """How many leading ``blocks`` no gradient can reach, given which parameters of ``model`` train.

    Args:
        model: the backbone (every parameter it owns is considered).
        blocks: its blocks in forward order.
        heads: modules that run after the last block (a neck, a final norm): trainable ones do not end the prefix.

    Returns:
        The index of the first block holding a trainable parameter (``len(blocks)`` if none does), or ``0`` when a
        trainable parameter lies outside the blocks and ``heads``.
    """
    block_of: dict[int, int] = {}
    for index, block in enumerate(blocks):
        for param in block.parameters():
            block_of.setdefault(id(param), index)
    after = {id(param) for module in heads for param in module.parameters()}
    first = len(blocks)
    for param in model.parameters():
        if not param.requires_grad or id(param) in after:
            continue
        index = block_of.get(id(param))
        if index is None:
            return 0
        first = min(first, index)
    return first


@contextlib.contextmanager
def _restored(saved: list[tuple[nn.Module, dict[str, Any]]]) -> Iterator[None]:
    current = [(module, {name: getattr(module, name) for name in values}) for module, values in saved]
    for module, values in saved:
        for name, value in values.items():
            setattr(module, name, value)
    try:
        yield
    finally:
        for module, values in current:
            for name, value in values.items():
                setattr(module, name, value)


@contextlib.contextmanager
def _statistics_kept(block: nn.Module) -> Iterator[None]:
    """Undo the running-statistics update of training BatchNorms inside ``block`` (a recomputation's second one)."""
    norms = [
        m
        for m in block.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [[buffer.clone() for buffer in m.buffers(recurse=False)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in zip(norms, saved, strict=True):
                for buffer, value in zip(module.buffers(recurse=False), buffers, strict=True):
                    buffer.copy_(value)


@contextlib.contextmanager
def _recomputing(saved: list[tuple[nn.Module, dict[str, Any]]], block: nn.Module) -> Iterator[None]:
    """Context of a checkpointed block's recomputation (entered then, not when the forward builds it)."""
    with _restored(saved), _statistics_kept(block):
        yield


class BlockRunner:
    """Runs one forward's blocks: the frozen prefix without gradients, the chosen blocks checkpointed.

    Built at the start of ``forward_features``::

        runner = BlockRunner(self, blocks, heads, x)
        x = patch_embed(x)
        for index, block in enumerate(blocks):
            x = runner(index, block, x)

    Args:
        backbone: the backbone module; its ``checkpoint_every`` (0 = none) and ``training`` flag decide checkpointing.
        blocks: the blocks in forward order (the indices passed to ``__call__`` index this list).
        heads: modules after the last block (see :func:`frozen_prefix_blocks`).
        x: the input of the stem; an input that requires gradients disables the frozen prefix.
    """

    def __init__(
        self, backbone: nn.Module, blocks: Sequence[nn.Module], heads: Sequence[nn.Module], x: torch.Tensor
    ) -> None:
        grad = torch.is_grad_enabled()
        self.frozen = frozen_prefix_blocks(backbone, blocks, heads) if grad and not x.requires_grad else 0
        every = int(getattr(backbone, "checkpoint_every", 0) or 0)
        self.every = every if grad and backbone.training else 0
        self.replay: list[tuple[nn.Module, tuple[str, ...]]] = []
        if self.every:
            found = ((module, getattr(module, REPLAY_ATTRIBUTE, ())) for module in backbone.modules())
            self.replay = [(module, tuple(names)) for module, names in found if names]

    def prefix(self, index: int, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """No gradients for what runs in front of block ``index`` on ``x``, when that is inside the frozen prefix."""
        frozen = index < self.frozen and not x.requires_grad
        return torch.no_grad() if frozen else contextlib.nullcontext()

    def checkpointed(self, index: int) -> bool:
        """Whether block ``index`` is recomputed in backward in this forward."""
        return self.every > 0 and index >= self.frozen and index % self.every == 0

    def __call__(self, index: int, block: nn.Module, *args: Any) -> Any:
        """Run block ``index`` on ``args`` as the plan says."""
        if index < self.frozen and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            with torch.no_grad():
                return block(*args)
        if not self.checkpointed(index):
            return block(*args)
        saved = [(module, {name: getattr(module, name) for name in names}) for module, names in self.replay]

        def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
            return contextlib.nullcontext(), _recomputing(saved, block)

        return activation_checkpoint(block, *args, use_reentrant=False, context_fn=contexts)
