"""3D volumes as stacks of 2D slices: per-slice backbone features aggregated over slices.

The study averages slice features; `AttentiveHead` gives learned attention over slices instead.
Slice features become the "tokens" a head reads, so every head in `shared.heads` works on them.
"""
from __future__ import annotations

import torch

from shared.heads import Tokens


def slice_tokens(model, x: torch.Tensor, slice_pool: str = "cls") -> Tokens:
    """(B, S, 3, H, W) volumes -> Tokens (B, S, D) of per-slice pooled backbone features."""
    b, s = x.shape[:2]
    per_slice = model.tokens(x.flatten(0, 1)).pool(slice_pool)  # (B*S, D)
    return Tokens(per_slice.view(b, s, -1), 0, None)


def classify(model, x: torch.Tensor, slice_pool: str = "cls") -> torch.Tensor:
    """Logits for 2D images (B, 3, H, W) or volumes (B, S, 3, H, W)."""
    if x.ndim == 5:
        return model.head(slice_tokens(model, x, slice_pool))
    return model(x)
