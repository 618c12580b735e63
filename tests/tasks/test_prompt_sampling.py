"""ClickState on the host and on the device: the reference's clicks, round after round, and the same training loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.config import instantiate
from medseg.errors import ConfigError
from medseg.prompts import ClickSimulator, Prompts, pad_points
from medseg.prompts.device_clicks import DeviceClickSimulator
from medseg.prompts.host_clicks import correction_clicks as host_correction_clicks
from medseg.tasks import prompt_sampling
from medseg.tasks.prompt_sampling import ClickState
from medseg.tasks.promptable import PromptableTask

SPACING_3D = (0.8, 0.8, 2.5)  # anisotropic: mm distances move the clicks away from the thin axes


def objects_2d() -> np.ndarray:
    """Four 2-D objects: a square, an L, two blobs (two error regions of equal size), an empty one."""
    gt = np.zeros((4, 20, 24), dtype=bool)
    gt[0, 3:15, 4:16] = True
    gt[1, 2:18, 3:8] = True
    gt[1, 13:18, 3:20] = True
    gt[2, 2:8, 2:8] = True
    gt[2, 10:16, 14:20] = True
    return gt  # item 3 stays empty: only false positives can be clicked there


def objects_3d() -> np.ndarray:
    """Three 3-D objects on an anisotropic grid: a slab, a ball-ish blob with a hole, an empty one."""
    gt = np.zeros((3, 14, 12, 8), dtype=bool)
    gt[0, 2:12, 3:9, 2:6] = True
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in (14, 12, 8)), indexing="ij"))
    centre, scale = np.array([7, 6, 4])[:, None, None, None], np.array([1, 1, 2.5])[:, None, None, None]
    ball = (((grid - centre) * scale) ** 2).sum(0)
    gt[1] = (ball < 30) & ~((grid[0] == 7) & (grid[1] == 6))
    return gt


def predictions(gt: np.ndarray, rounds: int, perfect: int, seed: int) -> list[np.ndarray]:
    """Per round, noisy predictions (flipped voxels and shifted objects) and one item predicted perfectly."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(rounds):
        pred = np.roll(gt, shift=r % 3 - 1, axis=1) ^ (rng.random(gt.shape) < 0.04)
        pred[perfect] = gt[perfect]
        out.append(pred)
    return out


def first_prompts(gt: np.ndarray, kind: str) -> Prompts:
    """A first prompt set: ragged clicks (1-3 per item, padding in the middle of one row) or boxes only."""
    batch, dims = gt.shape[0], gt.ndim - 1
    if kind == "box":
        box = np.zeros((batch, 2 * dims), dtype=np.float32)
        box[:, dims:] = np.asarray(gt.shape[1:]) - 1
        return Prompts(box=box, class_vector=np.ones((batch, 1), dtype=np.int64))
    coords = [np.argwhere(m)[: 1 + b % 3] if m.any() else np.zeros((1, dims), int) for b, m in enumerate(gt)]
    labels = [np.ones(len(c), dtype=np.int64) if m.any() else np.zeros(1, np.int64) for c, m in zip(coords, gt)]
    point_coords, point_labels = pad_points(coords, labels)
    # a padding column in the middle and an all-padding column at the end: both paths pack the real clicks first
    point_coords = torch.cat([point_coords[:, :1], torch.full_like(point_coords[:, :1], 5.0), point_coords[:, 1:]], 1)
    point_labels = torch.cat([point_labels[:, :1], torch.full_like(point_labels[:, :1], -1), point_labels[:, 1:]], 1)
    point_coords = torch.cat([point_coords, torch.zeros_like(point_coords[:, :1])], 1)
    point_labels = torch.cat([point_labels, torch.full_like(point_labels[:, :1], -1)], 1)
    return Prompts(point_coords=point_coords, point_labels=point_labels, class_vector=np.ones((batch, 1), np.int64))


def assert_same_rounds(gt: np.ndarray, prompts: Prompts, simulator: ClickSimulator, rounds: int, perfect: int) -> None:
    """The host and device states give, round after round, the clicks of ClickSimulator.next_click item by item."""
    reference = ClickState(prompts, simulator)
    device = ClickState(prompts, simulator, on_device=True)
    given = [[(tuple(int(v) for v in c), lab) for c, lab in zip(coords, labels)]
             for coords, labels in zip(reference.coords, reference.labels)]  # fmt: skip
    prev = torch.zeros(gt.shape[0], 1, *gt.shape[1:])
    for index, pred in enumerate(predictions(gt, rounds, perfect, seed=gt.ndim)):
        for clicks, g, p in zip(given, gt, pred):  # the reference, object after object
            click = simulator.next_click(g, p, clicks)
            clicks += [] if click is None else [click]
        added = reference.add_corrections(gt, pred)
        assert reference.coords == [[tuple(float(v) for v in c) for c, _ in clicks] for clicks in given]
        assert reference.labels == [[lab for _, lab in clicks] for clicks in given]
        assert device.add_corrections(torch.from_numpy(gt), torch.from_numpy(pred)) == added
        assert added < gt.shape[0]  # the perfectly predicted item got no click
        want, got = reference.prompts(prev, "cpu"), device.prompts(prev, "cpu")
        assert torch.equal(got.point_coords, want.point_coords), (index, got.point_coords, want.point_coords)
        assert torch.equal(got.point_labels, want.point_labels), (index, got.point_labels, want.point_labels)
        assert got.point_coords.dtype == torch.float32 and got.point_labels.dtype == torch.long
        assert device.counts() == reference.counts() and device.labels == reference.labels
        assert device.coords == reference.coords
    assert sum(reference.counts()) > gt.shape[0] + rounds  # several rounds of real corrections were compared


@pytest.mark.parametrize("kind", ["points", "box"])
def test_device_rounds_give_the_reference_prompts_in_2d(kind):
    gt = objects_2d()
    assert_same_rounds(gt, first_prompts(gt, kind), ClickSimulator(spacing=(0.7, 1.3)), rounds=5, perfect=0)


@pytest.mark.parametrize("kind", ["points", "box"])
def test_device_rounds_give_the_reference_prompts_in_3d(kind):
    gt = objects_3d()
    simulator = ClickSimulator(spacing=SPACING_3D, connectivity=3)
    assert_same_rounds(gt, first_prompts(gt, kind), simulator, rounds=4, perfect=1)


def test_device_state_keeps_its_clicks_as_tensors_and_follows_the_simulator():
    gt = objects_2d()
    simulator = ClickSimulator(spacing=(0.7, 1.3), connectivity=2, avoid_repeats=False)
    state = ClickState(first_prompts(gt, "points"), simulator, on_device=True)
    device = state.device_simulator
    assert isinstance(device, DeviceClickSimulator)
    assert (device.spacing, device.connectivity, device.avoid_repeats) == ((0.7, 1.3), 2, False)
    assert state.counts() == [1, 2, 3, 1]  # packed: the padding in the middle of the rows is gone
    state.add_corrections(torch.from_numpy(gt), torch.zeros(gt.shape, dtype=torch.bool))
    coords, labels = state.point_tensors()
    assert isinstance(coords, torch.Tensor) and coords.shape == (4, 4, 2) and labels[:, 0].tolist() == [1, 1, 1, 0]
    assert labels.tolist()[3] == [0, -1, -1, -1]  # the empty object predicted empty: nothing to click
    # a user's NumPy masks are moved to the state's device rather than refused
    assert state.add_corrections(gt, np.zeros_like(gt)) == 3


def test_clicks_on_device_option_is_checked_and_auto_follows_the_device(compose_config, tmp_path):
    cfg = compose_config(["experiment=promptable_synthetic"], tmp_path)
    assert cfg.task.clicks_on_device == "auto"
    model = instantiate(cfg.model, num_classes=4, in_channels=1)
    task = instantiate(cfg.task, model=model)
    assert task.clicks_on_device == "auto" and task.hparams["clicks_on_device"] == "auto"
    assert not task.clicks_on(torch.device("cpu")) and task.clicks_on(torch.device("cuda", 0))
    assert instantiate(cfg.task, model=model, clicks_on_device=True).clicks_on(torch.device("cpu"))
    assert not instantiate(cfg.task, model=model, clicks_on_device="false").clicks_on(torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"task.clicks_on_device must be auto, true or false, got 'gpu'"):
        instantiate(cfg.task, model=model, clicks_on_device="gpu")


def training_batch(shape: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """Two items of a multi-class phantom: a random image and three labelled boxes (one missing in item 1)."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.zeros(2, 1, *shape, dtype=torch.long)
    quarter = [n // 4 for n in shape]
    label[(slice(None), 0, *(slice(q, 2 * q + 1) for q in quarter))] = 1
    label[(slice(None), 0, *(slice(2 * q, 3 * q + 1) for q in quarter))] = 2
    label[(0, 0, *(slice(0, q) for q in quarter))] = 3
    return {"image": torch.rand(2, 1, *shape, generator=generator), "label": label}


def recorded_training_step(task: PromptableTask, batch: dict, monkeypatch) -> tuple[torch.Tensor, list, dict]:
    """The loss and gradients of one training step, the prompts of every decoding round, and which simulator ran."""
    rounds, calls = [], {"host": 0, "device": 0}
    decode = task.model.decode

    def recording_decode(embeddings, prompts, multimask):
        rounds.append((prompts.point_coords, prompts.point_labels))
        return decode(embeddings, prompts, multimask=multimask)

    def counting(kind, method):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return method(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(task.model, "decode", recording_decode)
    monkeypatch.setattr(prompt_sampling, "host_correction_clicks", counting("host", host_correction_clicks))
    monkeypatch.setattr(
        DeviceClickSimulator, "correction_clicks", counting("device", DeviceClickSimulator.correction_clicks)
    )
    task.model.zero_grad()
    loss = task.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}
    monkeypatch.undo()
    return loss.detach(), rounds, {"calls": calls, "grads": grads}


@pytest.mark.parametrize(
    ("experiment", "shape", "seeds"),
    [("promptable_synthetic", (64, 64), (0, 1, 2)), ("promptable_synthetic_3d", (32, 32, 16), (0,))],
)
def test_training_step_gives_the_same_loss_with_clicks_on_the_device(
    one_thread, compose_config, tmp_path, monkeypatch, experiment, shape, seeds
):
    cfg = compose_config([f"experiment={experiment}", "task.num_iterations=3"], tmp_path)
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_classes=4, in_channels=1)
    batch = training_batch(shape, seed=len(shape))
    kinds = set()
    for seed in seeds:  # the seed draws the first prompt type: clicks, or a box (then corrections are the only clicks)
        results = {}
        for on_device in (False, True):
            task = instantiate(cfg.task, model=model, seed=seed, clicks_on_device=on_device)
            results[on_device] = recorded_training_step(task, batch, monkeypatch)
        (ref_loss, ref_rounds, ref), (dev_loss, dev_rounds, dev) = results[False], results[True]
        assert ref["calls"] == {"host": 2, "device": 0}  # one batched call per correction round
        assert dev["calls"] == {"host": 0, "device": 2}
        assert torch.equal(dev_loss, ref_loss), (seed, dev_loss, ref_loss)
        assert ref["grads"].keys() == dev["grads"].keys()
        assert all(torch.equal(dev["grads"][n], g) for n, g in ref["grads"].items())
        assert len(dev_rounds) == len(ref_rounds) == 3
        for (dev_coords, dev_labels), (ref_coords, ref_labels) in zip(dev_rounds, ref_rounds):
            assert (dev_coords is None) == (ref_coords is None)
            if ref_coords is not None:
                assert torch.equal(dev_coords, ref_coords) and torch.equal(dev_labels, ref_labels)
        kinds.add(ref_rounds[0][0] is None)
        assert ref_rounds[-1][0] is not None and ref_rounds[-1][0].shape[1] >= 2  # corrections were made
    if len(seeds) > 1:
        assert kinds == {True, False}  # both a box-first and a clicks-first batch were compared
