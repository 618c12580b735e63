"""Checkpoint files: plain data only, and a failed write (full disk) never replaces the previous checkpoint."""

from __future__ import annotations

import contextlib
import os
import resource
import signal

import pytest
import torch
from monai.data import MetaTensor

from medseg.errors import ConfigError, WeightsError
from medseg.runs import checkpoint_problem
from medseg.tasks.checkpointing import LastCheckpoint, SafeCheckpointIO, plain_state


@contextlib.contextmanager
def disk_space(limit_bytes: int):
    """Files cannot grow past ``limit_bytes`` in this process (RLIMIT_FSIZE): a write beyond fails as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal that kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path):
    io, path = SafeCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.zeros(8)}, "global_step": 1}, path)
    before = path.read_bytes()

    with disk_space(len(before) + 4096), pytest.raises(WeightsError) as error:
        io.save_checkpoint({"state_dict": {"w": torch.randn(200_000)}, "global_step": 2}, path)
    message = str(error.value)
    assert str(path) in message and "previous last.ckpt is intact" in message and "rerun the same command" in message
    assert "\n" not in message
    assert path.read_bytes() == before  # the good checkpoint, not a truncated new one
    assert os.listdir(path.parent) == ["last.ckpt"]  # and no temporary file left behind
    assert io.load_checkpoint(path)["global_step"] == 1


def test_saved_state_is_plain_and_loads_weights_only(tmp_path):
    score = MetaTensor(torch.tensor(0.5))  # what a validation metric computed with MONAI used to leave in the state
    state = {"callbacks": {"ModelCheckpoint{...}": {"best_model_score": score, "best_k_models": {"a.ckpt": score}}}}
    path = tmp_path / "x.ckpt"
    SafeCheckpointIO().save_checkpoint(state, path)
    loaded = torch.load(path, weights_only=True)  # no allow-list needed
    assert type(loaded["callbacks"]["ModelCheckpoint{...}"]["best_model_score"]) is torch.Tensor
    assert checkpoint_problem(path) is None

    with pytest.raises(WeightsError, match=r"checkpoint/callbacks/x/sampler holds a .*Random"):
        plain_state({"callbacks": {"x": {"sampler": __import__("random").Random(0)}}})


def test_unreadable_checkpoints_are_named_not_unpickled(tmp_path):
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"global_step": 3, "w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:-200])
    assert checkpoint_problem(path) is not None
    with pytest.raises(WeightsError, match="last.ckpt"):
        SafeCheckpointIO().load_checkpoint(path)


def test_last_checkpoint_needs_a_trigger():
    with pytest.raises(ConfigError, match="every_n_epochs=1"):
        LastCheckpoint("ckpts", every_n_epochs=0, every_n_train_steps=0)
    with pytest.raises(ConfigError, match="every_n_train_steps=-2"):
        LastCheckpoint("ckpts", every_n_train_steps=-2)
