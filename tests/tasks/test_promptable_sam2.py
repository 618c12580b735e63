"""SAM 2 in the promptable task: the smoke experiment trains, evaluates interactively and resumes; sequences of slices
train through SAM 2's memory; every trainable parameter gets a gradient (DDP), also in a 2-process gloo run."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from medseg.backbones.sam2_configs import MISSING_EXTRA, require_sam2
from medseg.config import instantiate
from medseg.errors import ConfigError
from medseg.evaluation.summary import is_complete, read_summary
from medseg.models.promptable import build_promptable
from medseg.models.sam2_promptable import Sam2PromptableSegmenter
from medseg.prompts.contract import Prompts
from medseg.tasks.prompt_sampling import sequence_targets
from medseg.tasks.promptable import PromptableTask
from medseg.workflows.models import load_model
from medseg.workflows.training import train

try:
    require_sam2()
except ConfigError:
    pytest.skip(MISSING_EXTRA, allow_module_level=True)

QUICK = [
    "experiment=promptable_synthetic_sam2",
    "logger=csv",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "data.batch_size=3",  # 6 training cases (fold 0 of 8) -> 2 steps per epoch: runs stop at epoch ends
    "data.sampling.num_samples=1",
    "task.num_iterations=2",
    "trainer.check_val_every_n_epoch=1000",
    "seed=0",
    "+task.scheduler.total_iters=4",  # the schedule's length must not depend on where the run was cut
]
EVALUATION = ["task.evaluation.max_clicks=2", "task.evaluation.dice_k=2", "task.evaluation.max_objects=1"]
SEQUENCES = ["data/sampling=patches_3d", "data.sampling.patch_size=[64,64,3]", "task.sequence_length=3"]
TINY = {"embed_dim": 16, "num_heads": 1, "stages": [1, 1, 2, 1], "global_att_blocks": [3]}


def _last(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_smoke_experiment_trains_evaluates_and_resumes(one_thread, small_synthetic_root, tmp_path, compose_config):
    run_dir = tmp_path / "run"
    exact = ["trainer=deterministic", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    cfg = compose_config([*QUICK, *exact, *EVALUATION, "trainer.max_steps=2"], run_dir, small_synthetic_root)
    assert cfg.model.backbone == "sam2_hiera_t" and cfg.task.sequence_length == 1
    train(cfg)
    summary = read_summary(run_dir / "summary.json")
    assert is_complete(run_dir / "summary.json")
    fg = summary["interactive"]["foreground_mean"]
    assert len(fg["dice_at_k"]) == 2 and all(0.0 <= d <= 1.0 for d in fg["dice_at_k"])
    first = _last(run_dir)
    assert first["global_step"] == 2
    assert not any(".sam2.image_encoder." in k for k in first["state_dict"])  # the encoder is stored once

    resume = [*QUICK, *exact, "trainer.max_steps=4", "evaluate=false", "resume=true"]
    train(compose_config(resume, run_dir, small_synthetic_root))
    second = _last(run_dir)
    assert second["global_step"] == 4
    assert any(not torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in second["state_dict"])
    straight = tmp_path / "straight"  # 4 steps in one go end with the resumed run's weights
    train(compose_config([*QUICK, *exact, "trainer.max_steps=4", "evaluate=false"], straight, small_synthetic_root))
    expected = _last(straight)["state_dict"]
    assert expected.keys() == second["state_dict"].keys()
    assert all(torch.equal(expected[k], second["state_dict"][k]) for k in expected)

    saved = cfg.copy()  # the config Hydra saves in a run folder, which `-m RUN` rebuilds the model from
    with open_dict(saved):
        del saved["hydra"]
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    loaded = load_model(run_dir, device="cpu", ckpt="last")  # what `medseg predict -m RUN` and napari load
    assert loaded.kind == "promptable" and isinstance(loaded.model, Sam2PromptableSegmenter)
    with torch.no_grad():
        logits, iou = loaded.model(torch.rand(1, 1, 64, 64), Prompts(box=[[10.0, 12.0, 40.0, 44.0]]))
    assert logits.shape == (1, 1, 64, 64) and torch.isfinite(logits).all() and iou.shape == (1, 1)


def test_sequences_train_through_memory(one_thread, small_synthetic_root, tmp_path, compose_config):
    run_dir = tmp_path / "sequences"
    train(compose_config([*QUICK, *SEQUENCES, "trainer.max_steps=2", "evaluate=false"], run_dir, small_synthetic_root))
    state = _last(run_dir)
    assert state["global_step"] == 2 and state["hyper_parameters"]["sequence_length"] == 3
    losses = (run_dir / "logs" / "csv").rglob("metrics.csv")
    assert any("train/loss" in path.read_text() for path in losses)


def _sequence_batch() -> dict[str, torch.Tensor]:
    """Two 3-slice items: a square that moves and shrinks (class 1) and a bar (class 2) from slice 1 on."""
    label = torch.zeros(2, 1, 64, 64, 3)
    for t in range(3):
        label[:, 0, 10 + 4 * t : 30, 12 : 34 - 3 * t, t] = 1
    label[:, 0, 40:50, 5:60, 1:] = 2
    image = label * 0.4 + 0.1 * torch.rand(2, 1, 64, 64, 3)
    return {"image": image, "label": label}


@pytest.mark.parametrize("sequence_length", [1, 3])
def test_every_trainable_parameter_gets_a_gradient(sequence_length):
    """DDP without find_unused_parameters: the task freezes what its training mode never reaches."""
    torch.manual_seed(0)
    model = build_promptable("sam2_hiera_t", pretrained=False, img_size=64, arch=TINY)
    task = PromptableTask(
        model, instantiate({"_target_": "monai.losses.DiceFocalLoss", "sigmoid": True}), torch.optim.AdamW,
        num_iterations=2, sequence_length=sequence_length, prompt_mix={"points": 1.0},
    )  # fmt: skip
    batch = _sequence_batch()
    if sequence_length == 1:
        batch = {k: v[..., 0] for k, v in batch.items()}
    loss = task.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    memory = [p for n, p in model.named_parameters() if n.startswith("sam2.memory_attention.")]
    assert all(p.requires_grad for p in memory) is (sequence_length > 1)
    if sequence_length > 1:  # the following slices' losses reach the memory attention and encoder
        assert any(p.grad.abs().sum() > 0 for p in memory)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.sam2.memory_encoder.parameters())


def test_sequence_checks_name_the_fix():
    litemedsam_like = build_promptable("sam_vit_b", pretrained=False, img_size=64, arch={
        "depth": 2, "embed_dim": 32, "num_heads": 2, "global_attn_indexes": [1]})  # fmt: skip
    loss = instantiate({"_target_": "monai.losses.DiceFocalLoss", "sigmoid": True})
    with pytest.raises(ConfigError, match="SAM 2's memory.*backbone=sam2_hiera_t"):
        PromptableTask(litemedsam_like, loss, torch.optim.AdamW, sequence_length=3)
    model = build_promptable("sam2_hiera_t", pretrained=False, img_size=64, arch=TINY)
    task = PromptableTask(model, loss, torch.optim.AdamW, sequence_length=4)
    with pytest.raises(ConfigError, match=r"patch_size=\[64, 64, 4\]"):
        task.training_step(_sequence_batch(), 0)


def test_sequence_targets_follow_the_first_slice_object():
    labels = torch.zeros(1, 3, 1, 8, 8)
    labels[0, :, 0, 1:3, 1:3] = 1  # a tube of class 1 through every slice
    labels[0, 2, 0, 5:7, 5:7] = 1  # another class-1 blob on the last slice only (not connected to the tube)
    labels[0, 1:, 0, 6:8, 0:2] = 2
    first = (labels[:, 0] == 1).float()
    by_class = sequence_targets(labels, first, torch.tensor([1]), "class")
    assert by_class.shape == (1, 3, 1, 8, 8) and by_class[0, 2].sum() == 8  # tube + blob
    by_component = sequence_targets(labels, first, torch.tensor([1]), "component")
    assert by_component[0, 2].sum() == 4 and by_component[0, 2, 0, 5:7, 5:7].sum() == 0  # the tube only
    assert sequence_targets(labels, first * 0, torch.tensor([0]), "class").sum() == 0  # no object: empty throughout


def test_ddp_two_cpu_processes_agree(ddp_digests):
    rank0, rank1, _ = ddp_digests([*QUICK, "data.num_workers=0"], steps=2, timeout=900)
    assert rank0[1] == rank1[1] == "2" and rank0[0] == rank1[0]  # identical weights after the all-reduce
