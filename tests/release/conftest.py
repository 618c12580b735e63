"""Tiny trained runs (MAE-shaped ViT + LoRA + UNETR, and a from-scratch UNet baseline, on synthetic phantoms) and
their releases, built once per session.

The "pretrained" base of the tiny backbone is a scratch ViT saved to a safetensors file: it plays the part of an
official checkpoint, so the adapter-only path (base named by file and SHA-256) is exercised without any download.
Both runs are evaluated as `medseg evaluate run_dir=...` does, so their ``summary.json`` lacks the facts `medseg train`
adds (backbone, model, dataset): export must find them in the run's config and folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from medseg.config import CONFIG_DIR
from medseg.data.prepare import synthetic
from medseg.release.checksums import write_checksums

ARCH = "{depth:2,embed_dim:32,num_heads:2,img_size:64}"
BASE_FILE = "tiny_mae.safetensors"


def _train(root: Path, run_name: str, overrides: list[str], saved_names: dict[str, str]) -> Path:
    from medseg.workflows.evaluation import evaluate
    from medseg.workflows.training import train

    data = root / "data"
    synthetic.build(data, seed=4, num_train=4, num_test=1, shape=(32, 32, 12))
    run_dir = root / "results" / "synthetic" / run_name / "fold_0"
    overrides = [
        *overrides, "trainer.max_steps=3", "logger=csv", "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null", "eval_ckpt=last",
    ]  # fmt: skip
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        cfg.paths.data_dir = str(data)
    run_dir.mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    saved = cfg.copy()
    with open_dict(saved):
        del saved["hydra"]
        for key, value in saved_names.items():
            saved[key] = value
    from omegaconf import OmegaConf

    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    with open_dict(cfg):
        cfg.evaluate = False  # evaluated below as `medseg evaluate run_dir=...` does, from the saved config
    train(cfg)
    evaluate(OmegaConf.create({"run_dir": str(run_dir), "ckpt": "last", "nsd_tolerance_mm": 2.0, "device": "cpu"}))
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """``{"run_dir", "weights"}``: a 3-step run whose backbone started from ``weights/tiny_mae.safetensors``."""
    from safetensors.torch import save_file

    from medseg.backbones import create_backbone

    root = tmp_path_factory.mktemp("tiny_release_run")
    weights = root / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    backbone = create_backbone("mae_vit_base", pretrained=False, arch={"depth": 2, "embed_dim": 32, "num_heads": 2,
                                                                      "img_size": 64}, img_size=64)  # fmt: skip
    save_file({k: v.contiguous() for k, v in backbone.vit.state_dict().items()}, str(weights / BASE_FILE))
    overrides = [
        "experiment=synthetic_unet", "model=vit_unetr", "backbone=mae_vit_base", "adapter=lora", "init=pretrained",
        f"backbone.checkpoint={weights / BASE_FILE}", "+backbone.img_size=64", f"+model.arch={ARCH}",
        "model.feature_size=4", "data.sampling.size=64", "data.sampling.num_samples=2",
    ]  # fmt: skip
    names = {"model_name": "tiny-vit_unetr", "adapter_name": "lora", "run_name": "tiny-vit_unetr__lora__pretrained"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = _train(root, names["run_name"], overrides, names)
    finally:
        torch.set_num_threads(threads)
    return {"run_dir": run_dir, "weights": weights}


@pytest.fixture(scope="session")
def tiny_unet_run(tmp_path_factory) -> Path:
    """A 3-step from-scratch 2-D UNet run (``experiment=synthetic_unet``, a baseline: no backbone, no decoder)."""
    root = tmp_path_factory.mktemp("tiny_unet_run")
    overrides = [
        "experiment=synthetic_unet", "model.channels=[4,8]", "model.strides=[2]", "model.num_res_units=0",
        "data.sampling.size=32", "data.sampling.num_samples=1", "data.batch_size=1",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # saved as Hydra saves it: adapter_name and run_name stay ${hydra:...} interpolations, unresolvable later
        return _train(root, "unet2d__full__scratch", overrides, {})
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_releases(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """``{"adapter-only": folder, "merged": folder}`` exported from :func:`tiny_run`."""
    from medseg.release.export import export_release

    out = tmp_path_factory.mktemp("tiny_releases")
    folders = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSEG_WEIGHTS", str(tiny_run["weights"]))
        for mode in ("adapter-only", "merged"):
            folders[mode] = export_release(
                tiny_run["run_dir"], out / mode, name="tiny-test", version="1.2.3", mode=mode
            )
    return folders


@pytest.fixture
def base_weights_env(tiny_run, monkeypatch) -> Path:
    """``MEDSEG_WEIGHTS`` pointing at the folder holding the tiny base file, for loading adapter-only releases."""
    monkeypatch.setenv("MEDSEG_WEIGHTS", str(tiny_run["weights"]))
    return tiny_run["weights"]


@pytest.fixture
def edit_config():
    """``edit_config(folder, change)``: apply ``change(dict)`` to a release's config.yaml and recompute its checksums.

    The result is a consistent but different release, as anyone who edits one can make: only content checks can
    catch it, never the checksums.
    """

    def edit(folder: Path, change) -> Path:
        config = yaml.safe_load((folder / "config.yaml").read_text())
        change(config)
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        write_checksums(folder)
        return folder

    return edit


@pytest.fixture
def release_copy(tiny_releases, tmp_path):
    """``release_copy(mode)``: a private copy of a tiny release that a test may damage."""

    def make(mode: str = "adapter-only") -> Path:
        target = tmp_path / f"copy-{mode}"
        shutil.copytree(tiny_releases[mode], target)
        return target

    return make
