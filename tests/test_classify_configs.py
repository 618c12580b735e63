"""conf/classify.yaml composes with every protocol, classification model and the ladder experiment."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from medseg.config import CONFIG_DIR


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("classify", overrides=overrides)


@pytest.mark.parametrize(
    ("protocol", "adapter", "layer_decay"),
    [("knn", "frozen", None), ("linear", "frozen", None), ("peft", "lora", None), ("full", "full", 0.75)],
)
def test_each_protocol_sets_its_adapter(protocol, adapter, layer_decay):
    cfg = _compose([f"protocol={protocol}"])
    assert cfg.protocol.name == protocol and cfg.adapter.method == adapter and cfg.task.layer_decay == layer_decay
    assert cfg.model.adapter.method == adapter  # the model is built with the protocol's adapter


def test_peft_takes_any_adapter_and_init_switches_only_the_weights():
    cfg = _compose(["protocol=peft", "adapter=ssf", "init=scratch"])
    assert cfg.model.adapter.method == "ssf" and cfg.model.pretrained is False
    assert _compose(["protocol=peft", "adapter=adapter3d"]).model.adapter.method == "adapter3d"


def test_cnn_baseline_and_ladder_experiment_compose():
    cfg = _compose(["model=classifier_densenet", "protocol=full"])
    assert cfg.model.name == "densenet121" and cfg.model.adapter.method == "full"
    ladder = _compose(["experiment=cls_quickstart"])
    assert list(ladder.ladder.protocols) == ["knn", "linear", "peft", "full"]
    assert list(ladder.ladder.inits) == ["pretrained", "scratch"] and ladder.backbone.name == "litemedsam"
    assert ladder.data.dataset == "mni-slices" and ladder.data.label_kind == "ordinal"
