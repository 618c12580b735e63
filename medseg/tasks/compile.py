"""``CompileModel``: an opt-in ``torch.compile`` of the task's network for training (``callbacks=compile``).

Why a callback and not a flag of the task: compiling is a property of the run, not of the model, so it stays out of the
weights, the checkpoints and the released configs. The network is compiled in place with :meth:`torch.nn.Module.compile`
(not ``task.model = torch.compile(task.model)``), so the state-dict keys stay the same (no ``_orig_mod.`` prefix) and a
checkpoint of a compiled run loads into an eager model and back.

What it costs: the first training step traces and compiles the forward and backward graphs. On the two-core CPU of the
issue-18 measurements (shared and loaded, torch 2.14) the synthetic 2-D UNet (``experiment=synthetic_unet``, 64 x 64
patches, batch 2, forward and backward) took 125 s for its first compiled step against 0.5 s eager, and the steps after
it 0.9-1.4 s, slower than eager: on CPU compiling does not pay. It is meant for a GPU (fewer kernel launches, fused
elementwise work), where the first step still costs tens of seconds to minutes. Every new input
shape recompiles (``dynamic`` controls whether shapes are traced symbolically); validation on whole images of another
size than the training patches therefore compiles again. Losses agree with eager ones to float rounding (1e-5).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from medseg.errors import ConfigError

__all__ = ["COMPILE_MODES", "CompileModel"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompileModel(Callback):
    """Compile ``pl_module.model`` with :func:`torch.compile` when fitting starts.

    Args:
        mode: ``torch.compile`` mode (``default``; ``reduce-overhead`` uses CUDA graphs on a GPU).
        dynamic: ``None`` (torch decides after a shape change), ``True`` (symbolic shapes from the start) or ``False``
            (recompile for every new shape).
        fullgraph: refuse graph breaks (an error at the first step instead of a silently partial graph).
        backend: ``torch.compile`` backend (``inductor`` generates fused kernels; ``aot_eager`` only traces, which
            checks that a model compiles in seconds without the C++/Triton code generation).
        attribute: the task attribute holding the network (``model`` for every medseg task).

    Raises:
        ConfigError: an unknown ``mode``, or a task without that attribute.
    """

    def __init__(
        self,
        mode: str = "default",
        dynamic: bool | None = None,
        fullgraph: bool = False,
        backend: str = "inductor",
        attribute: str = "model",
    ) -> None:
        if mode not in COMPILE_MODES:
            raise ConfigError(f"callbacks.compile.mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}.")
        self.mode, self.dynamic, self.fullgraph, self.backend = mode, dynamic, fullgraph, backend
        self.attribute = attribute
        self.compiled = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Compile the network once (a resumed or repeated fit does not compile it twice)."""
        network: Any = getattr(pl_module, self.attribute, None)
        if not isinstance(network, torch.nn.Module):
            raise ConfigError(
                f"callbacks.compile: the task {type(pl_module).__name__} has no network in `{self.attribute}`; "
                f"set callbacks.compile.attribute to the attribute that holds it."
            )
        if self.compiled:
            return
        options = {"mode": self.mode} if self.backend == "inductor" else {}  # modes are inductor's
        network.compile(backend=self.backend, dynamic=self.dynamic, fullgraph=self.fullgraph, **options)
        self.compiled = True
