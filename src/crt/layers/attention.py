"""Causal multi-head self-attention over one segment."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from crt.layers.positional import apply_rotary


class KVCache:
    """Keys and values of the tokens one segment has seen so far, for one attention layer, so a
    token fed on its own attends to them without recomputing them (incremental decoding)."""

    def __init__(self):
        self.k: torch.Tensor | None = None  # [B, H, t, hd]
        self.v: torch.Tensor | None = None  # [B, H, t, hd]

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys and values [B, H, T, hd]; return all so far [B, H, t + T, hd]."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_head) + causal mask) V, heads concatenated, then W_o.

    d_model: model width, split across heads.
    n_head: number of heads (must divide d_model).
    dropout: dropout on the attention weights (training only).
    causal: mask future positions; False lets every position see all (a ViT's patches of one frame).
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, causal: bool = True):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.causal = causal

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None) -> torch.Tensor:
        # x: [B, T, D]; rotary: (cos, sin) each [T, d_head] for these T positions, or None;
        # cache: earlier tokens' keys and values (extended with these), or None
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, hd]
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        past, mask = 0, None
        if cache is not None:
            past = len(cache)
            k, v = cache.extend(k, v)  # [B, H, past + T, hd]
            if past and T > 1 and self.causal:  # new token i sees the past and new tokens <= i
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)  # [T, past + T]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and not past, dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, T, hd]
        return self.out(y.transpose(1, 2).reshape(B, T, D))  # [B, T, D]
