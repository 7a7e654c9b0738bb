"""torch's GRU with the (x [B, T, I], h [B, H]) -> (out [B, T, H], h_last [B, H]) convention of NCGRU.

CRT's memory RNN and its recurrent positions both use it. torch's own kernel is kept on CPU:
a hand-written sequence kernel (one autograd node per sequence, backward by hand) trained no
faster at CRT's sizes and streamed slower at batch 1 (docs/results/speed-notes.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class GRU(nn.Module):
    """One-layer GRU over [B, T, I] with an explicit initial state [B, H].

    input_size: width of x; hidden_size: width of h (and of every output).
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.gru = nn.GRU(input_size, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, T, I], h: [B, H]
        out, h_last = self.gru(x, h.unsqueeze(0).to(x.dtype).contiguous())  # [B, T, H], [1, B, H]  (cuDNN needs h contiguous)
        return out, h_last.squeeze(0)

    @torch.no_grad()
    def set_keep_bias(self, bias: torch.Tensor) -> None:
        """Set the bias of z in h' = (1 - z) * n + z * h (torch orders the gates r, z, n)."""
        H = self.gru.hidden_size
        self.gru.bias_ih_l0[H : 2 * H].zero_()  # torch has two biases per gate; keep one
        self.gru.bias_hh_l0[H : 2 * H].copy_(bias)


def gru_flops(input_size: int, hidden_size: int, steps: int) -> float:
    """Forward FLOPs of a GRU or NCGRU over `steps` inputs: three gates, each W x and U h."""
    return 2 * steps * 3 * (input_size * hidden_size + hidden_size * hidden_size)
