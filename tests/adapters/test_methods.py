"""Every method on every tiny backbone family: which parameters train, identity at init, one optimiser step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.adapters import METHODS, apply_adapters
from medseg.adapters.bitfit import is_layer_norm
from medseg.errors import ConfigError

ALL_METHODS = sorted(METHODS)
# VPT needs a token sequence; SAM's windowed (B, H, W, C) blocks and TinyViT's fixed windows have none.
UNSUPPORTED = {("vpt", "sam"), ("vpt", "tinyvit")}
# Methods whose adapted model is the base model at initialisation (B = 0, zero-initialised up-projections,
# identity scale/shift, DoRA's magnitude = the weight norm). VPT is not: prompts change every token's attention.
IDENTITY_AT_INIT = set(ALL_METHODS) - {"vpt"}
# Modules each block-level method attaches to: every transformer block (TinyViT: its 4 attention blocks).
BLOCKS = {"sam": 2, "dinov2": 2, "mae": 2, "tinyvit": 4}


def _layer_norm_params(model: nn.Module) -> set[str]:
    return {
        f"{name}.{p}"
        for name, module in model.named_modules()
        if is_layer_norm(module)
        for p, _ in module.named_parameters(recurse=False)
    }


def expected_trainable(model: nn.Module, method: str) -> set[str]:
    """The parameter names each method must train, derived from names and module types, not from the method."""
    names = {n for n, _ in model.named_parameters()}
    rules = {
        "full": lambda n: True,
        "frozen": lambda n: False,
        "bitfit": lambda n: n.endswith(".bias") and ".lora_" not in n,
        "lora": lambda n: ".lora_A." in n or ".lora_B." in n,
        "lora_bonly": lambda n: ".lora_B." in n,
        "dora": lambda n: ".lora_A." in n or ".lora_B." in n or ".lora_magnitude_vector." in n,
        "adaptformer": lambda n: ".adaptformer." in n,
        "adapter3d": lambda n: ".adapter3d." in n,
        "ssf": lambda n: n.endswith((".ssf_scale", ".ssf_shift")),
        "vpt": lambda n: n.endswith("vpt_prompts.tokens"),
    }
    if method == "norm":
        return _layer_norm_params(model)
    return {n for n in names if rules[method](n)}


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_exactly_the_intended_parameters_train(method, family, build, with_head):
    if (method, family) in UNSUPPORTED:
        with pytest.raises(ConfigError, match=r"dinov2_\*, mae_\*"):
            apply_adapters(build(family), {"method": method})
        return
    model = with_head(build(family))
    report = apply_adapters(model.backbone, {"method": method})
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    expected = {f"backbone.{n}" for n in expected_trainable(model.backbone, method)} | head
    assert _trainable(model) == expected
    assert report["trainable"] == sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    if method not in {"full", "frozen"}:
        assert 0 < report["trainable"] < 0.5 * report["total"]
    # the adapters sit where the method says
    added = {n.split(".lora_")[0] for n in model.state_dict() if ".lora_A." in n}
    if method in {"lora", "lora_bonly", "dora"}:
        assert added and all(n.endswith(("attn.qkv", "attn.proj")) for n in added)
        attention = [n for n, m in build(family).named_modules() if n.endswith(("attn.qkv", "attn.proj"))]
        assert len(added) == len(attention)
    if method in {"adaptformer", "adapter3d"}:
        assert sum(1 for n, _ in model.named_modules() if n.endswith("." + method)) == BLOCKS[family]


@pytest.mark.parametrize("method", sorted(IDENTITY_AT_INIT))
def test_output_equals_base_model_at_init(method, family, build, inputs):
    base, adapted = build(family), build(family)
    apply_adapters(adapted, {"method": method})
    x = inputs(family)
    with torch.no_grad():
        expected, actual = base(x, layers=[0]), adapted(x, layers=[0])
    torch.testing.assert_close(actual.features, expected.features, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.intermediates[0], expected.intermediates[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_one_step_changes_only_trainable_tensors(method, family, build, inputs, with_head):
    if (method, family) in UNSUPPORTED:  # not skipped: the method must refuse this family with a clear error
        with pytest.raises(ConfigError):
            apply_adapters(build(family), {"method": method})
        return
    model = with_head(build(family))
    apply_adapters(model.backbone, {"method": method})
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=1e-3)
    model(inputs(family)).pow(2).mean().backward()
    optimiser.step()
    after = model.state_dict()
    trainable = _trainable(model)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for key, value in before.items():
        if key in trainable:
            if grads[key] is not None and grads[key].abs().max() > 0:
                assert not torch.equal(after[key], value), f"{key} had a gradient but did not change"
        elif method != "full":  # full fine-tuning updates BatchNorm statistics legitimately
            assert torch.equal(after[key], value), f"{key} is not trainable but changed"
    changed_backbone = [k for k in trainable if k.startswith("backbone.") and not torch.equal(after[k], before[k])]
    assert bool(changed_backbone) == (method != "frozen")


def test_frozen_backbone_keeps_no_graph(family, build, inputs, with_head):
    model = with_head(build(family))
    apply_adapters(model.backbone, {"method": "frozen"})
    x = inputs(family).requires_grad_(True)  # even an input that requires grad does not build a backbone graph
    features = model.backbone(x).features
    assert features.grad_fn is None and not features.requires_grad
    model(x).sum().backward()
    assert model.head.weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())


def test_lora_keeps_graph_only_through_adapted_blocks(build, inputs):
    model = build("sam")
    apply_adapters(model, {"method": "lora", "targets": ["blocks.1.attn.qkv"]})
    out = model(inputs("sam")).features
    assert out.requires_grad
    out.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert model.image_encoder.blocks[1].attn.qkv.lora_B["default"].weight.grad is not None


def test_parameter_report_groups(build, with_head):
    model = with_head(build("mae"))
    apply_adapters(model.backbone, {"method": "lora", "rank": 2})
    from medseg.adapters import format_parameter_report, parameter_report

    report = parameter_report(model)
    head = sum(p.numel() for p in model.head.parameters())
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert report["groups"]["head"] == {
        "trainable": head,
        "total": head,
        "trainable_percent": pytest.approx(100 * head / report["total"]),
    }
    assert report["groups"]["adapters"]["trainable"] == lora
    assert report["groups"]["backbone"]["trainable"] == 0
    assert report["trainable"] == head + lora
    assert report["total"] == sum(p.numel() for p in model.parameters())
    assert report["methods"] == ["lora"]
    assert sum(g["trainable_percent"] for g in report["groups"].values()) == pytest.approx(report["trainable_percent"])
    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(format_parameter_report(report))
    text = console.export_text()
    assert "adapters" in text and f"{lora:,}" in text


def test_frozen_batchnorm_keeps_pretrained_statistics(build, inputs):
    model = build("tinyvit")
    apply_adapters(model, {"method": "lora"})
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    mean = bn.running_mean.clone()
    model(inputs("tinyvit"))
    assert torch.equal(bn.running_mean, mean)
    full = build("tinyvit")
    apply_adapters(full, {"method": "full"})
    full.train()
    bn = next(m for m in full.modules() if isinstance(m, nn.BatchNorm2d))
    full(inputs("tinyvit"))
    assert not torch.equal(bn.running_mean, mean)


def test_applying_twice_is_an_error(build):
    model = build("mae")
    apply_adapters(model, {"method": "lora"})
    with pytest.raises(ConfigError, match="already has adapters"):
        apply_adapters(model, {"method": "norm"})
