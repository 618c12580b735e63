"""SAM 2 as benchmark arms: ``backbone: [sam2_hiera_t]`` x ``init: [pretrained, scratch]`` on the tiny SAM 2 smoke
experiment, the pretrained arm reading an official-layout file (a tiny Hiera's whole ``SAM2Base``, named as the
official Hiera-T file) from ``$MEDSEG_WEIGHTS``, strictly."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from medseg.backbones.sam2_configs import MISSING_EXTRA, build_sam2_model, require_sam2
from medseg.benchmark.runner import load_settings, run_benchmark
from medseg.errors import ConfigError

try:
    require_sam2()
except ConfigError:
    pytest.skip(MISSING_EXTRA, allow_module_level=True)

# conf/experiment/promptable_synthetic_sam2.yaml's tiny Hiera at 64 px
TINY = {"embed_dim": 16, "num_heads": 1, "stages": [1, 1, 2, 1], "global_att_blocks": [3]}
GRID = [
    "experiment=promptable_synthetic_sam2",
    "+benchmark.arms={backbone:[sam2_hiera_t],init:[pretrained,scratch]}",
    "+benchmark.question='Does SAM 2 pretraining help on the phantoms? A smoke test.'",
    "+benchmark.statistics.n_resamples=200",
    "trainer.max_steps=2",
    "trainer.check_val_every_n_epoch=1000000",
    "data.batch_size=1",
    "data.sampling.num_samples=2",
    "task.num_iterations=2",
    "task.evaluation.max_clicks=2",
    "task.evaluation.dice_k=2",
    "task.evaluation.max_objects=1",
    "logger=csv",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
]


@pytest.fixture
def official_tiny_file(tmp_path, monkeypatch):
    """``$MEDSEG_WEIGHTS/sam2.1_hiera_tiny.pt``: ``{"model": state dict}`` of a perturbed tiny SAM2Base."""
    torch.manual_seed(1)
    model = build_sam2_model("sam2_hiera_t", 64, TINY)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save({"model": model.state_dict()}, folder / "sam2.1_hiera_tiny.pt")
    monkeypatch.setenv("MEDSEG_WEIGHTS", str(folder))
    return model.state_dict()


def test_grid_has_a_pretrained_and_a_scratch_sam2_arm(bench_env):
    settings, cfg = load_settings(GRID)
    assert [a.name for a in settings.arms] == ["sam2_hiera_t__pretrained", "sam2_hiera_t__scratch"]
    assert settings.arms[0].overrides == ("backbone=sam2_hiera_t", "init=pretrained")
    assert cfg.model.backbone == "sam2_hiera_t"


def test_sam2_arms_train_and_are_compared(one_thread, bench_env, official_tiny_file):
    assert run_benchmark(GRID) == 0
    bench_env = bench_env.parent / "promptable_synthetic_sam2"
    per_case = pd.read_csv(bench_env / "per_case.csv")
    assert set(per_case["arm"]) == {"sam2_hiera_t__pretrained", "sam2_hiera_t__scratch"}
    assert {"dice", "dice_click1", "dice_click2"} <= set(per_case["metric"])
    comparisons = pd.read_csv(bench_env / "comparisons.csv")
    assert "pretrained_vs_scratch" in set(comparisons["kind"])
    cost = pd.read_csv(bench_env / "cost.csv").set_index("arm")
    assert (cost["steps"] == 2).all() and cost.loc["sam2_hiera_t__pretrained", "trainable_params"] > 0

    # the pretrained arm started from the file: its checkpoint's frozen-free weights moved from it by 2 steps only,
    # the scratch arm's did not start there
    def start_distance(arm: str) -> float:
        ckpt = bench_env / "runs" / arm / "frac_1" / "seed_0" / "checkpoints" / "last.ckpt"
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        key = "model.sam2.memory_attention.layers.0.self_attn.q_proj.weight"  # frozen in 2-D frames: never trained
        return (state[key] - official_tiny_file["memory_attention.layers.0.self_attn.q_proj.weight"]).abs().max()

    assert start_distance("sam2_hiera_t__pretrained") == 0
    assert start_distance("sam2_hiera_t__scratch") > 1e-3
