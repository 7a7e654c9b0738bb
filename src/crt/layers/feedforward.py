"""Position-wise feed-forward network."""

import torch
import torch.nn as nn


class FeedForward(nn.Module):
    """FF(x) = W_2 dropout(GELU(W_1 x + b_1)) + b_2.

    d_model: input and output width.
    d_ff: hidden width (usually 4 * d_model).
    dropout: dropout after the activation.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D]
        return self.down(self.drop(nn.functional.gelu(self.up(x))))  # [B, T, D]
