"""minGRU (Feng, Tung, Ahmed, Bengio, Hajimirsadeghi 2024, "Were RNNs All We Needed?"): a GRU
whose gates read only the input, so a segment's matmuls all run at once, before its recurrence.

    z_t  = σ(W_z x_t + b_z)                       update gate, from x_t alone
    h̃_t  = W_h x_t + b_h                          candidate, from x_t alone
    h_t  = (1 − z_t) ⊙ h_{t−1} + z_t ⊙ h̃_t        a linear recurrence  h_t = a_t h_{t−1} + b_t

With a_t = 1 − z_t and b_t = z_t ⊙ h̃_t, every matmul (the gates, for all T steps at once) comes
before the recurrence, and what is left is the scan h_t = a_t ⊙ h_{t−1} + b_t: one fused
multiply-add per step on [B, H], no matmul, so its sequential part costs next to nothing at
CRT's segment lengths. (The closed form h_t = A_{t,0} h_0 + Σ_s A_{t,s} b_s with A_{t,s} =
Π_{s<j≤t} a_j as one masked [T, T] matrix per channel was slower on CPU at T = 36, and Feng et
al.'s log-space scan needs h > 0; docs/results/speed-notes.md.)

Same calling convention as crt.layers.GRU and NCGRU: forward(x [B, T, I], h [B, H]) ->
(out [B, T, H], h_last [B, H]), no state kept between calls. One token (T = 1) is the step
h' = (1 − z) ⊙ h + z ⊙ h̃, the same call.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MinGRU(nn.Module):
    """minGRU over [B, T, I] with an explicit initial state [B, H].

    input_size: width of x; hidden_size: width of h (and of every output).
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.gates = nn.Linear(input_size, 2 * hidden_size)  # [W_z; W_h] x + [b_z; b_h]

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, T, I], h: [B, H]
        gates = self.gates(x)  # [B, T, 2H]
        scan_dtype = torch.promote_types(gates.dtype, torch.float32)  # at least fp32: under autocast bf16 would round h every step
        k, candidate = gates.to(scan_dtype).chunk(2, dim=-1)  # [B, T, H] each: W_z x + b_z, h̃
        z = torch.sigmoid(k)  # [B, T, H]
        a, b = 1 - z, z * candidate  # [B, T, H]: h_t = a_t ⊙ h_{t−1} + b_t
        h = h.to(scan_dtype)
        outs = []
        for a_t, b_t in zip(a.unbind(1), b.unbind(1)):  # unbind, not a[:, t]: indexing backpropagates through a full zero tensor per step
            h = torch.addcmul(b_t, a_t, h)  # [B, H]
            outs.append(h)
        return torch.stack(outs, dim=1), h  # [B, T, H], [B, H]

    @torch.no_grad()
    def set_keep_bias(self, bias: torch.Tensor) -> None:
        """Set the bias of the keep gate 1 − z = σ(−k): k's bias is −bias."""
        self.gates.bias[: self.hidden_size].copy_(-bias)


def mingru_flops(input_size: int, hidden_size: int, steps: int) -> float:
    """Forward FLOPs of a minGRU over `steps` inputs: the two input projections. The scan is
    elementwise work, left out like the GRU's gate nonlinearities (2 FLOPs per step and unit)."""
    return 2 * steps * 2 * input_size * hidden_size
