"""Recurrent Memory Transformer (Bulatov, Kuratov, Burtsev 2022), decoder version.

k memory vectors ride along with every segment as extra tokens. Under the causal mask a copy
placed before the segment is read by every token, and a copy placed after it sees every token,
so its final-layer outputs are what the segment wrote: the next segment's memory.

    segment n:   u    = [M_{n-1} ; E[x_1..x_T] ; M_{n-1}] + positions         [B, k+T+k, D]
                 h    = LN(Blocks(u))      (causal)
                 y_t  = softmax(E h_{k+t})                                       tied LM head
                 M_n  = h[k+T : k+T+k]                                           the write copy

Gradients flow through M across the last K segments (truncated BPTT), then the state is
detached. `rmt_placement` moves the memory for ablations:
    read_write: [M ; x ; M]   the paper's decoder: read before, write after.
    read:       [M ; x ; W]   memory only read; W are learned write slots (fixed inputs) that
                              the segment and the read memory write into.
    write:      [x ; M]       memory only written: no token attends to it, so it cannot change
                              a prediction (an ablation of the read path, like CRT's append).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from crt.config import ModelConfig
from crt.layers import AbsolutePositions, SegmentCache, SegmentTrunk, TokenEmbedding, blocks_flops, init_weights


class RMTState(NamedTuple):
    memory: torch.Tensor  # [B, k, D]  M_{n-1}, the k memory vectors


class RMT(SegmentTrunk):
    """RMT language model. From `cfg`:

    d_model, n_layer, n_head, d_ff, dropout, emb_dropout, attn_dropout: the blocks.
    mem_tokens: k, the number of memory vectors.
    rmt_placement: read_write | read | write (see the module docstring).
    positions: learned | sinusoidal | rotary, over the whole [read ; segment ; write] sequence.
    segment_len / eval_segment_len: the longest segment (sizes learned positions).
    tie_weights: share the LM head with the token embedding.
    """

    # Options: the positions it accepts (the first is `auto`), the ModelConfig fields only it reads
    # (field -> when it reads them), and its checks of them (called by ModelConfig.validate).
    POSITIONS = ("learned", "sinusoidal", "rotary")
    OPTIONS = dict.fromkeys(("mem_tokens", "rmt_placement"))

    @staticmethod
    def check_options(cfg: ModelConfig) -> list[tuple[bool, str]]:
        return [(cfg.mem_tokens >= 1, f"mem_tokens={cfg.mem_tokens}: rmt needs at least one memory token (--mem-tokens)")]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, k = cfg.d_model, cfg.mem_tokens
        self.tokens = TokenEmbedding(cfg.vocab_size, D, tie=cfg.tie_weights)
        self.build_trunk(cfg)
        self.positions = AbsolutePositions(cfg.position_encoding, max(cfg.segment_len, cfg.eval_segment_len) + 2 * k, D, cfg.n_head)
        self.apply(init_weights)
        # M_0, and the fixed write slots of placement=read; on the embedding scale (as the original)
        self.memory_init = nn.Parameter(torch.randn(k, D) * 0.02)  # [k, D]
        if cfg.rmt_placement == "read":
            self.write_slots = nn.Parameter(torch.randn(k, D) * 0.02)  # [k, D]

    def init_state(self, batch_size: int, evaluation: bool = False) -> RMTState:
        """M_0 (learned) in every row; gradients reach it until the first detach."""
        return RMTState(self.memory_init.expand(batch_size, -1, -1))  # [B, k, D]

    def forward(self, tokens: torch.Tensor, state: RMTState) -> tuple[torch.Tensor, RMTState]:
        # tokens: [B, T]; state.memory: [B, k, D]
        T, k = tokens.shape[1], self.cfg.mem_tokens
        x = self.tokens(tokens)  # [B, T, D]
        memory = state.memory.to(x.dtype)  # [B, k, D]
        if self.cfg.rmt_placement == "write":
            u, first = torch.cat([x, memory], dim=1), 0  # [B, T+k, D]
        else:
            u, first = torch.cat([memory, x, self.write_tokens(memory)], dim=1), k  # [B, k+T+k, D]
        u, attn_kwargs = self.positions(u)  # [B, S, D]
        h = self.trunk(u, attn_kwargs)  # [B, S, D]
        logits = self.tokens.unembed(h[:, first : first + T])  # [B, T, V]
        new_memory = h[:, -k:]  # [B, k, D]  the write copy's outputs
        return logits, RMTState(new_memory.to(state.memory.dtype))

    @staticmethod
    def flops(cfg: ModelConfig, T: int, evaluation: bool = False) -> dict[str, float]:
        """Forward FLOPs of one segment of T tokens beside the LM head: the blocks over the
        tokens and the read and write copies (crt.analysis.flops)."""
        copies = 1 if cfg.rmt_placement == "write" else 2
        return blocks_flops(cfg.n_layer, T + copies * cfg.mem_tokens, cfg.d_model, cfg.d_ff)

    def write_tokens(self, memory: torch.Tensor) -> torch.Tensor:
        """What follows the segment and becomes the next memory: the memory again, or the write slots. [B, k, D]"""
        return self.write_slots.to(memory.dtype).expand(memory.shape[0], -1, -1) if self.cfg.rmt_placement == "read" else memory

    # --- streaming: the read copy opens the segment, tokens follow one at a time with their keys
    # and values cached, and the k write tokens close it: their outputs are the next memory.

    def _advance(self, segment: SegmentCache, u: torch.Tensor) -> torch.Tensor:
        u, attn_kwargs = self.positions(u, offset=segment.offset)  # [B, T, D]
        segment.offset += u.shape[1]
        return self.trunk(u, attn_kwargs, segment.layers)  # [B, T, D]

    def open_segment(self, state: RMTState) -> SegmentCache:
        segment = SegmentCache(self.cfg.n_layer, state)
        if self.cfg.rmt_placement != "write":
            self._advance(segment, state.memory)  # [B, k, D] the read copy
        return segment

    def step(self, segment: SegmentCache, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] after the segment's earlier ones -> logits [B, V] for the next token."""
        return self.tokens.unembed(self._advance(segment, self.tokens(tokens.view(-1, 1))))[:, 0]  # [B, V]

    def close_segment(self, segment: SegmentCache) -> RMTState:
        memory = segment.state.memory  # [B, k, D]
        return RMTState(self._advance(segment, self.write_tokens(memory)).to(memory.dtype))
