"""`-m RUN --ckpt FILE` reads checkpoints weights-only: a pickled payload is refused unrun; old checkpoints load."""

from __future__ import annotations

import shutil

import torch

from medseg.backbones.weights import load_checkpoint
from medseg.cli import main
from medseg.runs import select_checkpoint
from medseg.workflows.models import load_model


class _WritesMarker:
    """Pickled, it makes the unpickler call ``open(marker, "w")``: a file that appears only if the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_ckpt_with_a_pickle_payload_is_refused_unrun(dense_run, phantom_scan, tmp_path, capsys):
    marker, evil, out = tmp_path / "marker", tmp_path / "evil.ckpt", tmp_path / "out"
    checkpoint = load_checkpoint(select_checkpoint(dense_run, "best"))  # the run's own weights, plus the payload
    torch.save({**checkpoint, "hyper_parameters": {"x": _WritesMarker(marker)}}, evil)
    code = main(["predict", "-m", str(dense_run), "--ckpt", str(evil), "-i", str(phantom_scan["path"]), "-o", str(out),
                 "--device", "cpu", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"checkpoint {evil} is not a plain-weights checkpoint" in err and "truncated" not in err
    assert not marker.exists(), "the pickle ran"
    assert not out.exists() or not any(out.iterdir())


def test_checkpoint_with_a_metatensor_score_still_loads(dense_run, phantom_scan, tmp_path):
    """Checkpoints written before training stopped saving MONAI objects keep a MetaTensor (meta data with NumPy arrays
    and MONAI enums) as ModelCheckpoint's score: they still load, weights-only."""
    from monai.data import MetaTensor
    from monai.transforms import LoadImage

    run = tmp_path / "run"
    shutil.copytree(dense_run, run)
    path = select_checkpoint(run, "best")
    checkpoint = load_checkpoint(path)
    score = LoadImage(image_only=True)(phantom_scan["path"]).float().mean()
    assert isinstance(score, MetaTensor) and score.meta
    checkpoint["callbacks"] = {"ModelCheckpoint{'monitor': 'val/dice_resampled'}": {"best_model_score": score}}
    torch.save(checkpoint, path)

    old, fresh = load_model(run, device="cpu"), load_model(dense_run, device="cpu")
    assert old.weights_id == fresh.weights_id  # the same weights, read weights-only from the old layout
