"""ARMT's layer-local associative memory (Rodkin et al. 2024), with the DPFP feature map.

One memory per layer: a matrix A [d_phi, d_v] and a normaliser z [d_phi] per head. Every
hidden state reads from it before the layer; the layer's memory-token outputs write to it
after the layer with the delta rule:

    read:   q = phi(W_q h)                          o = A^T q / max(z . q, 1)         h += o
    write:  k = phi(W_k m),  v = W_v m,  b = sigmoid(W_b m)      (m: memory-token outputs)
            v_old = A^T k / max(z . k, 1)                         what A returns for k now
            A    += sum_j b_j  k_j (v_j - v_old_j)^T             replace v_old by v, gated
            z    += sum_j g_j  k_j,    g_j = clip(1 - z . k_j / |k_j|^2, 0, 1)

phi is DPFP-nu (Schlag et al. 2021), L2-normalised:  x' = [relu(x), relu(-x)],
phi(x) = concat_{i=1..nu} x' * roll(x', i),  so d_phi = 2 nu d_key. The correction term g
counts a key in z only as far as it is new: a key already stored (z . k = |k|^2) adds
nothing, so writing the same key twice rewrites its value instead of averaging two. The
original divides by z . q + eps; `floor` (below) says why we divide by max(z . q, 1).

The all-zero memory is the empty memory: it reads 0, v_old = 0 and g = 1, which is
exactly what ARMT does on its first segment, so no "first segment" flag is needed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-5  # the original's normaliser offset (floor=False), and a guard against |k| = 0


def dpfp(x: torch.Tensor, nu: int) -> torch.Tensor:
    """Deterministic parameter-free projection: [..., d] -> [..., 2 nu d], non-negative."""
    x = torch.cat([F.relu(x), F.relu(-x)], dim=-1)  # [..., 2d]
    return torch.cat([x * x.roll(i, dims=-1) for i in range(1, nu + 1)], dim=-1)  # [..., 2 nu d]


class AssociativeMemory(nn.Module):
    """Read from and write to one layer's associative memory (A, z).

    d_model: width of the hidden states it reads for and the memory tokens it writes from.
    d_key: width of the keys and queries before the feature map (split across heads).
    n_head: independent memories per layer; each sees d_key / n_head of the key and
        d_model / n_head of the value.
    nu: DPFP order; the feature width per head is 2 * nu * d_key / n_head.
    correction: count a key in z only as far as it is new (g above); False adds every key fully.
    floor: divide by max(z . q, 1) instead of the original's z . q + eps. A query that overlaps the
        stored keys only a little has a tiny z . q, and dividing by it rescales a weak match to full
        strength, and whatever A holds in that direction with it (up to 1/eps). Trained from
        scratch on PTB (width 128, lr 2e-3) the original's loss rose from step 50 to 100 and the
        run ended at twice the Transformer's perplexity (docs/results/ptb-early.md, ptb-notes.md); with
        the floor a weak match stays weak, a stored unit key (z . k = 1) still returns exactly its
        value, and several stored keys are still averaged.

    State shapes (per batch row): A [H, d_phi, d_v], z [H, d_phi], with d_v = d_model / H.
    """

    def __init__(self, d_model: int, d_key: int, n_head: int = 1, nu: int = 3, correction: bool = True, floor: bool = True):
        super().__init__()
        self.floor = floor
        if d_key % n_head or d_model % n_head:
            raise ValueError(f"associative memory: d_key={d_key} and d_model={d_model} must be divisible by its {n_head} heads")
        self.n_head, self.nu, self.correction = n_head, nu, correction
        self.d_phi = 2 * nu * d_key // n_head
        self.d_value = d_model // n_head
        self.query = nn.Linear(d_model, d_key, bias=False)
        self.key = nn.Linear(d_model, d_key, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(d_model, n_head)  # write gate b, one per head

    def empty(self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty memory: A [B, H, d_phi, d_v] and z [B, H, d_phi], all zeros."""
        A = torch.zeros(batch_size, self.n_head, self.d_phi, self.d_value, device=device, dtype=dtype)
        return A, torch.zeros(batch_size, self.n_head, self.d_phi, device=device, dtype=dtype)

    def _features(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D] -> phi per head, unit norm: [B, H, T, d_phi]
        B, T, _ = x.shape
        heads = proj(x).view(B, T, self.n_head, -1).transpose(1, 2)  # [B, H, T, d_key/H]
        return F.normalize(dpfp(heads, self.nu), dim=-1)  # [B, H, T, d_phi]

    def _lookup(self, A: torch.Tensor, z: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A^T phi / max(z . phi, 1) (or z . phi + eps) and z . phi; phi: [B, H, T, d_phi]
        num = phi @ A  # [B, H, T, d_v]
        zphi = (phi @ z.unsqueeze(-1)).squeeze(-1)  # [B, H, T]
        denom = zphi.clamp_min(1.0) if self.floor else zphi + EPS  # [B, H, T]
        return num / denom.unsqueeze(-1), zphi  # [B, H, T, d_v], [B, H, T]

    def read(self, h: torch.Tensor, A: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """o = A^T phi(W_q h) / (z . phi(W_q h) + eps), heads concatenated: [B, T, D]."""
        B, T, D = h.shape
        out, _ = self._lookup(A, z, self._features(self.query, h))  # [B, H, T, d_v]
        return out.transpose(1, 2).reshape(B, T, D)  # [B, T, D]

    def write(self, m: torch.Tensor, A: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory after writing the memory-token outputs m [B, k, D]: (A', z')."""
        B, k, D = m.shape
        phi = self._features(self.key, m)  # [B, H, k, d_phi]
        v = self.value(m).view(B, k, self.n_head, self.d_value).transpose(1, 2)  # [B, H, k, d_v]
        b = torch.sigmoid(self.gate(m)).transpose(1, 2).unsqueeze(-1)  # [B, H, k, 1]
        v_old, zphi = self._lookup(A, z, phi)  # [B, H, k, d_v], [B, H, k]
        A = A + phi.transpose(-1, -2) @ (b * (v - v_old))  # [B, H, d_phi, d_v]  sum_j b_j k_j (v_j - v_old_j)^T
        if self.correction:
            # how new each key is; a fixed coefficient, as in the original (no gradient through it)
            g = (1 - zphi / phi.pow(2).sum(-1).clamp_min(EPS)).clamp(0, 1).detach()  # [B, H, k]
        else:
            g = torch.ones_like(zphi)  # [B, H, k]
        z = z + (g.unsqueeze(-1) * phi).sum(dim=2)  # [B, H, d_phi]
        return A, z
