"""The trunk every segment model shares, and what a model keeps while it streams a segment.

    h = LN_f(Block_L( ... Block_1(Dropout(u))))        u: a segment's inputs with their positions

A model calls `trunk(u, attn_kwargs)` over a whole segment in `forward`, and
`trunk(u, attn_kwargs, segment.layers)` over one token at a time in `step`, where each layer's
`KVCache` holds the keys and values of the segment's earlier positions. The maths is the same
call in both, which is what makes a stream equal the segment path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from crt.layers.attention import KVCache
from crt.layers.block import Block


class SegmentCache:
    """One segment being streamed: every layer's keys and values so far, the positions used so
    far (memory tokens included), and the state the segment opened from. A model keeps what
    else its step needs (CRT: the memory RNN's running state) as attributes of its own."""

    def __init__(self, n_layer: int, state: Any):
        self.layers = [KVCache() for _ in range(n_layer)]
        self.offset = 0  # positions this segment has used
        self.state = state  # the state before this segment


class SegmentTrunk(nn.Module):
    """Base of the segment models: embedding dropout, the blocks and the final norm.

    `build_trunk` is called by a model's constructor where it wants those modules registered
    (their names, drop, blocks and ln_f, are the checkpoint's parameter names, and the order of
    registration fixes the order init_weights draws its random numbers in).
    """

    def build_trunk(self, cfg, blocks: nn.ModuleList | None = None) -> None:
        """cfg: the ModelConfig (d_model, n_layer, n_head, d_ff, dropout, attn_dropout, emb_dropout).
        blocks: the layers when they are not plain `Block`s (Transformer-XL's relative attention)."""
        self.drop = nn.Dropout(cfg.emb_dropout)
        self.blocks = (
            blocks if blocks is not None else nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.d_ff, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.n_layer))
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def trunk(self, u: torch.Tensor, attn_kwargs: dict, caches: list[KVCache] | None = None) -> torch.Tensor:
        # u: [B, T, D] inputs with positions; caches: one per layer when streaming  ->  [B, T, D]
        h = self.drop(u)
        for i, block in enumerate(self.blocks):
            h = block(h, **attn_kwargs) if caches is None else block(h, cache=caches[i], **attn_kwargs)
        return self.ln_f(h)
