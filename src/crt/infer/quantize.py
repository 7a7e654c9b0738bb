"""int8 for CPU inference: dynamic quantization of the linear and GRU layers.

Weights of every nn.Linear (attention, feed-forward, memory projection, LM head) and nn.GRU
(CRT's memory RNN and recurrent positions) are stored as int8 with one scale per tensor;
activations are quantized on the fly per batch. Embeddings, norms and the NCGRU (its
recurrent matrix is a Cayley transform computed from parameters) stay fp32.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """An int8 copy of `model` for CPU inference (the original is unchanged)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates torch.ao in favour of torchao, which is not a dependency
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear, nn.GRU}, dtype=torch.qint8)
