"""int8 for CPU inference: dynamic quantization of the linear and GRU layers, int8 embeddings.

Weights of every nn.Linear (attention, feed-forward, memory projection, LM head) and nn.GRU
(CRT's memory RNN and recurrent positions) are stored as int8 with one scale per tensor;
activations are quantized on the fly per batch (dynamic quantization). Every nn.Embedding
(the token embedding, learned positions) is stored as int8 too, one scale and offset per row
(a lookup needs no activation quantization); with tied weights the head and the embedding
each get their int8 copy. Norms and the NCGRU (its recurrent matrix is a Cayley transform
computed from parameters) stay fp32.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """An int8 copy of `model` for CPU inference (the original is unchanged)."""
    from torch.ao.quantization import default_dynamic_qconfig, float_qparams_weight_only_qconfig, quantize_dynamic

    spec = {nn.Linear: default_dynamic_qconfig, nn.GRU: default_dynamic_qconfig, nn.Embedding: float_qparams_weight_only_qconfig}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates torch.ao in favour of torchao
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), spec, dtype=torch.qint8)
