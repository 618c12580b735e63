"""``sam_mask``: SAM's mask decoder as a prompt-free multi-class head, one learned prompt token per class (SAMed style).

SAMed (Zhang & Liu 2023) segments K classes at once by giving SAM's mask decoder K output tokens and no prompt at all:
the two-way transformer attends from the tokens to the image embedding (plus the "no mask" dense embedding), and each
class token's hypernetwork MLP turns the upscaled embedding into that class's logits. Here the decoder is composed of
the modules of the SAM / LiteMedSAM model itself (``segment_anything``'s ``TwoWayTransformer``, upscaling path,
hypernetwork MLPs, the prompt encoder's random-Fourier positional encoding and ``no_mask_embed``), so with
``init=pretrained`` it starts from the official weights:

* transformer, output upscaling, IoU token, positional-encoding matrix, no-mask embedding: taken over as they are;
* class token ``k`` and its hypernetwork MLP: copies of the pretrained mask token and MLP ``k mod 4`` (SAM has four
  output tokens). Classes that share a copy start with equal logits and separate under their different targets.

SAMed re-initialises the tokens and MLPs instead; starting from the pretrained ones keeps the token-to-mask mapping
SAM learnt. The IoU prediction head is dropped: nothing here trains it, and an unused parameter would break DDP.
``init=scratch`` builds the same modules from the standard initialisation (same names and shapes).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from medseg.backbones.base import BackboneOutput

__all__ = ["SamMaskDecoder"]


class SamMaskDecoder(nn.Module):
    """Multi-class, prompt-free SAM mask decoder on the ``(B, 256, h, w)`` image embedding of a SAM-family backbone.

    Args:
        mask_decoder: the SAM / LiteMedSAM ``MaskDecoder`` (pretrained or not) whose modules are taken over.
        prompt_encoder: the matching ``PromptEncoder`` (for the positional encoding and the no-mask embedding).
        num_classes: output channels, background included; one token per class.

    The logits come out at 4x the embedding grid (SAM: input / 4; LiteMedSAM: the input size) and are bilinearly
    resized to the input size.
    """

    layers: tuple[int, ...] = ()

    def __init__(self, mask_decoder: nn.Module, prompt_encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.transformer = mask_decoder.transformer
        self.output_upscaling = mask_decoder.output_upscaling
        self.iou_token = mask_decoder.iou_token
        self.pe_layer = prompt_encoder.pe_layer
        self.no_mask_embed = prompt_encoder.no_mask_embed
        pretrained_tokens = mask_decoder.mask_tokens.weight
        source = [k % pretrained_tokens.shape[0] for k in range(num_classes)]
        self.class_tokens = nn.Embedding(num_classes, pretrained_tokens.shape[1])
        with torch.no_grad():
            self.class_tokens.weight.copy_(pretrained_tokens[source])
        mlps = mask_decoder.output_hypernetworks_mlps
        self.output_hypernetworks_mlps = nn.ModuleList(copy.deepcopy(mlps[i]) for i in source)

    def forward(self, output: BackboneOutput, image: torch.Tensor) -> torch.Tensor:
        """``segment_anything``'s ``MaskDecoder.predict_masks`` for one token set per image, without prompts.

        (``predict_masks`` itself repeats each image embedding once per prompt set, which is not a batch of images.)
        """
        embedding = output.features
        batch, channels, h, w = embedding.shape
        tokens = torch.cat([self.iou_token.weight, self.class_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(batch, -1, -1)
        src = embedding + self.no_mask_embed.weight.reshape(1, -1, 1, 1)
        pos = self.pe_layer((h, w)).unsqueeze(0).expand(batch, -1, -1, -1).to(src.dtype)
        hidden, src = self.transformer(src, pos, tokens)
        class_out = hidden[:, 1 : 1 + self.num_classes, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(batch, channels, h, w))
        hyper = torch.stack([mlp(class_out[:, k, :]) for k, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, uh, uw = upscaled.shape
        logits = (hyper @ upscaled.reshape(b, c, uh * uw)).reshape(b, self.num_classes, uh, uw)
        if tuple(logits.shape[-2:]) != tuple(image.shape[-2:]):
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return logits
