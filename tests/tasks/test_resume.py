"""Resuming continues exactly: N/2 steps + resume to N ends with the same weights as N steps in one go, also when the
run was killed after a validation epoch, and from whatever checkpoint survives a truncated ``last.ckpt``."""

from __future__ import annotations

import logging
import shutil

import lightning as L
import pytest
import torch

import medseg.workflows.training
from medseg.errors import WeightsError
from medseg.tasks.callbacks import state_digest
from medseg.workflows.training import train

# Deterministic kernels, no validation/evaluation (not what is tested), augmentation on: the continuation must draw
# the same slices, flips and affine warps as the uninterrupted run, which only the saved random states give.
COMMON = [
    "trainer=deterministic",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.check_val_every_n_epoch=1000",
    "evaluate=false",
    "data.batch_size=3",  # 6 training cases (fold 0 of 8) -> 2 steps per epoch
    "data/augment=default_2d",
    "data.sampling.size=32",
    "+task.scheduler.total_iters=8",  # the schedule's length must not depend on where the run was cut
    "seed=7",
]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _run(train_config, data_root, run_dir, steps, extra=()):
    cfg = train_config([*COMMON, f"trainer.max_steps={steps}", *extra], run_dir, data_root)
    train(cfg)
    return cfg


def test_resumed_run_ends_with_identical_weights(train_config, small_synthetic_root, tmp_path):
    straight, resumed, unseeded = tmp_path / "straight", tmp_path / "resumed", tmp_path / "unseeded"
    _run(train_config, small_synthetic_root, straight, 8)
    _run(train_config, small_synthetic_root, resumed, 4)  # "interrupted" after two epochs
    first_half = _weights(resumed)
    _run(train_config, small_synthetic_root, resumed, 8, ["resume=true"])  # a finished run continues on request

    a, b = _weights(straight), _weights(resumed)
    assert sorted(a) == sorted(b)
    assert any(not torch.equal(first_half[k], b[k]) for k in b), "the resumed run did not train"
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # The check is sensitive: a continuation that draws other slices and augmentations ends elsewhere.
    _run(train_config, small_synthetic_root, unseeded, 4)
    _run(train_config, small_synthetic_root, unseeded, 8, ["data.seed=8", "resume=true"])
    c = _weights(unseeded)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_a_run_resumed_with_a_worker_ends_with_the_weights_of_a_run_without(
    train_config, small_synthetic_root, tmp_path
):
    # Each sample is seeded from (seed, epoch, case): a persistent worker process draws what the training process
    # would have drawn, and a resumed run's worker starts at the resumed epoch.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(train_config, small_synthetic_root, straight, 8, ["data.num_workers=0"])
    workers = ["data.num_workers=1", "data.persistent_workers=true"]
    _run(train_config, small_synthetic_root, resumed, 4, workers)
    _run(train_config, small_synthetic_root, resumed, 8, [*workers, "resume=true"])
    a, b = _weights(straight), _weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_state_digest_sees_one_changed_value():
    model = torch.nn.Linear(3, 2)
    before = state_digest(model)
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    assert state_digest(model) != before


# --- killed runs: validation on (every second epoch), killed as epoch 3 starts, i.e. after a validation epoch ------

VALIDATED = ["trainer.check_val_every_n_epoch=2", "trainer.max_steps=8"]


class Killed(Exception):
    """Stands for kill -9: the process stops between two epochs, after the checkpoints of the last one."""


class KillAtEpoch(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise Killed(f"killed as epoch {self.epoch} started")


@pytest.fixture
def killed_run(train_config, small_synthetic_root, tmp_path, monkeypatch):
    """A run folder of 8 planned steps (2 per epoch) killed after epochs 0-2; validation ran after epoch 1."""
    run_dir = tmp_path / "killed"
    build = medseg.workflows.training.build_callbacks
    with monkeypatch.context() as patch:
        patch.setattr(medseg.workflows.training, "build_callbacks", lambda cfg: [*build(cfg), KillAtEpoch(3)])
        with pytest.raises(Killed):
            _run(train_config, small_synthetic_root, run_dir, 8, VALIDATED)
    return run_dir


def _step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_a_run_killed_after_a_validation_epoch_resumes_exactly(
    train_config, small_synthetic_root, killed_run, tmp_path
):
    checkpoints = killed_run / "checkpoints"
    # last.ckpt is from the epoch before the kill (step 6), not from the validation epoch (step 4), and it is plain
    # data: torch.load(weights_only=True) with no allow-list reads it (no MONAI MetaTensor in any saved state).
    assert _step(checkpoints / "last.ckpt") == 6
    assert [p.name for p in checkpoints.glob("best*.ckpt")] == ["best_epoch0001.ckpt"]
    assert _step(checkpoints / "best_epoch0001.ckpt") == 4

    # A last.ckpt as medseg wrote it before: the best Dice score a MetaTensor (what made resuming raise
    # UnpicklingError). It must resume too.
    from monai.data import MetaTensor

    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    best = next(v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    best["best_model_score"] = MetaTensor(best["best_model_score"])
    best["best_k_models"] = {path: MetaTensor(score) for path, score in best["best_k_models"].items()}
    torch.save(state, checkpoints / "last.ckpt")

    _run(train_config, small_synthetic_root, killed_run, 8, VALIDATED)  # the same command: resumes at step 6
    straight = tmp_path / "straight"
    _run(train_config, small_synthetic_root, straight, 8, VALIDATED)
    a, b = _weights(straight), _weights(killed_run)
    assert _step(checkpoints / "last.ckpt") == 8
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_truncated_last_checkpoint_resumes_from_the_best_one_or_fails_in_one_line(
    train_config, small_synthetic_root, killed_run, tmp_path, caplog
):
    orphan = shutil.copytree(killed_run, tmp_path / "no_fallback")
    last = killed_run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # what a disk that filled mid-copy left

    with caplog.at_level(logging.WARNING, logger="medseg.runs"):
        _run(train_config, small_synthetic_root, killed_run, 8, VALIDATED)
    assert "last.ckpt is unreadable" in caplog.text and "resuming from best_epoch0001.ckpt" in caplog.text
    assert _step(last) == 8  # resumed at step 4, trained to 8, and wrote an intact last.ckpt

    # No intact checkpoint left: one line naming the file and the way out, and the run folder as it was.
    last = orphan / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    (orphan / "checkpoints" / "best_epoch0001.ckpt").unlink()
    before = {p: p.read_bytes() for p in orphan.rglob("*") if p.is_file()}
    with pytest.raises(WeightsError) as error:
        _run(train_config, small_synthetic_root, orphan, 8, VALIDATED)
    message = str(error.value)
    assert "\n" not in message and str(last) in message and "overwrite=true" in message
    assert {p: p.read_bytes() for p in orphan.rglob("*") if p.is_file()} == before
