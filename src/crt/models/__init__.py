"""The models. Every one follows `logits, state = model(tokens, state)` (SPEC §2)."""

from __future__ import annotations

import torch.nn as nn

from crt.config import ModelConfig
from crt.models.armt import ARMT
from crt.models.crt import CRT
from crt.models.crvit import CRViT
from crt.models.rmt import RMT
from crt.models.transformer import Transformer
from crt.models.transformer_xl import TransformerXL
from crt.models.video_transformer import VideoTransformer

MODELS = {"crt": CRT, "transformer": Transformer, "transformer_xl": TransformerXL, "rmt": RMT, "armt": ARMT, "crvit": CRViT, "video_transformer": VideoTransformer}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model `cfg.arch` names, built from `cfg` (validated first)."""
    return MODELS[cfg.validate().arch](cfg)


__all__ = ["ARMT", "CRT", "MODELS", "RMT", "CRViT", "Transformer", "TransformerXL", "VideoTransformer", "build_model"]
