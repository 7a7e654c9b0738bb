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

    def mask(self, T: int, causal: bool, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for the last T of the keys `extend` returned: the first
        positions of a segment use SDPA's own causal mask; a single new token sees every key."""
        past = len(self) - T
        if past and T > 1 and causal:  # new token i sees the past and new tokens <= i
            return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past), False  # [T, past + T]
        return None, causal and not past


class FixedKVCache:
    """A `KVCache` of a fixed size S: keys and values live in preallocated [B, H, S, hd] tensors,
    the first `length` of them written, so a segment's step keeps the same tensor shapes at every
    position and can be exported as one graph (crt.infer.token_runtime). New keys are written at
    positions length..length+T-1 and the unwritten slots are masked out, so attention sees
    exactly the keys a `KVCache` holds.

    k, v: [B, H, S, hd] buffers; length: 0-d int64 tensor, the positions written so far.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor):
        self.k, self.v, self.length = k, v, length
        self.at: torch.Tensor | None = None  # [T] the slots the last `extend` wrote

    @classmethod
    def of(cls, cache: KVCache, size: int, like: torch.Tensor) -> FixedKVCache:
        """`cache`'s keys and values in buffers of `size` positions, zeros beyond them; like: a key
        tensor [B, H, *, hd] giving the shape and dtype (an empty cache has none of its own)."""
        B, H, _, hd = like.shape
        k, v = (like.new_zeros(B, H, size, hd) for _ in range(2))  # [B, H, S, hd]
        if len(cache):
            k[:, :, : len(cache)], v[:, :, : len(cache)] = cache.k, cache.v
        return cls(k, v, torch.tensor(len(cache), dtype=torch.long, device=like.device))

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys and values [B, H, T, hd] after the first `length`; return the buffers [B, H, S, hd].

        Slot s takes new key t where s = length + t: a compare and a select per new key, which an
        exported graph runs as a few elementwise ops (an index_copy becomes transposes and a scatter)."""
        self.at = self.length + torch.arange(k.shape[2], device=k.device)  # [T] the slots written
        hit = torch.arange(self.k.shape[2], device=k.device)[:, None] == self.at  # [S, T]
        for t in range(k.shape[2]):
            self.k = torch.where(hit[:, t : t + 1], k[:, :, t : t + 1], self.k)  # [B, H, S, hd]
            self.v = torch.where(hit[:, t : t + 1], v[:, :, t : t + 1], self.v)
        self.length = self.length + k.shape[2]
        return self.k, self.v

    def mask(self, T: int, causal: bool, device: torch.device) -> tuple[torch.Tensor, bool]:
        """(attn_mask [T, S], False) for the T keys `extend` just wrote: query t sees the slots up
        to its own (causal) or every written slot; unwritten slots never."""
        slots = torch.arange(self.k.shape[2], device=device)  # [S]
        last = self.at if causal else (self.length - 1).expand(T)  # [T] the last slot each query sees
        return slots[None, :] <= last[:, None], False  # [T, S]


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

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | FixedKVCache | None = None) -> torch.Tensor:
        # x: [B, T, D]; rotary: (cos, sin) each [T, d_head] for these T positions, or None;
        # cache: earlier tokens' keys and values (extended with these), or None
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, hd]
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        mask, is_causal = None, self.causal
        if cache is not None:
            k, v = cache.extend(k, v)  # [B, H, past + T, hd] (a FixedKVCache: [B, H, S, hd])
            mask, is_causal = cache.mask(T, self.causal, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, hd]
        return self.out(y.transpose(1, 2).reshape(B, T, D))  # [B, T, D]
