"""Whole-volume logits: the 2D resize/pad pair matches the training config, slices and windows are stitched right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medseg.data.transforms import build_transforms
from medseg.errors import ConfigError
from medseg.inference import InferenceError, from_model_output, predict_logits, to_model_input
from medseg.inference.sliding import CUDA_SLICE_BATCH, slice_batch_size

SLICES_2D = Path(__file__).resolve().parents[2] / "conf" / "data" / "sampling" / "slices_2d.yaml"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def label_volume(shape=(30, 22, 12)) -> torch.Tensor:
    """Two ellipsoids (labels 1 and 2) in a non-cubic volume."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    label = np.zeros(shape, dtype=np.int64)
    label[((grid[0] + 0.3) / 0.45) ** 2 + (grid[1] / 0.6) ** 2 + (grid[2] / 0.7) ** 2 < 1] = 1
    label[((grid[0] - 0.45) / 0.35) ** 2 + ((grid[1] - 0.2) / 0.5) ** 2 + (grid[2] / 0.6) ** 2 < 1] = 2
    return torch.from_numpy(label)


class ThresholdModel(torch.nn.Module):
    """A 'model' whose logits are the one-hot of its input thresholded to a class.

    The input has one channel per class (the label's one-hot), so bilinear resizing cannot invent a third class
    between two others, as it would on a single intensity channel; what remains to test is the geometry.
    """

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        classes = x.argmax(dim=1)
        return torch.nn.functional.one_hot(classes, self.num_classes).movedim(-1, 1).float() * 10


@pytest.mark.parametrize("size", [16, 64])
def test_to_model_input_matches_the_training_config(size):
    config = OmegaConf.create({"data": {"sampling": OmegaConf.load(SLICES_2D)}})
    config.data.sampling.size = size
    resize, pad = build_transforms(config.data.sampling.transforms[1:])  # after RandSliced
    rng = np.random.default_rng(0)
    slices = torch.from_numpy(rng.normal(size=(3, 2, 37, 23)).astype(np.float32))
    batch, geometry = to_model_input(slices, size)
    for n in range(3):
        expected = pad(resize({"image": slices[n], "label": slices[n, :1]}))["image"]
        assert tuple(expected.shape) == (2, size, size)
        torch.testing.assert_close(batch[n], torch.as_tensor(expected), rtol=0, atol=1e-6)
    assert geometry.original == (37, 23) and geometry.resized == (size, round(23 * size / 37))
    assert float(batch[..., geometry.resized[0] :, :].abs().sum()) == 0  # zero padding at the end
    assert float(batch[..., :, geometry.resized[1] :].abs().sum()) == 0


@pytest.mark.parametrize("size", [16, 64])
def test_slice_round_trip_reproduces_labels(size):
    label = label_volume()[:, :, 6]  # (30, 22)
    one_hot = torch.nn.functional.one_hot(label, 3).permute(2, 0, 1)[None].float() * 10
    batch, geometry = to_model_input(one_hot, size)
    restored = from_model_output(batch, geometry)
    assert restored.shape == (1, 3, 30, 22)
    predicted = restored[0].argmax(0).numpy()
    for value in (1, 2):
        assert dice(predicted == value, label.numpy() == value) > (0.99 if size > 30 else 0.85)


def test_low_resolution_model_outputs_are_scaled_back():
    label = label_volume()[:, :, 6]
    one_hot = torch.nn.functional.one_hot(label, 3).permute(2, 0, 1)[None].float()
    batch, geometry = to_model_input(one_hot, 64)
    low = torch.nn.functional.avg_pool2d(batch, 2)  # a SAM-like half-resolution mask output
    predicted = from_model_output(low, geometry)[0].argmax(0).numpy()
    assert predicted.shape == (30, 22)
    assert dice(predicted == 1, label.numpy() == 1) > 0.95


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_2d_prediction_restores_the_label_volume(slice_axis):
    label = label_volume()
    image = torch.nn.functional.one_hot(label, 3).movedim(-1, 0).float()
    model = ThresholdModel().train()
    logits = predict_logits(model, image, spatial_dims=2, roi_size=48, sw_batch_size=5, slice_axis=slice_axis)
    assert logits.shape == (3, *label.shape) and logits.dtype == torch.float32
    assert model.training, "the model's mode is restored"
    assert all(shape[0] <= 5 and shape[2:] == (48, 48) for shape in model.seen)
    assert sum(shape[0] for shape in model.seen) == label.shape[slice_axis]
    predicted = logits.argmax(0).numpy()
    for value in (1, 2):
        assert dice(predicted == value, label.numpy() == value) > 0.99


def test_3d_window_covering_the_volume_equals_the_direct_forward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 3, padding=1)
    )
    image = torch.randn(2, 12, 10, 8)
    logits = predict_logits(model, image, spatial_dims=3, roi_size=(12, 10, 8), sw_batch_size=2)
    with torch.no_grad():
        direct = model(image[None])[0]
    assert logits.shape == (3, 12, 10, 8)
    torch.testing.assert_close(logits, direct, rtol=1e-5, atol=1e-5)


class WindowMean(torch.nn.Module):
    """Each window's output is its own mean intensity everywhere: makes the blending of windows visible."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x).clone()


def test_overlapping_windows_blend():
    image = torch.arange(8, dtype=torch.float32).reshape(1, 8, 1, 1).expand(1, 8, 4, 4).contiguous()
    # roi 6 with 50 % overlap on 8 voxels: windows [0, 6) (mean 2.5) and [2, 8) (mean 4.5), overlapping on [2, 6).
    constant = predict_logits(WindowMean(), image, 3, (6, 4, 4), overlap=0.5, mode="constant")[0, :, 0, 0]
    torch.testing.assert_close(constant, torch.tensor([2.5, 2.5, 3.5, 3.5, 3.5, 3.5, 4.5, 4.5]))
    gaussian = predict_logits(WindowMean(), image, 3, (6, 4, 4), overlap=0.5, mode="gaussian")[0, :, 0, 0]
    assert gaussian[0] == pytest.approx(2.5) and gaussian[-1] == pytest.approx(4.5)
    assert bool(torch.all(gaussian[2:6] > 2.5)) and bool(torch.all(gaussian[2:6] < 4.5))
    assert bool(torch.all(gaussian[1:] >= gaussian[:-1]))  # weights shift from the first window to the second


def test_argument_and_output_errors():
    image = torch.zeros(1, 8, 8, 8)
    with pytest.raises(ConfigError, match="spatial_dims"):
        predict_logits(WindowMean(), image, spatial_dims=1, roi_size=8)
    with pytest.raises(ConfigError, match="square"):
        predict_logits(ThresholdModel(), image, spatial_dims=2, roi_size=(8, 16))
    with pytest.raises(ConfigError, match="3 sizes"):
        predict_logits(WindowMean(), image, spatial_dims=3, roi_size=(8, 8))
    with pytest.raises(InferenceError, match="tuple"):
        predict_logits(lambda x: (x, x), image, spatial_dims=2, roi_size=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cuda_in_bf16_matches_cpu(spatial_dims):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
    model = torch.nn.Sequential(conv(1, 8, 3, padding=1), torch.nn.ReLU(), conv(8, 3, 3, padding=1))
    image = torch.randn(1, 40, 36, 20)
    roi = (24, 24, 16) if spatial_dims == 3 else 32
    expected = predict_logits(model, image, spatial_dims, roi, overlap=0.5)
    logits = predict_logits(model.cuda(), image, spatial_dims, roi, overlap=0.5, precision="bf16")
    assert logits.device == image.device and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0.05, atol=0.05)


def small_unet(spatial_dims: int) -> torch.nn.Module:
    """A real (untrained, seeded) MONAI UNet with batch norm, in eval mode as at test time."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims, 1, 3, channels=(8, 16), strides=(2,), num_res_units=1, norm="batch").eval()


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_batched_slices_predict_what_one_slice_at_a_time_predicts(one_thread, slice_axis):
    image = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 20, 18, 13)).astype(np.float32))
    model = small_unet(2)
    one = predict_logits(model, image, spatial_dims=2, roi_size=32, sw_batch_size=1, slice_axis=slice_axis)
    every = image.shape[slice_axis + 1]
    batched = predict_logits(model, image, spatial_dims=2, roi_size=32, sw_batch_size=every, slice_axis=slice_axis)
    torch.testing.assert_close(batched, one, rtol=1e-4, atol=1e-4)
    assert torch.equal(batched.argmax(0), one.argmax(0)), "identical labels"


def test_batched_windows_predict_what_one_window_at_a_time_predicts(one_thread):
    image = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 20, 18, 13)).astype(np.float32))
    model = small_unet(3)
    one = predict_logits(model, image, spatial_dims=3, roi_size=(8, 8, 8), sw_batch_size=1)
    batched = predict_logits(model, image, spatial_dims=3, roi_size=(8, 8, 8), sw_batch_size=64)
    torch.testing.assert_close(batched, one, rtol=1e-4, atol=1e-4)
    assert torch.equal(batched.argmax(0), one.argmax(0))


def test_slice_batch_follows_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert slice_batch_size(cpu, 8, 13) == 8  # a CPU keeps the run's setting
    assert slice_batch_size(cuda, 8, 13) == 13  # a GPU takes the whole quickstart slab at once
    assert slice_batch_size(cuda, 8, 500) == CUDA_SLICE_BATCH
    assert slice_batch_size(cuda, 64, 500) == 64  # never fewer than asked
    assert slice_batch_size(cuda, 4, 2) == 4


class RunsOutOfMemory(torch.nn.Module):
    """Raises CUDA's out-of-memory error for batches larger than ``fits``; otherwise a 1x1 convolution."""

    def __init__(self, fits: int, conv: type = torch.nn.Conv2d) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fits, self.conv, self.batches = fits, conv(1, 2, 1), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        if x.shape[0] > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.conv(x)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_batch_out_of_gpu_memory_is_halved(spatial_dims):
    conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
    image = torch.randn(1, 16, 16, 12)
    roi = 16 if spatial_dims == 2 else (8, 8, 6)
    model = RunsOutOfMemory(fits=3, conv=conv)
    logits = predict_logits(model, image, spatial_dims, roi, sw_batch_size=8, overlap=0.0)
    assert 8 in model.batches and max(b for b in model.batches[model.batches.index(2) :]) <= 3
    expected = predict_logits(RunsOutOfMemory(fits=99, conv=conv), image, spatial_dims, roi, 1, overlap=0.0)
    torch.testing.assert_close(logits, expected)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        predict_logits(RunsOutOfMemory(fits=0, conv=conv), image, spatial_dims, roi, sw_batch_size=4)
