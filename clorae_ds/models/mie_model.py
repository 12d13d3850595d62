"""One interface over the backbones: forward and generate take a batch of tensors, route every adapted
layer by the batch's task ids, and fuse visual features where the backbone has a visual side."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from ..adapters import checkpoint_context_fn, collect_mim_loss, restore_task_routing, set_task_routing, task_routing
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

    # Run the visual side for batches without images too (on a blank image with no image marked present, its
    # output unused for LLaVA): every call then runs the same modules in the same order whatever the batch holds.
    # Set by the engine under ZeRO-3, where a module's parameters are gathered by all ranks when it runs.
    always_run_image_modules = False

    def _blank_visual(self, input_ids, pixel_values, visual: dict) -> tuple:
        """(pixel_values, visual) for encode(): a text-only batch gets blank images marked absent (or one zero
        feature token, masked, when the visual side reads precomputed features)."""
        if not self.always_run_image_modules or self.visual is None or pixel_values is not None \
                or visual.get("visual_features") is not None:
            return pixel_values, visual
        batch, device = input_ids.shape[0], input_ids.device
        absent = torch.zeros(batch, dtype=torch.bool, device=device)
        if self.visual.tower is not None:
            size = self.visual.tower.config.image_size
            return torch.zeros(batch, 3, size, size, device=device), {**visual, "image_present": absent}
        features = torch.zeros(batch, 1, self.visual.config.feature_dim, device=device)
        return None, {**visual, "visual_features": features, "visual_boxes": torch.zeros(batch, 1, 5, device=device),
                      "visual_mask": absent[:, None]}

    def _llava_images(self, pixel_values) -> dict:
        """LLaVA's images encoded before the language model runs, passed as `mm_encoder_outputs` (transformers 5
        runs the vision tower whenever `pixel_values` is passed, even as None)."""
        if pixel_values is not None:
            return {"mm_encoder_outputs": {"image": self.lm.get_image_features(pixel_values=pixel_values,
                                                                               return_dict=True)}}
        if self.always_run_image_modules:
            size = self.lm.config.vision_config.image_size
            dtype = next(self.lm.model.multi_modal_projector.parameters()).dtype  # no ZeRO-3 gather on access
            self.lm.get_image_features(pixel_values=torch.zeros(1, 3, size, size, dtype=dtype,
                                                                device=self.lm.device), return_dict=True)
        return {}

    def enable_gradient_checkpointing(self) -> None:
        """Keep only each transformer block's input in training and recompute the block during backward: less
        activation memory (so larger batches fit) for about one more forward. Non-reentrant torch.utils.checkpoint
        around every block the backbone marks checkpointable, the adapter's routing carried into the recompute
        (checkpoint_context_fn). Call it after the adapter is applied."""
        kwargs = {"use_reentrant": False, "context_fn": checkpoint_context_fn(self)}
        if hasattr(self.lm, "activation_checkpointing_enable"):  # the newer name; the older one warns there
            self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

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
                record_routing=False, return_loss=True, return_mim=False, **visual):
        """The backbone's output: logits and, given labels, their mean token cross-entropy as `loss` unless
        `return_loss` is False (the trainer weighs its own per-dataset loss from the logits). Labels are not
        passed to the backbone, which would compute that cross-entropy whether or not it is used.
        `record_routing` accumulates gate statistics (routing_stats) for this call. `return_mim`: the call's
        L_MIM (collect_mim_loss) as `mim_loss` (None without MIM), computed here so that a compiled forward
        compiles it too (grouped across layers) instead of leaving it to eager code after the graph."""
        if self.is_seq2seq and labels is not None and labels.shape[1] == input_ids.shape[1]:
            # One more ignored label position keeps the decoder's length apart from the encoder's, so each
            # adapted layer finds its own real-token mask by length (the MIM loss leaves padding out).
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -100)], dim=1)
        token_masks = [attention_mask.bool()]
        if self.is_seq2seq and labels is not None:
            token_masks.append(labels != -100)
        # set and restored by hand, not in a with block: torch.compile captures this whole forward as one graph
        previous = set_task_routing(self, task_ids, record_routing, token_masks) if task_ids is not None else []
        try:
            if not self.is_seq2seq:
                out = self.lm(input_ids=input_ids, attention_mask=attention_mask, **self._llava_images(pixel_values))
            else:
                pixel_values, visual = self._blank_visual(input_ids, pixel_values, visual)
                encoded = self.encode(input_ids, attention_mask, pixel_values=pixel_values, **visual)
                out = self.lm(encoder_outputs=encoded, attention_mask=attention_mask, **self._decoder_inputs(labels))
        finally:
            restore_task_routing(self, previous)
        if labels is not None and return_loss:
            logits, targets = (out.logits, labels) if self.is_seq2seq else (out.logits[:, :-1], labels[:, 1:])
            out["loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        if return_mim:
            mim = collect_mim_loss(self)
            if mim is not None:
                out["mim_loss"] = mim
        return out

    def _decoder_inputs(self, labels) -> dict:
        """Teacher forcing: the labels shifted right behind the decoder's start token, as the backbone itself
        would shift them; EncoderDecoderModel's decoder also masks the padding the shift brings in."""
        if labels is None:
            return {}
        decoder_input_ids = self.lm.prepare_decoder_input_ids_from_labels(labels=labels)
        if self.family != "encoder_decoder":
            return {"decoder_input_ids": decoder_input_ids}
        return {"decoder_input_ids": decoder_input_ids,
                "decoder_attention_mask": (decoder_input_ids != self.lm.config.pad_token_id).long()}

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, task_ids=None, pixel_values=None, **kwargs):
        """Greedy/beam generation, recording gate statistics (routing_stats); returns only the generated ids
        (for LLaVA, without the prompt)."""
        visual = {k: kwargs.pop(k) for k in VISUAL_KEYS if k in kwargs}
        with self._routing(task_ids, record_stats=True):
            if not self.is_seq2seq:
                out = self.lm.generate(input_ids=input_ids, attention_mask=attention_mask,
                                       **self._llava_images(pixel_values), **kwargs)
                return out[:, input_ids.shape[1]:]
            pixel_values, visual = self._blank_visual(input_ids, pixel_values, visual)
            encoded = self.encode(input_ids, attention_mask, pixel_values=pixel_values, **visual)
            return self.lm.generate(encoder_outputs=encoded, attention_mask=attention_mask, **kwargs)

