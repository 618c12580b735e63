"""``callbacks=compile``: the network compiled at fit start gives the eager loss and gradients, same state dict."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate

from medseg.errors import ConfigError
from medseg.tasks.compile import CompileModel
from medseg.workflows.training import build_callbacks


def _task_and_callback(train_config, tmp_path, overrides: list[str]):
    cfg = train_config(["callbacks=compile", *overrides], tmp_path / "run")
    (callback,) = [c for c in build_callbacks(cfg) if isinstance(c, CompileModel)]
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_classes=3, in_channels=1)
    task = instantiate(cfg.task, model=model, label_names={"background": 0, "a": 1, "b": 2})
    return task, callback


def _loss_and_grads(task, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The training loss of one batch and the gradient of every parameter (what the optimiser step gets)."""
    loss = task.loss(task.model(batch["image"]).float(), batch["label"])
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in task.model.named_parameters()}


def _compiled_matches_eager(task, callback) -> None:
    generator = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.rand(2, 1, 32, 32, generator=generator),
        "label": torch.randint(0, 3, (2, 1, 32, 32), generator=generator),
    }
    eager = copy.deepcopy(task)
    callback.on_fit_start(None, task)
    callback.on_fit_start(None, task)  # a second fit (resume in the same process) does not compile again
    assert callback.compiled and task.model._compiled_call_impl is not None
    assert eager.model._compiled_call_impl is None
    loss_eager, grads_eager = _loss_and_grads(eager, batch)
    loss_compiled, grads_compiled = _loss_and_grads(task, batch)
    assert loss_compiled == pytest.approx(loss_eager, abs=1e-5)
    # compiled in place: the same state-dict keys, so checkpoints load into an eager model and back
    assert task.model.state_dict().keys() == eager.model.state_dict().keys()
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], grad, atol=1e-5, rtol=1e-4)


def test_traced_training_step_gives_the_eager_loss_and_gradients(train_config, tmp_path):
    """aot_eager traces forward and backward as inductor does, without code generation (seconds on CPU)."""
    overrides = ["callbacks.compile.backend=aot_eager", "model.channels=[4,8]", "model.strides=[2]"]
    _compiled_matches_eager(*_task_and_callback(train_config, tmp_path, overrides))


@pytest.mark.slow
def test_inductor_training_step_gives_the_eager_loss_and_gradients(train_config, tmp_path):
    """The default backend on the tiny synthetic UNet (minutes on a loaded two-core CPU: C++ code generation)."""
    _compiled_matches_eager(*_task_and_callback(train_config, tmp_path, []))


def test_unknown_mode_and_missing_network_are_config_errors():
    with pytest.raises(ConfigError, match="callbacks.compile.mode"):
        CompileModel(mode="fastest")
    with pytest.raises(ConfigError, match="callbacks.compile.attribute"):
        CompileModel().on_fit_start(None, torch.nn.Module())
