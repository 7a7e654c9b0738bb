"""Weight initialisation shared by every model."""

import torch.nn as nn


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) for linear and embedding weights, zero biases, unit LayerNorm.

    Recurrent cells (GRU, NCGRU) keep their own initialisation: apply this with
    `model.apply(init_weights)` before building them, or skip them explicitly.
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, 0.0, std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
