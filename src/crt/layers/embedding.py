"""Token embedding at the input and the language-model head at the output, optionally tied."""

from __future__ import annotations

import torch
import torch.nn as nn


class TokenEmbedding(nn.Module):
    """e = E[token] in; logits = h W^T out, with W = E when tied (Press & Wolf 2017).

    vocab_size: number of token types.
    d_model: model width.
    tie: share the output projection with the input embedding (fewer parameters, and usually
        better perplexity on small corpora such as PTB).
    """

    def __init__(self, vocab_size: int, d_model: int, tie: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens.contiguous())  # [B, T] -> [B, T, D]  (int8's embedding needs contiguous ids)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)  # [B, T, D] -> [B, T, V]
