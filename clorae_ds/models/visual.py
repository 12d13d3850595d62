"""The UMIE-style visual side: per-sample visual features (a global vector + up to K region vectors with
boxes) → Linear + LayerNorm (+ box embedding) → a small transformer → gated cross-attention fusion into the
text encoder output (method.md §6). Samples without an image get no visual tokens and an unchanged text
encoding. Every projection is an nn.Linear called through its forward, so C-LoRAE can adapt them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

BOX_DIM = 5  # x1, y1, x2, y2, area, normalised to [0, 1]


@dataclass
class VisualConfig:
    feature_dim: int = 512  # CLIP RN101 global / region features in UMIE
    max_regions: int = 36
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    # A CLIPVisionModel that turns raw images into features: a local directory, "tiny" (random, for tests),
    # or None when features come precomputed.
    vision_tower: Optional[str] = None
    # New modules (no pretrained weights) train fully and are saved with the adapter; False freezes them
    # and adapts their linears with C-LoRAE instead, for when they come pretrained.
    trainable: bool = True


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, kv_dim: Optional[int] = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"visual hidden size {dim} is not divisible by {heads} heads")
        kv_dim = kv_dim or dim
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, lq, d = query.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        attn_mask = key_mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(split(self.q(query)), split(self.k(keys)), split(self.v(keys)),
                                             attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(b, lq, d))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block over the visual tokens."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, dropout)
        self.ff_in, self.ff_out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(h)
        h = h + self.drop(self.attn(x, x, mask))
        return h + self.drop(self.ff_out(F.gelu(self.ff_in(self.norm2(h)))))


class VisualSide(nn.Module):
    """Encodes visual tokens and fuses them into text hidden states (B, L, d)."""

    def __init__(self, config: VisualConfig, hidden: int):
        super().__init__()
        self.config = config
        self.tower = _build_vision_tower(config.vision_tower) if config.vision_tower else None
        feature_dim = self.tower.config.hidden_size if self.tower is not None else config.feature_dim
        self.feature_proj = nn.Linear(feature_dim, hidden)
        self.box_proj = nn.Linear(BOX_DIM, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.blocks = nn.ModuleList(_Block(hidden, config.heads, config.dropout) for _ in range(config.layers))
        self.fusion_norm = nn.LayerNorm(hidden)
        self.cross = _Attention(hidden, config.heads, config.dropout)
        self.fusion_gate = nn.Linear(2 * hidden, hidden)
        # Zero output projection: at init the fused encoding equals the text encoding, so a pretrained
        # backbone starts undisturbed.
        nn.init.zeros_(self.cross.o.weight)
        nn.init.zeros_(self.cross.o.bias)

    def features_from_pixels(self, pixel_values: torch.Tensor):
        """Global = pooled output, regions = patch tokens with their grid boxes."""
        if self.tower is None:
            raise ValueError("raw images were given but the model has no vision tower (visual.vision_tower)")
        with torch.no_grad():
            out = self.tower(pixel_values=pixel_values)
        patches = out.last_hidden_state[:, 1:]
        features = torch.cat([out.pooler_output[:, None], patches], dim=1)
        side = int(round(patches.shape[1] ** 0.5))
        grid = torch.arange(side, device=patches.device, dtype=patches.dtype) / side
        y1, x1 = torch.meshgrid(grid, grid, indexing="ij")
        cell = torch.stack([x1.flatten(), y1.flatten(), x1.flatten() + 1 / side, y1.flatten() + 1 / side,
                            torch.full_like(x1.flatten(), 1 / side ** 2)], dim=-1)
        whole = torch.tensor([[0, 0, 1, 1, 1]], device=patches.device, dtype=patches.dtype)
        boxes = torch.cat([whole, cell]).expand(features.shape[0], -1, -1)
        return features, boxes

    def forward(self, text_hidden: torch.Tensor, features: torch.Tensor, boxes: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """features (B, V, F), boxes (B, V, 5), mask (B, V) bool: True where a visual token exists."""
        has_image = mask.any(dim=1)
        # A sample without image attends to one dummy slot, and its fused output is discarded below.
        safe_mask = mask.clone()
        safe_mask[~has_image, 0] = True
        dtype = text_hidden.dtype
        v = self.norm(self.feature_proj(features.to(dtype)) + self.box_proj(boxes.to(dtype)))
        for block in self.blocks:
            v = block(v, safe_mask)
        attended = self.cross(self.fusion_norm(text_hidden), v, safe_mask)
        gate = torch.sigmoid(self.fusion_gate(torch.cat([text_hidden, attended], dim=-1)))
        return text_hidden + gate * attended * has_image[:, None, None].to(dtype)


def _build_vision_tower(source: str) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if source == "tiny":
        tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, image_size=32, patch_size=8))
    else:
        tower = CLIPVisionModel.from_pretrained(source, local_files_only=True)
    return tower.requires_grad_(False).eval()
