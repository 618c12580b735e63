"""Training FLOPs: torch's count checked against a hand count, the arm's batch shape, and compute-matched steps."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medseg.benchmark.compute import NNUNET_NOTE, arm_compute, batch_shape, compute_matched_steps, step_flops
from medseg.benchmark.runner import _compose
from medseg.config import instantiate
from medseg.errors import ConfigError

N, CIN, COUT, K, HW, OUT = 2, 1, 4, 3, 8, 5
CONV = 2 * N * COUT * HW * HW * CIN * K * K  # 2 FLOPs per multiply-add, one per output voxel and kernel tap
LINEAR = 2 * N * (COUT * HW * HW) * OUT


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(CIN, COUT, K, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(COUT * HW * HW, OUT)
    )


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_step_flops_equal_a_hand_count(device):
    net = _net().to(device)
    images = torch.zeros(N, CIN, HW, HW, device=device)  # the batch needs no gradient
    # forward: conv + linear; backward: the conv's weight gradient (no input gradient: the batch needs none), the
    # linear's weight and input gradients (the conv's output needs one)
    assert step_flops(net, images) == 2 * CONV + 3 * LINEAR


def test_frozen_layers_cost_no_weight_gradient():
    net = _net()
    net[0].weight.requires_grad_(False)  # as a frozen encoder under LoRA
    # the conv now has no backward at all; the linear still needs its weight gradient, not its input's
    assert step_flops(net, torch.zeros(N, CIN, HW, HW)) == CONV + 2 * LINEAR
    net.requires_grad_(False)
    assert step_flops(net, torch.zeros(N, CIN, HW, HW)) == CONV + LINEAR  # nothing to train: the forward only


def test_deep_supervision_outputs_are_all_differentiated():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2, bias=False), nn.Linear(3, 4, bias=False)

        def forward(self, x):
            return [self.a(x), {"aux": self.b(x)}]

    # forward 2*1*3*(2+4) = 36, weight gradients the same again
    assert step_flops(Two(), torch.zeros(1, 3)) == 72


def test_batch_shape_follows_the_sampling_config():
    cfg = OmegaConf.create({"data": {"batch_size": 2, "sampling": {"num_samples": 3, "size": 64,
                                                                  "patch_size": [16, 16, 8]}}})  # fmt: skip
    assert batch_shape(cfg, 2, 1) == (6, 1, 64, 64)
    assert batch_shape(cfg, 3, 2) == (6, 2, 16, 16, 8)
    with pytest.raises(ConfigError, match="patch_size"):
        batch_shape(OmegaConf.create({"data": {"sampling": {"size": 64}}}), 3, 1)


def test_compute_matched_steps():
    assert compute_matched_steps(2.0e9, 1.0e12, 7) == 500
    assert compute_matched_steps(3.0e12, 1.0e12, 7) == 1  # at least one step
    assert compute_matched_steps(None, 1.0e12, 7) == 7  # unknown FLOPs: the configured steps


def test_an_arm_is_counted_at_its_batch_once_per_configuration(bench_env):
    cache: dict = {}
    pretrained, _ = _compose(["experiment=bench_synthetic", "init=pretrained"])
    scratch, _ = _compose(["experiment=bench_synthetic", "init=scratch"])
    counted = arm_compute(pretrained, cache)
    assert arm_compute(scratch, cache) == counted and len(cache) == 1  # init does not change the network
    datamodule = instantiate(pretrained.data)
    model = instantiate(pretrained.model, num_classes=datamodule.num_classes, in_channels=datamodule.num_channels)
    assert counted.flops_per_step == step_flops(model, torch.zeros(2, 1, 32, 32))  # 1 volume x 2 slices of 32 px
    assert "(2, 1, 32, 32)" in counted.note
    wider, _ = _compose(["experiment=bench_synthetic", "model.channels=[16,32,64]"])
    assert arm_compute(wider, cache).flops_per_step > counted.flops_per_step and len(cache) == 2


def test_nnunet_and_uncountable_arms_say_why(bench_env):
    nnunet, _ = _compose(["experiment=bench_synthetic", "+nnunet=2d"])
    assert arm_compute(nnunet).flops_per_step is None and arm_compute(nnunet).note == NNUNET_NOTE
    broken, _ = _compose(["experiment=bench_synthetic", "model.channels=[8]"])  # MONAI refuses a one-level UNet
    result = arm_compute(broken)
    assert result.flops_per_step is None and result.note.startswith("not counted: ")
