"""Late adaptation (issue 18): ``last_k_blocks`` puts every method in the last k blocks; the blocks below run frozen."""

from __future__ import annotations

import pytest
import torch

from medseg.adapters import apply_adapters
from medseg.adapters.blocks import find_blocks
from medseg.adapters.targets import TargetError
from medseg.errors import ConfigError

METHODS = ["lora", "lora_bonly", "dora", "ssf", "bitfit", "norm", "adaptformer", "adapter3d", "full"]
CASES = [(f, m) for f in ("sam", "tinyvit", "dinov2", "mae") for m in METHODS]
CASES += [("dinov2", "vpt"), ("mae", "vpt")]


def _after(model, site_name: str) -> set[str]:
    """Parameter names registered from the site's block on (the block itself and what runs after it)."""
    names = [n for n, _ in model.named_parameters()]
    start = next(i for i, n in enumerate(names) if n.startswith(site_name + "."))
    return set(names[start:])


@pytest.mark.parametrize(("family", "method"), CASES)
def test_only_the_last_block_adapts_and_the_blocks_below_keep_no_graph(build, inputs, with_head, family, method):
    model = build(family)
    last = find_blocks(model)[-1]
    report = apply_adapters(model, {"method": method, "last_k_blocks": 1})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and report["trainable"] > 0
    if method == "full":  # the last block and the modules after it (neck / final norm)
        assert trainable == _after(model, last.name)
    else:
        assert all(n.startswith(last.name + ".") for n in trainable), sorted(trainable - _after(model, last.name))

    blocks, _ = model.compute_blocks()
    first = blocks.index(last.block)
    below = blocks[first - 1]
    seen = {}
    below.register_forward_hook(lambda m, a, out: seen.update(grad=torch.is_grad_enabled(), out=out) and None)
    net = with_head(model.train())
    net(inputs(family)).square().mean().backward()
    assert model.block_runner(torch.zeros(1)).frozen == first
    assert seen["grad"] is False and not seen["out"].requires_grad  # the frozen prefix ran without autograd
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable and with_grad


def test_last_k_blocks_must_fit_the_model(build):
    model = build("sam")  # two blocks
    for bad in (0, 3, True, "2"):
        with pytest.raises(ConfigError, match="last_k_blocks must be an integer from 1 to 2"):
            apply_adapters(build("sam"), {"method": "lora", "last_k_blocks": bad})
    with pytest.raises(ConfigError, match="either blocks .* or last_k_blocks"):
        apply_adapters(model, {"method": "adaptformer", "blocks": [1], "last_k_blocks": 1})


def test_frozen_has_no_blocks_to_adapt(build):
    with pytest.raises(ConfigError, match="'frozen' has no option"):
        apply_adapters(build("sam"), {"method": "frozen", "last_k_blocks": 1})


def test_targets_outside_the_last_blocks_are_named(build):
    with pytest.raises(TargetError, match=r"match nothing inside the last 1 block\(s\).*image_encoder\.blocks\.1"):
        apply_adapters(build("sam"), {"method": "lora", "targets": ["blocks.0.attn.qkv"], "last_k_blocks": 1})


def test_late_lora_config_round_trips(build):
    from medseg.adapters import AdapterConfig

    config = AdapterConfig(method="lora", rank=4, last_k_blocks=1)
    again = AdapterConfig.from_dict(config.to_dict())
    model = build("sam")
    again(model)
    assert {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad} == {
        "image_encoder.blocks.1.attn.qkv",
        "image_encoder.blocks.1.attn.proj",
    }
