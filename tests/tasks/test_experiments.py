"""Every experiment file runs end to end under Lightning's fast_dev_run (one batch each), as `medseg train` would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.config import CONFIG_DIR
from medseg.data.prepare import mni_tissue, synthetic
from medseg.workflows.training import train

# cls_* experiments belong to `medseg classify` (conf/classify.yaml); tests/test_classify_configs.py runs them.
EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml") if not p.stem.startswith("cls_"))
BUILDERS = {"synthetic": synthetic, "mni-tissue": mni_tissue}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("experiment_data")
    synthetic.build(root, seed=5, num_train=4, num_test=1, shape=(40, 40, 16))
    mni_tissue.build(root, seed=0)
    return root


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_one_batch(experiment, demo_root, tmp_path, compose_config):
    cfg = compose_config([f"experiment={experiment}", "debug=fdr", "data.num_workers=0"], tmp_path, demo_root)
    assert cfg.data.dataset in BUILDERS, f"experiment {experiment} needs a demo dataset this test can build"
    train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_cases"] >= 1 and 0.0 <= summary["foreground_mean"]["dice"] <= 1.0
