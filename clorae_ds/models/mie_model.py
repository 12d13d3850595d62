"""One interface over the backbones: forward and generate take a batch of tensors, route every adapted
layer by the batch's task ids, and fuse visual features where the backbone has a visual side."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from ..adapters import task_routing
from .visual import VisualSide

VISUAL_KEYS = ("visual_features", "visual_boxes", "visual_mask", "image_present")


class MIEModel(nn.Module):
    """`lm` is a Hugging Face seq2seq model (T5, EncoderDecoderModel) or LLaVA; `visual` is the UMIE visual
    side fused into a seq2seq encoder's output (None for LLaVA, whose vision tower is its own)."""

    def __init__(self, lm: nn.Module, family: str, visual: Optional[VisualSide] = None):
        super().__init__()
        self.lm, self.family, self.visual = lm, family, visual

    @property
    def is_seq2seq(self) -> bool:
        return self.family != "llava"

    def _routing(self, task_ids, record_stats=False, token_masks=None):
        if task_ids is None:
            return contextlib.nullcontext()
        return task_routing(self, task_ids, record_stats, token_masks)

    def encode(self, input_ids, attention_mask, visual_features=None, visual_boxes=None, visual_mask=None,
               pixel_values=None, image_present=None) -> BaseModelOutput:
        """`pixel_values` (B, 3, H, W) with `image_present` (B,) marking the samples that have an image, or
        precomputed `visual_features` (B, V, F) / `visual_boxes` (B, V, 5) / `visual_mask` (B, V)."""
        hidden = self.lm.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.visual is not None:
            if pixel_values is not None:
                visual_features, visual_boxes = self.visual.features_from_pixels(pixel_values)
                present = image_present if image_present is not None else \
                    torch.ones(len(pixel_values), dtype=torch.bool, device=hidden.device)
                visual_mask = present.to(hidden.device)[:, None].expand(-1, visual_features.shape[1])
            if visual_features is not None:
                hidden = self.visual(hidden, visual_features, visual_boxes, visual_mask)
        elif visual_features is not None or pixel_values is not None:
            raise ValueError(f"this {self.family} model has no visual side: build it with a visual config")
        return BaseModelOutput(last_hidden_state=hidden)

    def forward(self, input_ids, attention_mask, labels=None, task_ids=None, pixel_values=None,
                record_routing=False, **visual):
        """Returns the backbone's output (logits, and loss when labels are given). `record_routing`
        accumulates gate statistics (routing_stats) for this call."""
        if self.is_seq2seq and labels is not None and labels.shape[1] == input_ids.shape[1]:
            # One more ignored label position keeps the decoder's length apart from the encoder's, so each
            # adapted layer finds its own real-token mask by length (the MIM loss leaves padding out).
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -100)], dim=1)
        token_masks = [attention_mask.bool()]
        if self.is_seq2seq and labels is not None:
            token_masks.append(labels != -100)
        with self._routing(task_ids, record_routing, token_masks):
            if not self.is_seq2seq:
                return self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                               **_images(pixel_values))
            encoded = self.encode(input_ids, attention_mask, pixel_values=pixel_values, **visual)
            return self.lm(encoder_outputs=encoded, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, task_ids=None, pixel_values=None, **kwargs):
        """Greedy/beam generation, recording gate statistics (routing_stats); returns only the generated ids
        (for LLaVA, without the prompt)."""
        visual = {k: kwargs.pop(k) for k in VISUAL_KEYS if k in kwargs}
        with self._routing(task_ids, record_stats=True):
            if not self.is_seq2seq:
                out = self.lm.generate(input_ids=input_ids, attention_mask=attention_mask,
                                       **_images(pixel_values), **kwargs)
                return out[:, input_ids.shape[1]:]
            encoded = self.encode(input_ids, attention_mask, pixel_values=pixel_values, **visual)
            return self.lm.generate(encoder_outputs=encoded, attention_mask=attention_mask, **kwargs)


def _images(pixel_values) -> dict:
    """LLaVA's keyword for a batch's images, absent for a text-only batch: transformers 5 runs the vision
    tower whenever `pixel_values` is passed, even as None."""
    return {} if pixel_values is None else {"pixel_values": pixel_values}
