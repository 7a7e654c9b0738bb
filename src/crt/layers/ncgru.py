"""NCGRU: the Neumann-Cayley orthogonal GRU (Mucllari, Zadorozhnyy, Pospisil, Nguyen, Ye).

A GRU whose candidate path uses an orthogonal recurrent matrix, so the memory neither
explodes nor vanishes along that path over long streams:

    r  = σ(W_r x + U_r h + b_r)                     reset gate
    u  = σ(W_u x + U_u h + b_u)                     update gate
    c  = modReLU(W_c x + U_c (r ⊙ h))               candidate
    h' = u ⊙ h + (1 − u) ⊙ c
    modReLU(z) = sign(z) · ReLU(|z| + b)            b: learned, one per unit

    U_c = (I + A)^{-1} (I − A) D                    scaled Cayley transform

A is skew-symmetric (Aᵀ = −A), so (I + A)^{-1}(I − A) is orthogonal for every A, and D is a
fixed diagonal of ±1, so U_c is orthogonal by construction whatever the optimiser does to A.
D lets U_c reach orthogonal matrices with eigenvalue −1, which the plain Cayley transform
cannot. The original trains A with a custom update and a truncated Neumann series for the
inverse; here (I + A)^{-1}(I − A) is solved exactly once per forward call and autograd
differentiates through the solve. Optionally U_r is orthogonal too (its own A and D).

Same calling convention as crt.layers.GRU: forward(x, h) with
x [B, T, input_size] and h [B, hidden_size] returns (out [B, T, hidden_size], h_last).
No state is kept between calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def modrelu(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """modReLU(z) = sign(z) · ReLU(|z| + b): shrinks |z| by −b, keeps the sign, zero inside the dead zone.

    z: [..., H]; bias: [H]
    """
    return torch.sign(z) * F.relu(z.abs() + bias)  # [..., H]


class NCGRU(nn.Module):
    """Neumann-Cayley orthogonal GRU over a whole sequence, with explicit state.

    input_size: width of each input vector x_t.
    hidden_size: width H of the hidden state h (and of every output).
    n_negative: how many entries of the fixed diagonal D are −1 (the rest are +1). The plain
        Cayley transform never has eigenvalue −1; with k entries −1 in D, U_c can have up to k
        (Helfrich et al., scoRNN). It also fixes det(U_c) = (−1)^k. None means hidden_size // 2.
    orthogonal_reset: also make U_r orthogonal, U_r = (I + A_r)^{-1}(I − A_r) D with its own
        skew-symmetric A_r and the same kind of D; U_u stays a free matrix either way.
    """

    def __init__(self, input_size: int, hidden_size: int, n_negative: int | None = None, orthogonal_reset: bool = False):
        super().__init__()
        H = hidden_size
        n_negative = H // 2 if n_negative is None else n_negative
        if not isinstance(n_negative, int) or not 0 <= n_negative <= H:
            raise ValueError(
                f"n_negative={n_negative} is not a valid count of -1 entries in D for hidden_size={H}; "
                f"pass an integer between 0 and {H}, or None for hidden_size // 2"
            )
        self.input_size = input_size
        self.hidden_size = H
        self.n_negative = n_negative
        self.orthogonal_reset = orthogonal_reset

        # plain Parameters, not nn.Linear, so a model-wide apply(init_weights) cannot overwrite
        # the recurrent initialisation below (see crt.layers.init)
        k = 1.0 / math.sqrt(H)  # nn.GRU's init range
        self.weight_x = nn.Parameter(torch.empty(3 * H, input_size).uniform_(-k, k))  # [W_r; W_u; W_c]
        self.bias_ru = nn.Parameter(torch.zeros(2 * H))  # [b_r; b_u]; the candidate has no bias before modReLU
        # b = 0 makes modReLU the identity at init: every unit is active and passes gradient,
        # and the candidate path starts as a pure orthogonal RNN; training can grow a dead zone
        self.bias_mod = nn.Parameter(torch.zeros(H))
        # A is stored as its strict upper triangle, H(H-1)/2 numbers: a full matrix would carry
        # H(H+1)/2 dead entries that get no gradient yet still take weight decay and optimiser state
        self.register_buffer("triu", torch.triu_indices(H, H, offset=1), persistent=False)  # [2, H(H-1)/2]
        self.skew_c = nn.Parameter(self._init_skew())
        # D is part of the function, so it is saved with the weights
        self.register_buffer("d_c", self._init_d(n_negative))  # [H]
        if orthogonal_reset:
            self.skew_r = nn.Parameter(self._init_skew())
            self.register_buffer("d_r", self._init_d(n_negative))  # [H]
            self.weight_u = nn.Parameter(torch.empty(H, H).uniform_(-k, k))  # U_u
        else:
            self.weight_ru = nn.Parameter(torch.empty(2 * H, H).uniform_(-k, k))  # [U_r; U_u], one matmul per step

    def _init_skew(self) -> torch.Tensor:
        # A = blockdiag([[0, s], [-s, 0]]), s = -tan(θ/2), θ ~ U(0, π/2): the Cayley transform of
        # each block is the plane rotation [[cos θ, sin θ], [-sin θ, cos θ]], so before D the
        # matrix starts as a spread of rotations of at most a quarter turn
        H = self.hidden_size
        s = -torch.tan(torch.rand(H // 2) * (math.pi / 4))  # [H/2] θ/2 ~ U(0, π/4)
        A = torch.zeros(H, H)
        idx = torch.arange(0, 2 * (H // 2), 2)  # [H/2] rows of the blocks; an odd H leaves the last entry 0
        A[idx, idx + 1] = s
        return A[self.triu[0], self.triu[1]]  # [H(H-1)/2] strict upper triangle

    def _init_d(self, n_negative: int) -> torch.Tensor:
        d = torch.ones(self.hidden_size)
        d[:n_negative] = -1.0
        return d  # [H]

    def _cayley(self, skew: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        # always fp32, whatever the parameter dtype or autocast's per-device op lists say: in bf16
        # U_c would be orthogonal only to ~1e-2
        with torch.autocast(device_type=skew.device.type, enabled=False):
            H = self.hidden_size
            A = skew.new_zeros(H, H, dtype=torch.float32).index_put(tuple(self.triu), skew.float())  # [H, H]
            A = A - A.T  # [H, H] skew-symmetric
            eye = torch.eye(H, device=A.device)  # [H, H]
            # (I - A) D scales column j by d_j; one solve gives (I + A)^{-1}(I - A) D
            return torch.linalg.solve(eye + A, (eye - A) * d.float())  # [H, H] U = (I + A)^{-1}(I - A) D

    @torch.no_grad()
    def set_keep_bias(self, bias: torch.Tensor) -> None:
        """Set b_u, the bias of the gate u in h' = u * h + (1 - u) * c."""
        self.bias_ru[self.hidden_size :].copy_(bias)

    def recurrent_matrix(self) -> torch.Tensor:
        """U_c = (I + A)^{-1}(I − A) D in fp32, [H, H]."""
        return self._cayley(self.skew_c, self.d_c)

    def reset_matrix(self) -> torch.Tensor:
        """U_r in fp32, [H, H]: orthogonal when orthogonal_reset, else the free matrix."""
        if self.orthogonal_reset:
            return self._cayley(self.skew_r, self.d_r)
        return self.weight_ru[: self.hidden_size].float()

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, T, input_size], h: [B, H]
        H = self.hidden_size
        # every input projection for all T steps in one matmul, outside the loop
        xp = F.linear(x, self.weight_x)  # [B, T, 3H]  [W_r x; W_u x; W_c x]
        x_ru = xp[..., : 2 * H] + self.bias_ru  # [B, T, 2H]  W_r x + b_r, W_u x + b_u
        x_c = xp[..., 2 * H :]  # [B, T, H]  W_c x
        # recurrent matrices once per call, cast once to the matmul dtype (bf16 under autocast)
        # so autocast does not re-cast them every step
        U_c = self.recurrent_matrix().to(xp.dtype)  # [H, H]
        if self.orthogonal_reset:
            U_ru = torch.cat([self.reset_matrix(), self.weight_u.float()]).to(xp.dtype)  # [2H, H]  [U_r; U_u]
        else:
            U_ru = self.weight_ru.to(xp.dtype)  # [2H, H]  [U_r; U_u]
        U_c_t, U_ru_t = U_c.T, U_ru.T  # row-vector form: (U h)ᵀ = hᵀ Uᵀ
        # the state stays in h's dtype (fp32 in CRT) so rounding does not build up over long
        # streams; autocast lowers only the matmul operands
        # unbind, not x_ru[:, t]: the backward of T selects would build T zero [B, T, 2H] gradients
        outs = []
        for xru_t, xc_t in zip(x_ru.unbind(1), x_c.unbind(1)):
            ru = torch.sigmoid(torch.addmm(xru_t, h, U_ru_t))  # [B, 2H]  [r; u] = σ(W x + U h + b)
            r, u = ru.chunk(2, dim=-1)  # [B, H] each
            # c = modReLU(W_c x + U_c (r ⊙ h))
            c = modrelu(torch.addmm(xc_t, r * h, U_c_t), self.bias_mod)  # [B, H]
            # h' = u ⊙ h + (1 − u) ⊙ c = c + u ⊙ (h − c), one fused lerp
            h = torch.lerp(c.to(h.dtype), h, u.to(h.dtype))  # [B, H]
            outs.append(h)
        return torch.stack(outs, dim=1), h  # [B, T, H], [B, H]
