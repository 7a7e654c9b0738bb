"""GRU with the (x [B, T, I], h [B, H]) -> (out [B, T, H], h_last [B, H]) convention of NCGRU.

The parameters are torch's own `nn.GRU` (same names, same init, same checkpoints). On CUDA it
runs `nn.GRU` (cuDNN). On CPU it runs the same equations in fp32, also under bf16 autocast
(nn.GRU's output is fp32 there too), through `_SequenceGRU`, one autograd node for the whole sequence with a
hand-written backward: torch's CPU GRU records about a dozen autograd nodes per time step, and
at CRT's sizes (H = 128..256, B = 32) their overhead, not arithmetic, is what a step costs.
`tests/test_gru.py` checks both paths give the same outputs and gradients.

    r  = σ(W_ir x + b_ir + W_hr h + b_hr)
    z  = σ(W_iz x + b_iz + W_hz h + b_hz)
    n  = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    h' = (1 − z) ⊙ n + z ⊙ h
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _SequenceGRU(torch.autograd.Function):
    """The recurrence of a GRU over T steps given its input projections; backward by hand."""

    @staticmethod
    def forward(ctx, xp: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # xp: [T, B, 3H] = W_ih x + b_ih, time-major; h: [B, H]; w_hh: [3H, H]; b_hh: [3H]
        T, B, H3 = xp.shape
        H = H3 // 3
        hs = xp.new_empty(T + 1, B, H)  # h_0 .. h_T
        rz = xp.new_empty(T, B, 2 * H)  # gates r, z
        n = xp.new_empty(T, B, H)  # candidates
        hn = xp.new_empty(T, B, H)  # W_hn h + b_hn, needed for the gradient of r
        hs[0] = h
        w_hh_t = w_hh.t()
        for t in range(T):
            hp = torch.addmm(b_hh, hs[t], w_hh_t)  # [B, 3H]  W_h h + b_h
            torch.sigmoid(xp[t, :, : 2 * H] + hp[:, : 2 * H], out=rz[t])  # [B, 2H]
            hn[t] = hp[:, 2 * H :]
            torch.tanh(torch.addcmul(xp[t, :, 2 * H :], rz[t, :, :H], hn[t]), out=n[t])  # [B, H]
            torch.lerp(n[t], hs[t], rz[t, :, H:], out=hs[t + 1])  # (1 − z) n + z h
        ctx.save_for_backward(hs, rz, n, hn, w_hh)
        out = hs[1:]
        return out, out[-1]

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: torch.Tensor | None, d_last: torch.Tensor | None):
        hs, rz, n, hn, w_hh = ctx.saved_tensors
        T, B, H = n.shape
        d_out = torch.zeros_like(n) if d_out is None else d_out  # [T, B, H]
        dh = torch.zeros_like(hs[0]) if d_last is None else d_last.clone()  # [B, H]
        d_xp = n.new_empty(T, B, 3 * H)  # gradient of the input projections
        d_hp = n.new_empty(T, B, 3 * H)  # gradient of W_h h + b_h
        for t in range(T - 1, -1, -1):
            dh = dh + d_out[t]  # [B, H]
            r, z = rz[t, :, :H], rz[t, :, H:]
            dn = dh * (1 - z) * (1 - n[t] * n[t])  # through h' and tanh
            dz = dh * (hs[t] - n[t]) * z * (1 - z)  # through h' and σ
            dr = dn * hn[t] * r * (1 - r)  # through r ⊙ (W_hn h + b_hn) and σ
            d_xp[t, :, :H], d_xp[t, :, H : 2 * H], d_xp[t, :, 2 * H :] = dr, dz, dn
            d_hp[t, :, : 2 * H] = d_xp[t, :, : 2 * H]
            torch.mul(dn, r, out=d_hp[t, :, 2 * H :])
            dh = torch.addmm(dh * z, d_hp[t], w_hh)  # [B, H]  direct path + (W_h)ᵀ d_hp
        d_w = d_hp.reshape(T * B, 3 * H).t() @ hs[:-1].reshape(T * B, H)  # [3H, H]  Σ_t d_hpᵀ h_{t-1}
        d_b = d_hp.sum(dim=(0, 1))  # [3H]
        return d_xp, dh, d_w, d_b


class GRU(nn.Module):
    """One-layer GRU over [B, T, I] with an explicit initial state [B, H].

    input_size: width of x; hidden_size: width of h (and of every output).
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.gru = nn.GRU(input_size, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, T, I], h: [B, H]
        g = self.gru
        if x.device.type != "cpu":
            out, h_last = g(x, h.unsqueeze(0).to(x.dtype))  # [B, T, H], [1, B, H]
            return out, h_last.squeeze(0)
        # fp32 on CPU even under autocast: the recurrence is a small part of the FLOPs, and CPUs
        # without native bf16 run it slower in bf16
        with torch.autocast("cpu", enabled=False):
            xp = F.linear(x.float().transpose(0, 1), g.weight_ih_l0, g.bias_ih_l0)  # [T, B, 3H]  W_i x + b_i, all steps at once
            out, h_last = _SequenceGRU.apply(xp, h.float(), g.weight_hh_l0, g.bias_hh_l0)  # [T, B, H], [B, H]
        return out.transpose(0, 1), h_last  # [B, T, H], [B, H]

    @torch.no_grad()
    def set_keep_bias(self, bias: torch.Tensor) -> None:
        """Set the bias of z in h' = (1 - z) * n + z * h (torch orders the gates r, z, n)."""
        H = self.gru.hidden_size
        self.gru.bias_ih_l0[H : 2 * H].zero_()  # torch has two biases per gate; keep one
        self.gru.bias_hh_l0[H : 2 * H].copy_(bias)
