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
from crt.layers import AbsolutePositions, Block, TokenEmbedding, init_weights


class RMTState(NamedTuple):
    memory: torch.Tensor  # [B, k, D]  M_{n-1}, the k memory vectors


class RMT(nn.Module):
    """RMT language model. From `cfg`:

    d_model, n_layer, n_head, d_ff, dropout, emb_dropout, attn_dropout: the blocks.
    mem_tokens: k, the number of memory vectors.
    rmt_placement: read_write | read | write (see the module docstring).
    positions: learned | sinusoidal | rotary, over the whole [read ; segment ; write] sequence.
    segment_len / eval_segment_len: the longest segment (sizes learned positions).
    tie_weights: share the LM head with the token embedding.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D, k = cfg.d_model, cfg.mem_tokens
        self.tokens = TokenEmbedding(cfg.vocab_size, D, tie=cfg.tie_weights)
        self.drop = nn.Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList(Block(D, cfg.n_head, cfg.d_ff, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(D)
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
        B, T = tokens.shape
        k, placement = self.cfg.mem_tokens, self.cfg.rmt_placement
        x = self.tokens(tokens)  # [B, T, D]
        memory = state.memory.to(x.dtype)  # [B, k, D]
        if placement == "read_write":
            u, first = torch.cat([memory, x, memory], dim=1), k  # [B, k+T+k, D]
        elif placement == "read":
            u, first = torch.cat([memory, x, self.write_slots.to(x.dtype).expand(B, -1, -1)], dim=1), k  # [B, k+T+k, D]
        else:
            u, first = torch.cat([x, memory], dim=1), 0  # [B, T+k, D]
        u, attn_kwargs = self.positions(u)  # [B, S, D]
        h = self.drop(u)  # [B, S, D]
        for block in self.blocks:
            h = block(h, **attn_kwargs)  # [B, S, D]
        h = self.ln_f(h)  # [B, S, D]
        logits = self.tokens.unembed(h[:, first : first + T])  # [B, T, V]
        new_memory = h[:, -k:]  # [B, k, D]  the write copy's outputs
        return logits, RMTState(new_memory.to(state.memory.dtype))
