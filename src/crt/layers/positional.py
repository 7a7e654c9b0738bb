"""Positional encodings: sinusoidal, learned, rotary, and the recurrent one of CRT (SPEC §3.2)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from crt.layers.gru import GRU
from crt.layers.mingru import MinGRU


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. encoding of arbitrary (float) positions.

    PE[p, 2i] = sin(p / 10000^(2i/d)),  PE[p, 2i+1] = cos(p / 10000^(2i/d))
    positions: [T]  ->  [T, dim]
    """
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / dim))  # [dim/2]
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, dim/2]
    table = torch.stack([angles.sin(), angles.cos()], dim=-1)  # [T, dim/2, 2]
    return table.flatten(1)  # [T, dim] interleaved sin, cos


class LearnedPositions(nn.Module):
    """A learned vector per position 0..max_len-1 (GPT-2 style).

    max_len: the longest sequence the model will see (segment plus memory tokens).
    dim: model width.
    """

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(max_len, dim)

    def forward(self, length: int, device: torch.device, offset: int | torch.Tensor = 0) -> torch.Tensor:
        # offset: an int, or a 0-d tensor in an exported step (whose fixed-size cache bounds it)
        if isinstance(offset, int) and offset + length > self.table.num_embeddings:
            raise ValueError(f"sequence of {offset + length} tokens exceeds the {self.table.num_embeddings} learned positions")
        return self.table(offset + torch.arange(length, device=device))  # [T, D] positions offset..offset+T-1


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), applied to queries and keys in attention.

    head_dim: width of one attention head (even).
    base: frequency base of the rotation angles.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head width, got {head_dim}")
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, length: int, device: torch.device, offset: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
        t = (offset + torch.arange(length, device=device)).float()  # positions offset..offset+T-1
        angles = t[:, None] * self.inv_freq.to(device)[None, :]  # [T, hd/2]
        angles = torch.cat([angles, angles], dim=-1)  # [T, hd]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x' = x * cos + rotate_half(x) * sin, with rotate_half([a, b]) = [-b, a].

    x: [B, H, T, hd]; cos, sin: [T, hd]
    """
    a, b = x.chunk(2, dim=-1)
    rotated = torch.cat([-b, a], dim=-1)  # [B, H, T, hd]
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class AbsolutePositions(nn.Module):
    """Positions 0..T-1 of one segment, added to the input or rotated into attention.

    kind: sinusoidal | learned | rotary | none.
    max_len: longest input (learned positions only).
    d_model, n_head: model width and heads (rotary works per head).
    std: scale of the token embeddings at initialisation. Sinusoidal positions are scaled to
        it: unscaled their per-dimension RMS (1/sqrt 2) is 35 times that of 0.02-std token
        embeddings and drowns the tokens (and CRT's memory token) out.

    forward(x, offset) returns x with positions offset..offset+T-1 added and the keyword
    arguments attention needs (offset > 0: tokens fed one at a time after earlier ones).
    """

    def __init__(self, kind: str, max_len: int, d_model: int, n_head: int, std: float = 0.02):
        super().__init__()
        self.kind, self.scale = kind, std * math.sqrt(2)
        if kind == "learned":
            self.learned = LearnedPositions(max_len, d_model)
        elif kind == "rotary":
            self.rotary = Rotary(d_model // n_head)
        elif kind not in ("sinusoidal", "none"):
            raise ValueError(f"unknown absolute positions {kind!r}")

    def forward(self, x: torch.Tensor, offset: int | torch.Tensor = 0) -> tuple[torch.Tensor, dict]:
        # x: [B, T, D]; offset: an int, or a 0-d int64 tensor (crt.infer.token_runtime's exported step)
        T, D = x.shape[1], x.shape[2]
        if self.kind == "sinusoidal":
            return x + self.scale * sinusoidal_table(offset + torch.arange(T, device=x.device), D).to(x.dtype), {}  # [B, T, D]
        if self.kind == "learned":
            return x + self.learned(T, x.device, offset), {}  # [B, T, D]
        if self.kind == "rotary":
            return x, {"rotary": self.rotary(T, x.device, offset)}  # (cos, sin) [T, d_head]
        return x, {}


def recurrent_positions(dim: int, cell: str = "gru") -> nn.Module:
    """CRT's recurrent positional encoding: an RNN over the segment's input embeddings.

    p_0..p_T = RNN([e_0..e_T], h) are added to e_0..e_T. The RNN's last hidden state is
    returned so the caller can carry it to the next segment, and positions continue across
    segments without any relative-position arithmetic.

    dim: model width (the RNN's input and hidden size).
    cell: gru (the paper's) | mingru (input-only gates: the segment's matmuls run at once).
    The module's forward(x [B, T, D], h [B, D]) -> (p [B, T, D], h_last [B, D]).
    """
    return GRU(dim, dim) if cell == "gru" else MinGRU(dim, dim)
