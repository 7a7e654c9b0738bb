"""The pre-LayerNorm transformer block every model in crt is built from."""

from __future__ import annotations

import torch
import torch.nn as nn

from crt.layers.attention import CausalSelfAttention
from crt.layers.feedforward import FeedForward


class Block(nn.Module):
    """x = x + Dropout(Attn(LN(x)));  x = x + Dropout(FF(LN(x))).

    d_model: model width.
    n_head: attention heads.
    d_ff: feed-forward hidden width.
    dropout: dropout on the residual branches and inside the feed-forward.
    attn_dropout: dropout on the attention weights.
    attention: the attention module; causal segment attention when None. Transformer-XL
        passes its relative attention here; keyword arguments of `forward` reach it unchanged.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_ff: int,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        attention: nn.Module | None = None,
        causal: bool = True,
    ):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = attention if attention is not None else CausalSelfAttention(d_model, n_head, attn_dropout, causal)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, **attn_kwargs) -> torch.Tensor:
        # x: [B, T, D]; memory: [B, M, D] extra keys/values before x (Transformer-XL), normalised like x
        if memory is not None:
            attn_kwargs["memory"] = self.ln1(memory)
        x = x + self.drop(self.attn(self.ln1(x), **attn_kwargs))  # [B, T, D]
        return x + self.drop(self.ff(self.ln2(x)))  # [B, T, D]


def block_flops(positions: int, d_model: int, d_ff: int) -> dict[str, float]:
    """Forward FLOPs of one Block over `positions` positions with causal segment attention
    (the full S x S score matrix, as computed; see crt.analysis.flops)."""
    S, D = positions, d_model
    return {
        "attention projections": 2 * S * 4 * D * D,  # W_qkv (3 D^2) and W_o (D^2)
        "attention scores and sums": 2 * 2 * S * S * D,  # Q K^T and A V, S x S each
        "feed-forward": 2 * S * 2 * D * d_ff,
    }


def blocks_flops(n_layer: int, positions: int, d_model: int, d_ff: int) -> dict[str, float]:
    """`block_flops` of n_layer blocks."""
    return {part: n_layer * f for part, f in block_flops(positions, d_model, d_ff).items()}
