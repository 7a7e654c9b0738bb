"""Causal multi-head self-attention over one segment."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.nn as nn

from crt.layers.positional import apply_rotary


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

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # x: [B, T, D]; rotary: (cos, sin) each [T, d_head], or None
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, hd]
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, T, hd]
        return self.out(y.transpose(1, 2).reshape(B, T, D))  # [B, T, D]
