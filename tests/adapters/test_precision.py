"""``frozen_dtype: bf16`` (issue 18): frozen weights in bfloat16, trained ones in float32; trains under CPU autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.adapters import AdapterConfig, apply_adapters
from medseg.errors import ConfigError

CASES = [
    ("sam", {"method": "lora", "rank": 4}),
    ("sam", {"method": "dora", "rank": 4}),
    ("tinyvit", {"method": "adaptformer", "bottleneck": 8}),
    ("dinov2", {"method": "adapter3d", "bottleneck": 8}),
    ("mae", {"method": "vpt", "num_tokens": 3}),
    ("sam", {"method": "frozen"}),
]


def _linear_and_conv_weights(model):
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            for name, param in module.named_parameters(recurse=False):
                yield f"{module_name}.{name}", param


@pytest.mark.parametrize(("family", "config"), CASES, ids=lambda c: c if isinstance(c, str) else c["method"])
def test_frozen_weights_are_bf16_and_a_bf16_autocast_step_trains_the_fp32_ones(
    build, inputs, with_head, family, config
):
    model = build(family)
    apply_adapters(model, {**config, "frozen_dtype": "bf16"})
    assert model.frozen_dtype == torch.bfloat16
    weights = dict(_linear_and_conv_weights(model))
    frozen = {n for n, p in weights.items() if not p.requires_grad}
    assert frozen and all(weights[n].dtype == torch.bfloat16 for n in frozen)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(b.dtype != torch.bfloat16 for b in model.buffers())  # BatchNorm statistics, position tables...

    net = with_head(model.train())
    trained = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    optimiser = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(inputs(family)).float().square().mean()
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    after = dict(net.named_parameters())
    changed = [n for n in trained if n.startswith("backbone.") and not torch.equal(trained[n], after[n])]
    assert changed or config["method"] == "frozen"  # frozen: only the head trains
    assert all(after[n].dtype == torch.float32 for n in trained)


def test_a_float32_forward_of_a_bf16_backbone_runs_under_autocast_and_returns_float32(build, inputs):
    """CPU inference defaults to fp32: the backbone enters bf16 autocast itself instead of failing on dtypes."""
    reference, model = build("sam"), build("sam")
    apply_adapters(reference, {"method": "lora", "rank": 4})
    apply_adapters(model, {"method": "lora", "rank": 4, "frozen_dtype": "bf16"})
    x = inputs("sam")
    with torch.no_grad():
        out = model(x, layers=(0,))
        expected = reference(x, layers=(0,))
    assert out.features.dtype == torch.float32 and out.intermediates[0].dtype == torch.float32
    scale = expected.features.abs().max()
    assert (out.features - expected.features).abs().max() <= 0.05 * scale  # bf16 rounding, not another model


def test_other_modules_with_bf16_weights_refuse_a_float32_forward():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    apply_adapters(model, {"method": "norm", "frozen_dtype": "bf16"})
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    with pytest.raises(ConfigError, match="frozen_dtype.*autocast"):
        model(torch.zeros(2, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.zeros(2, 4)).shape == (2, 4)


def test_frozen_dtype_is_validated_and_kept_in_the_config():
    with pytest.raises(ConfigError, match="frozen_dtype must be bf16 or fp32"):
        AdapterConfig(method="lora", frozen_dtype="int8")
    config = AdapterConfig(method="lora", frozen_dtype="bf16")
    assert AdapterConfig.from_dict(config.to_dict()).frozen_dtype == "bf16"
    assert "frozen_dtype" not in AdapterConfig(method="lora").to_dict()  # older adapter files stay byte-identical


def test_full_fine_tuning_keeps_everything_float32(build):
    model = build("sam")
    apply_adapters(model, {"method": "full", "frozen_dtype": "bf16"})
    assert all(p.dtype == torch.float32 for p in model.parameters())
