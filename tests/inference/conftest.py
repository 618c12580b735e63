"""Shared inputs of the prediction tests: a tiny trained dense run folder, oblique LPS scans, LiteMedSAM, a blob."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from medseg.data.prepare import synthetic
from medseg.train import CONFIG_DIR

# A 2D UNet of a few thousand parameters, two optimisation steps: a real run folder, not a good model.
TINY_RUN = [
    "experiment=synthetic_unet",
    "model.channels=[4,8]",
    "model.strides=[2]",
    "model.num_res_units=0",
    "logger=csv",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.max_steps=2",
    "trainer.check_val_every_n_epoch=1000",
    "data.batch_size=1",
    "data.sampling.size=32",
    "data.sampling.num_samples=1",
    "data.cache=none",
    "evaluate=false",
]


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory) -> Path:
    """A run folder of ``medseg train`` (checkpoint + ``.hydra/config.yaml``) on tiny synthetic phantoms."""
    from medseg.train import train

    root = tmp_path_factory.mktemp("predict_data")
    synthetic.build(root, seed=2, num_train=4, num_test=1, shape=(32, 32, 12))
    run_dir = tmp_path_factory.mktemp("predict_run")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=TINY_RUN, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        cfg.paths.data_dir = str(root)
    train(cfg)
    saved = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # what Hydra writes to .hydra/
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    GlobalHydra.instance().clear()
    return run_dir


@pytest.fixture(scope="session")
def phantom_scan(tmp_path_factory) -> dict:
    """A CT phantom (HU) on an oblique LPS grid, as NIfTI with distinct qform/sform codes (1 and 2)."""
    from medseg.data.prepare.synthetic import make_phantom

    image, label, affine = make_phantom(
        4, shape=(36, 30, 10), spacing=(2.6, 2.3, 4.0), orientation="LPS", oblique_degrees=17.0, oblique_axis=(1, 1, 0)
    )
    folder = tmp_path_factory.mktemp("phantom_scan")
    nifti = nib.Nifti1Image(np.round(image).astype(np.int16), affine)  # as write_dicom_series stores it
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=2)
    path = folder / "oblique_ct.nii.gz"
    nib.save(nifti, path)
    return {"path": path, "image": np.asarray(image), "label": np.asarray(label), "affine": affine}


@pytest.fixture(scope="session")
def litemedsam_model():
    """The built-in LiteMedSAM as ``medseg predict -m litemedsam`` loads it (real weights, CPU)."""
    from medseg.inference.sources import load_model

    return load_model("litemedsam", device="cpu")


def make_blob(depth: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(64, 64, depth)`` dark noisy background (40 +- 5) holding a bright (200 +- 5) ellipsoid through all slices."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(np.arange(64), np.arange(64), np.arange(depth), indexing="ij")
    blob = ((x - 30) / 14) ** 2 + ((y - 34) / 10) ** 2 + ((z - (depth - 1) / 2) / (depth + 1)) ** 2 <= 1
    volume = 40.0 + rng.normal(0, 5, blob.shape)
    volume[blob] = 200.0 + rng.normal(0, 5, int(blob.sum()))
    return volume.astype(np.float32), blob


@pytest.fixture(name="blob", scope="session")
def _blob_fixture():
    """The :func:`make_blob` factory."""
    return make_blob


@pytest.fixture(name="encoder_counter")
def _encoder_counter():
    """``count(model)``: a dict whose ``"images"`` counts the slices ``model.encode`` receives from then on."""
    patched = []

    def count(model):
        counter = {"images": 0}
        original = model.encode

        def encode(images):
            counter["images"] += int(images.shape[0])
            return original(images)

        model.encode = encode
        patched.append(model)
        return counter

    yield count
    for model in patched:
        del model.encode
