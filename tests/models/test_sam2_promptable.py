"""The SAM 2 promptable model: masks of SAM2ImagePredictor, SAM 2's own memory step, packed embeddings, one copy of
the encoder weights, adapters on Hiera, and the parameters each training mode reaches.

The reference is ``sam2``'s ``build_sam2`` (its configs composed through its own Hydra module) with every parameter
perturbed, saved in the official file layout; the real Hiera-T config at 128 px keeps the file quick.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import save_file

from medseg.backbones.sam2 import IMAGENET_MEAN, IMAGENET_STD
from medseg.backbones.sam2_configs import MISSING_EXTRA, require_sam2
from medseg.errors import ConfigError, InputShapeError
from medseg.models.promptable import build_promptable
from medseg.models.sam2_promptable import Sam2Memory, Sam2PromptableSegmenter
from medseg.prompts.contract import Prompts

try:
    require_sam2()
except ConfigError:
    pytest.skip(MISSING_EXTRA, allow_module_level=True)

SIZE = 128
ATOL = 1e-4
TINY = {"embed_dim": 16, "num_heads": 1, "stages": [1, 1, 2, 1], "global_att_blocks": [3]}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(reference SAM2Base in eval mode, path of its weights in the official Hiera-T file layout)."""
    from sam2.build_sam import build_sam2

    overrides = [f"++model.image_size={SIZE}"] + [
        f"++model.memory_attention.layer.{part}.feat_sizes=[{SIZE // 16},{SIZE // 16}]"
        for part in ("self_attention", "cross_attention")
    ]
    GlobalHydra.instance().clear()
    with initialize_config_module("sam2", version_base="1.2"):
        reference = build_sam2(
            "configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu", mode="eval", hydra_overrides_extra=overrides
        )
    GlobalHydra.instance().clear()
    torch.manual_seed(0)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    path = tmp_path_factory.mktemp("weights") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": reference.state_dict()}, path)
    return reference, path


@pytest.fixture(scope="module")
def model(official):
    return build_promptable("sam2_hiera_t", checkpoint=official[1], img_size=SIZE, in_channels=3).eval()


def tiny(**kwargs) -> Sam2PromptableSegmenter:
    torch.manual_seed(0)
    return build_promptable("sam2_hiera_t", pretrained=False, img_size=64, arch=TINY, **kwargs)


def rgb(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


@pytest.mark.parametrize("multimask", [True, False])
def test_masks_equal_sam2_image_predictor(official, model, multimask):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    reference, _ = official
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    box_xy = np.array([20.0, 30.0, 90.0, 100.0])
    clicks_xy, labels = np.array([[50.0, 60.0], [80.0, 40.0]]), np.array([1, 0])
    predictor = SAM2ImagePredictor(reference)
    predictor._bb_feat_sizes = [(SIZE // 4,) * 2, (SIZE // 8,) * 2, (SIZE // 16,) * 2]  # hard-coded for 1024 px
    # the prompt contract is in array order: (row, column) clicks and (i0, j0, i1, j1) boxes
    prompts = Prompts(
        point_coords=torch.tensor(clicks_xy[:, ::-1].copy())[None],
        point_labels=torch.tensor(labels)[None],
        box=torch.tensor(box_xy[[1, 0, 3, 2]])[None],
    )
    with torch.no_grad():
        predictor.set_image(image)
        masks, iou, low_res = predictor.predict(
            point_coords=clicks_xy, point_labels=labels, box=box_xy, multimask_output=multimask, return_logits=True
        )
        logits, ours_iou = model.decode(model.encode(rgb(image)), prompts, multimask=multimask)
        # a previous mask as SAM 2's mask input: the predictor's own low-resolution logits
        previous = torch.from_numpy(low_res[:1])[None]
        again, _, _ = predictor.predict(
            point_coords=clicks_xy, point_labels=labels, mask_input=low_res[:1], multimask_output=False,
            return_logits=True,
        )  # fmt: skip
        refined, _ = model(
            rgb(image),
            Prompts(point_coords=prompts.point_coords, point_labels=prompts.point_labels, prev_mask=previous),
        )
    assert logits.shape == (1, 3 if multimask else 1, SIZE, SIZE)
    assert max_diff(logits[0], torch.from_numpy(masks)) <= ATOL
    assert max_diff(ours_iou[0], torch.from_numpy(iou)) <= ATOL
    assert max_diff(refined[0], torch.from_numpy(again)) <= ATOL


def test_packed_embedding_unpacks_to_sam2_features(official, model):
    reference, _ = official
    x = torch.rand(2, 3, SIZE, SIZE)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        embeddings = model.encode(x)
        expected = reference.forward_image((x - mean) / std)  # conv_s0 / conv_s1 applied, as the video path uses
    assert embeddings.shape == (2, 256 + 32 * 16 + 64 * 4, SIZE // 16, SIZE // 16)
    frame = model.frame_features(embeddings)
    assert max_diff(frame.vision, expected["vision_features"]) <= ATOL
    for got, want in zip(frame.high_res, expected["backbone_fpn"][:2], strict=True):
        assert max_diff(got, want) <= ATOL
    assert torch.equal(model.frame_features(embeddings[1:]).high_res[0], frame.high_res[0][1:])  # batch-sliceable
    with pytest.raises(InputShapeError, match="1024 channels"):
        model.frame_features(embeddings[:, :256])


def test_memory_step_equals_sam2_track_step(official, model):
    """A box on frame 0, then frame 1 from memory alone: SAM2Base.track_step's masks and object pointers."""
    reference, _ = official
    frames = torch.rand(2, 1, 3, SIZE, SIZE)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    box_xy = torch.tensor([[20.0, 30.0, 90.0, 100.0]])
    prompts = Prompts(box=box_xy[:, [1, 0, 3, 2]])
    point_inputs = {"point_coords": box_xy.reshape(1, 2, 2), "point_labels": torch.tensor([[2, 3]], dtype=torch.int)}
    memory, expected = Sam2Memory(num_frames=2), {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    with torch.no_grad():
        for t in range(2):
            _, feats, pos, sizes = reference._prepare_backbone_features(
                reference.forward_image((frames[t] - mean) / std)
            )
            want = reference.track_step(
                t, t == 0, feats, pos, sizes, point_inputs if t == 0 else None, None, expected, 2
            )
            expected["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t] = want
            step = model.track(model.encode(frames[t]), memory, t, prompts if t == 0 else None)
            model.remember(memory, t, step)
            for key in ("pred_masks", "pred_masks_high_res", "obj_ptr", "maskmem_features"):
                assert max_diff(step.output[key], want[key]) <= ATOL, (t, key)
    assert set(memory.output_dict["cond_frame_outputs"]) == {0} and set(memory.output_dict["non_cond_frame_outputs"])
    assert step.logits.shape[-2:] == (SIZE, SIZE) and step.iou.shape == step.logits.shape[:2]


def test_state_dict_holds_the_encoder_once_and_round_trips(model, tmp_path):
    state = model.state_dict()
    assert not any(k.startswith("sam2.image_encoder.") for k in state)
    assert any(k.startswith("backbone.image_encoder.trunk.") for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))  # no shared tensors
    fresh = build_promptable("sam2_hiera_t", pretrained=False, img_size=SIZE, in_channels=3).eval()
    fresh.load_state_dict(state, strict=True)
    assert fresh.sam2.image_encoder is fresh.backbone.image_encoder
    x = torch.rand(1, 3, SIZE, SIZE)
    prompts = Prompts(box=torch.tensor([[10.0, 10.0, 100.0, 90.0]]))
    with torch.no_grad():
        assert torch.equal(fresh(x, prompts)[0], model(x, prompts)[0])


def test_scratch_twin_and_contract_checks():
    net = tiny()
    assert isinstance(net, Sam2PromptableSegmenter) and net.image_size == 64 and net.in_channels == 1
    assert set(net.encoder_modules()) == {"backbone", "conv_s0", "conv_s1"}
    with pytest.raises(InputShapeError, match=r"\(B, C, 64, 64\)"):
        net.encode(torch.rand(1, 1, 32, 32))
    with torch.no_grad():
        logits, iou = net(torch.rand(2, 1, 64, 64), Prompts(point_coords=[[[5.0, 6.0]], [[30.0, 40.0]]],
                                                            point_labels=[[1], [1]]), multimask=True)  # fmt: skip
    assert logits.shape == (2, 3, 64, 64) and iou.shape == (2, 3)


@pytest.mark.parametrize("method", ["lora", "dora", "adaptformer", "ssf", "bitfit", "norm"])
def test_adapters_train_on_hiera_with_the_decoder(method):
    net = tiny(adapter={"method": method})
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    encoder = {n for n in trainable if n.startswith("backbone.")}
    assert encoder and encoder <= {f"backbone.{n}" for n in net.adapter_names} | {
        n for n in encoder if method in ("bitfit", "norm")
    }
    assert any(n.startswith("sam2.sam_mask_decoder.") for n in trainable)  # the decoder trains as for SAM
    assert net.sam2.image_encoder is net.backbone.image_encoder  # the adapted encoder is SAM 2's


def _loss_2d(net: Sam2PromptableSegmenter, mask_prompts: bool) -> torch.Tensor:
    embeddings = net.encode(torch.rand(2, 1, 64, 64))
    prompts = Prompts(box=[[4.0, 4.0, 40.0, 50.0], [10.0, 8.0, 60.0, 30.0]])
    logits, iou, scores = net.decode_with_object_score(embeddings, prompts)
    total = logits.square().mean() + iou.square().mean() + scores.square().mean()
    if mask_prompts:  # a correction round: the previous logits, detached, as mask prompt
        logits, _ = net.decode(embeddings, prompts.with_prev_mask(logits.detach()))
        total = total + logits.square().mean()
    return total


def _loss_sequence(net: Sam2PromptableSegmenter, mask_prompts: bool) -> torch.Tensor:
    memory, total = Sam2Memory(num_frames=3), torch.zeros(())
    prompts = Prompts(point_coords=[[[20.0, 30.0]]], point_labels=[[1]])
    for t in range(3):
        embeddings = net.encode(torch.rand(1, 1, 64, 64))
        step = net.track(embeddings, memory, t, prompts if t == 0 else None)
        if t == 0 and mask_prompts:  # a correction round on the prompted frame
            step = net.track(embeddings, memory, t, prompts.with_prev_mask(step.logits[:, :1].detach()))
        net.remember(memory, t, step)
        total = total + step.logits.clamp(-20, 20).square().mean() + step.iou.square().mean()
        total = total + step.object_score_logits.square().mean()
    return total


@pytest.mark.parametrize(("sequence", "mask_prompts"), [(False, True), (False, False), (True, True), (True, False)])
def test_every_trainable_parameter_gets_a_gradient_after_freezing_the_unused(sequence, mask_prompts):
    """What DDP needs: no trainable parameter without a gradient in the chosen training mode."""
    net = tiny().train()
    frozen = net.freeze_unused(sequence, mask_prompts)
    if sequence:
        assert frozen[:3] == ["sam2.no_mem_pos_enc", "sam2.mask_downsample.weight", "sam2.mask_downsample.bias"]
    else:
        assert any(n.startswith("sam2.memory_attention.") for n in frozen)
        assert not any(".pred_obj_score_head." in n for n in frozen)  # 2-D frames train the object score too
    assert any(".mask_downscaling." in n for n in frozen) is not mask_prompts
    (_loss_sequence if sequence else _loss_2d)(net, mask_prompts).backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


HIERA_ADAPTERS = ["adapter3d", "adapter3d_norm", "adaptformer", "bitfit", "dora", "frozen", "full", "lora",
                  "lora_bonly", "lora_norm", "norm", "ssf"]  # fmt: skip


@pytest.mark.parametrize("adapter", HIERA_ADAPTERS)
def test_every_hiera_adapter_config_builds_through_model_promptable_2d(adapter):
    """``medseg train model=promptable_2d backbone=sam2_hiera_t adapter=...``: the SAM 2 model, PEFT on Hiera only."""
    from hydra import compose, initialize_config_dir

    from medseg.config import CONFIG_DIR, instantiate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train", overrides=["model=promptable_2d", "backbone=sam2_hiera_t", "init=scratch", f"adapter={adapter}"]
        )
    torch.manual_seed(0)
    net = instantiate(cfg.model, num_classes=3, in_channels=1, img_size=64, arch=TINY)
    assert isinstance(net, Sam2PromptableSegmenter)
    encoder = [n for n, p in net.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    if adapter == "full":
        assert all(p.requires_grad for p in net.backbone.parameters())
    elif adapter == "frozen":
        assert encoder == []
    else:
        assert encoder and len(encoder) < len(list(net.backbone.parameters()))
    assert all(p.requires_grad for p in net.mask_decoder.parameters())  # the decoder trains as for SAM
    with torch.no_grad():
        logits, _ = net(torch.rand(1, 1, 64, 64), Prompts(box=[[8.0, 8.0, 40.0, 50.0]]))
    assert logits.shape == (1, 1, 64, 64) and torch.isfinite(logits).all()


def test_compiled_decoder_gives_the_eager_masks():
    """``compile=True`` of ``medseg predict`` and napari compiles SAM 2's prompt encoder and mask decoder in place."""
    net = tiny().eval()
    embeddings = net.encode(torch.rand(1, 1, 64, 64)).detach()
    prompts = Prompts(box=[[8.0, 8.0, 40.0, 50.0]], point_coords=[[[20.0, 20.0]]], point_labels=[[1]])
    with torch.no_grad():
        eager = net.decode(embeddings, prompts)[0]
        net.compile_decoder(backend="aot_eager")  # tracing alone, in seconds
        compiled = net.decode(embeddings, prompts)[0]
    assert net.compiled_mode == "aot_eager" and net.click_decoder() is None
    assert max_diff(compiled, eager) <= 1e-5
    assert set(net.state_dict()) == set(tiny().state_dict())  # compiled in place: the keys are unchanged


def test_slice_propagation_and_the_embedding_cache_run_on_sam2(tmp_path):
    """The 2-D promptable path unchanged: propagation through a volume, packed embeddings cached on disk and reused."""
    from medseg.inference.cache import EmbeddingCache
    from medseg.inference.propagate import PropagationConfig, propagate
    from medseg.inference.recipe import SliceRecipe

    net = tiny().eval()
    volume = np.random.default_rng(0).uniform(0, 20, (40, 48, 6)).astype(np.float32)  # every slice its own
    volume[10:30, 12:36] += 200.0
    cache = EmbeddingCache(folder=tmp_path / "cache")
    config, recipe = PropagationConfig(batch_size=2, min_iou=0.0), SliceRecipe("none")
    first = propagate(net, volume, 3, box=(10, 12, 29, 35), config=config, recipe=recipe, cache=cache)
    encoded = cache.misses  # the untrained model's masks may stop the walk early: the slices it did encode
    assert first.mask.shape == volume.shape and encoded >= 1
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == encoded  # one packed tensor per slice
    reread = EmbeddingCache(folder=tmp_path / "cache")
    again = propagate(net, volume, 3, box=(10, 12, 29, 35), config=config, recipe=recipe, cache=reread)
    assert np.array_equal(again.mask, first.mask) and reread.hits >= encoded and reread.misses == 0


def test_decode_gives_the_object_score_of_sam2s_decoder_beside_the_masks():
    """2-D training supervises the object score (memory propagation blanks a frame scored absent)."""
    net = tiny().eval()
    embeddings = net.encode(torch.rand(2, 1, 64, 64))
    prompts = Prompts(box=[[4.0, 4.0, 40.0, 50.0], [10.0, 8.0, 60.0, 30.0]])
    decoded: list[torch.Tensor] = []  # the mask decoder's own object-score output
    hook = net.mask_decoder.register_forward_hook(lambda _m, _i, out: decoded.append(out[3]))
    try:
        with torch.no_grad():
            logits, iou = net.decode(embeddings, prompts)
            with_score = net.decode_with_object_score(embeddings, prompts)
    finally:
        hook.remove()
    assert torch.equal(with_score[0], logits) and torch.equal(with_score[1], iou)
    assert with_score[2].shape == (2, 1) and torch.equal(with_score[2], decoded[-1])
