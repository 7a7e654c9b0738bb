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

# The one registry: arch name -> model class. Each class declares its options beside its maths
# (POSITIONS, OPTIONS, check_options; TASK "video" for the frame-sequence classifiers).
MODELS = {
    "crt": CRT,
    "transformer": Transformer,
    "transformer_xl": TransformerXL,
    "rmt": RMT,
    "armt": ARMT,
    "crvit": CRViT,
    "video_transformer": VideoTransformer,
}
VIDEO_ARCHS = tuple(arch for arch, model in MODELS.items() if getattr(model, "TASK", "lm") == "video")  # task = video


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model `cfg.arch` names, built from `cfg` (validated first)."""
    return MODELS[cfg.validate().arch](cfg)


__all__ = ["ARMT", "CRT", "MODELS", "RMT", "VIDEO_ARCHS", "CRViT", "Transformer", "TransformerXL", "VideoTransformer", "build_model"]
