"""Shared inputs of the prediction tests: tiny trained dense run folders (CT, MRI), oblique LPS scans, LiteMedSAM, a
blob."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from medseg.cli import main
from medseg.config import CONFIG_DIR
from medseg.data.prepare import synthetic

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


def train_run_folder(overrides: list[str], root: Path, run_dir: Path, data_seed: int, shape: tuple[int, int, int]):
    """Train ``medseg train <overrides>`` on fresh synthetic phantoms into ``run_dir`` as a real run folder.

    The folder holds the checkpoints and ``.hydra/config.yaml`` (what Hydra writes), so model loaders see exactly
    what `medseg train` leaves behind.
    """
    from medseg.workflows.training import train

    synthetic.build(root, seed=data_seed, num_train=4, num_test=1, shape=shape)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
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
def run_folder_trainer():
    """:func:`train_run_folder`, for test modules that train their own kind of run."""
    return train_run_folder


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory) -> Path:
    """A run folder of ``medseg train`` (checkpoint + ``.hydra/config.yaml``) on tiny synthetic phantoms."""
    root, run_dir = tmp_path_factory.mktemp("predict_data"), tmp_path_factory.mktemp("predict_run")
    return train_run_folder(TINY_RUN, root, run_dir, data_seed=2, shape=(32, 32, 12))


@pytest.fixture(scope="session")
def mri_run(tmp_path_factory) -> Path:
    """Like ``dense_run``, with the MRI preprocessing (foreground percentiles and z-score, ``ForegroundZScored``)."""
    root, run_dir = tmp_path_factory.mktemp("predict_mri_data"), tmp_path_factory.mktemp("predict_mri_run")
    overrides = [*TINY_RUN, "data/preprocess=mri", "data.preprocess.spacing=[2,2,2]"]
    return train_run_folder(overrides, root, run_dir, data_seed=3, shape=(32, 32, 12))


@pytest.fixture(scope="session")
def predict_cli():
    """``medseg predict -m RUN --prompts <prompts as JSON>`` on one scan, through the CLI; the written label map."""

    def predict(run: Path, image: Path, prompts: dict, out: Path) -> nib.Nifti1Image:
        out.mkdir(parents=True, exist_ok=True)
        file = out / "prompts.json"
        file.write_text(json.dumps(prompts))
        code = main(["predict", "-i", str(image), "-o", str(out), "-m", str(run), "--prompts", str(file),
                     "--device", "cpu", "--no-progress"])  # fmt: skip
        assert code == 0
        return nib.load(out / image.name)

    return predict


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
    from medseg.workflows.models import load_model

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
