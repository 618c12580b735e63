"""`-m` sources: run checkpoints read weights-only (a pickle refused unrun, old ones load); SAM 2 files named."""

from __future__ import annotations

import shutil

import pytest
import torch

from medseg.backbones.weights import load_checkpoint
from medseg.cli import main
from medseg.errors import WeightsError
from medseg.inference.sources import is_sam2_file, load_sam2_file, sam2_name_of
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


def _sam2_state(width: int, blocks: int) -> dict[str, torch.Tensor]:
    """The keys :func:`sam2_name_of` reads, shaped as in an official SAM 2.1 file of that Hiera."""
    state = {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(width, 3, 7, 7)}
    state.update({f"image_encoder.trunk.blocks.{i}.norm1.weight": torch.zeros(width) for i in range(blocks)})
    state["memory_attention.layers.0.self_attn.q_proj.weight"] = torch.zeros(256, 256)
    return state


@pytest.mark.parametrize(
    ("width", "blocks", "filename", "name"),
    [
        (96, 12, "sam2.1_hiera_tiny.pt", "sam2_hiera_t"),
        (96, 12, "MedSAM2_latest.pt", "medsam2"),
        (96, 16, "sam2.1_hiera_small.pt", "sam2_hiera_s"),
        (112, 24, "weights.pt", "sam2_hiera_b_plus"),
        (144, 48, "sam2.1_hiera_large.pt", "sam2_hiera_l"),
    ],
)
def test_sam2_files_are_named_by_their_hiera(width, blocks, filename, name):
    assert sam2_name_of(filename, _sam2_state(width, blocks)) == name


def test_files_that_are_not_sam2_are_refused_with_the_reason(tmp_path):
    with pytest.raises(WeightsError, match=r"x\.pt is not a SAM 2 / MedSAM2 checkpoint: it lacks memory_attention"):
        sam2_name_of("x.pt", {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)})
    with pytest.raises(WeightsError, match="80 wide with 12 blocks is none of SAM 2.1's: sam2_hiera_t"):
        sam2_name_of("x.pt", _sam2_state(80, 12))
    other = tmp_path / "other.pt"
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, other)
    assert is_sam2_file(other) and not is_sam2_file(tmp_path) and not is_sam2_file(tmp_path / "absent.pt")
    with pytest.raises(WeightsError, match="other.pt is not a SAM 2"):
        load_sam2_file(other, "cpu")
