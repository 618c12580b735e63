"""Resuming continues exactly: N/2 steps + resume to N ends with the same weights as N steps in one go."""

from __future__ import annotations

import torch

from medseg.tasks.callbacks import state_digest
from medseg.train import train

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
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def _run(train_config, data_root, run_dir, steps, extra=()):
    cfg = train_config([*COMMON, f"trainer.max_steps={steps}", *extra], run_dir, data_root)
    train(cfg)
    return cfg


def test_resumed_run_ends_with_identical_weights(train_config, small_synthetic_root, tmp_path):
    straight, resumed, unseeded = tmp_path / "straight", tmp_path / "resumed", tmp_path / "unseeded"
    _run(train_config, small_synthetic_root, straight, 8)
    _run(train_config, small_synthetic_root, resumed, 4)  # "interrupted" after two epochs
    first_half = _weights(resumed)
    _run(train_config, small_synthetic_root, resumed, 8)  # the same command again: resumes from last.ckpt

    a, b = _weights(straight), _weights(resumed)
    assert sorted(a) == sorted(b)
    assert any(not torch.equal(first_half[k], b[k]) for k in b), "the resumed run did not train"
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # The check is sensitive: a continuation that draws other slices and augmentations ends elsewhere.
    _run(train_config, small_synthetic_root, unseeded, 4)
    _run(train_config, small_synthetic_root, unseeded, 8, ["data.seed=8"])
    c = _weights(unseeded)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_state_digest_sees_one_changed_value():
    model = torch.nn.Linear(3, 2)
    before = state_digest(model)
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    assert state_digest(model) != before
