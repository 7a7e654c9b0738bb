"""The segment-limited Transformer baseline: the same blocks as CRT, no memory.

Attention never crosses a segment boundary, positions are absolute within the segment, and
nothing is carried between calls (its state is `EmptyState()`). At evaluation it reads the
split in non-overlapping segments, or in a sliding window with stride s (each token then sees
up to segment_len - 1 earlier tokens; see `crt.train.evaluate`).
"""

from __future__ import annotations

import torch

from crt.config import ModelConfig
from crt.layers import AbsolutePositions, SegmentCache, SegmentTrunk, TokenEmbedding, blocks_flops, init_weights
from crt.state import EmptyState


class Transformer(SegmentTrunk):
    """Decoder-only transformer over one segment. From `cfg`:

    d_model, n_layer, n_head, d_ff, dropout, emb_dropout, attn_dropout: the blocks.
    positions: learned | sinusoidal | rotary absolute positions 0..T-1 within the segment.
    segment_len / eval_segment_len: the longest input (sizes learned positions).
    tie_weights: share the LM head with the token embedding.
    """

    # Options: the positions it accepts (the first is `auto`), the ModelConfig fields only it reads
    # (field -> when it reads them), and its checks of them (called by ModelConfig.validate).
    POSITIONS = ("learned", "sinusoidal", "rotary")
    OPTIONS: dict = {}

    @staticmethod
    def check_options(cfg: ModelConfig) -> list[tuple[bool, str]]:
        return []

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.tokens = TokenEmbedding(cfg.vocab_size, D, tie=cfg.tie_weights)
        self.build_trunk(cfg)
        self.positions = AbsolutePositions(cfg.position_encoding, max(cfg.segment_len, cfg.eval_segment_len), D, cfg.n_head)
        self.apply(init_weights)

    def init_state(self, batch_size: int, evaluation: bool = False) -> EmptyState:
        return EmptyState()

    def forward(self, tokens: torch.Tensor, state: EmptyState) -> tuple[torch.Tensor, EmptyState]:
        # tokens: [B, T]
        x, attn_kwargs = self.positions(self.tokens(tokens))  # [B, T, D]
        return self.tokens.unembed(self.trunk(x, attn_kwargs)), state  # [B, T, V]

    @staticmethod
    def flops(cfg: ModelConfig, T: int, evaluation: bool = False) -> dict[str, float]:
        """Forward FLOPs of one segment of T tokens beside the LM head (crt.analysis.flops)."""
        return blocks_flops(cfg.n_layer, T, cfg.d_model, cfg.d_ff)

    # --- streaming: one token at a time, the segment's keys and values cached (crt.infer.stream)

    def open_segment(self, state: EmptyState) -> SegmentCache:
        return SegmentCache(self.cfg.n_layer, state)

    def step(self, segment: SegmentCache, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] after the segment's earlier ones -> logits [B, V] for the next token."""
        x, attn_kwargs = self.positions(self.tokens(tokens.view(-1, 1)), offset=segment.offset)  # [B, 1, D]
        segment.offset += 1
        return self.tokens.unembed(self.trunk(x, attn_kwargs, segment.layers))[:, 0]  # [B, V]

    def close_segment(self, segment: SegmentCache) -> EmptyState:
        return segment.state  # nothing is carried
