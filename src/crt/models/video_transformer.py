"""The transformer baselines of CR-ViT: a segment-limited transformer and, with a segment as
long as the clip, an all-frames transformer.

Frames are encoded as in CR-ViT (`FrameEncoder`), then each segment of F frames runs through
causal blocks with positions 0..F-1 and nothing carried between segments; the class is read
from the mean of all frame outputs so far, logits = W LN(mean_t h_t) + b. With F shorter than
a clip, no frame sees a frame of another segment (the segment-limited baseline); with F at
least the clip length (`video_max_frames`), every frame sees all earlier ones.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from crt.config import ModelConfig
from crt.layers import AbsolutePositions, SegmentTrunk, init_weights
from crt.layers.frames import FRAME_OPTIONS, FrameEncoder, check_frame_options, parse_frame_shape, pool_frames


class PooledState(NamedTuple):
    total: torch.Tensor  # [B, D]  sum of the frame outputs so far
    count: torch.Tensor  # [B, 1]  frames so far


class VideoTransformer(SegmentTrunk):
    """d_model, n_layer, n_head, d_ff, dropout, positions, segment_len from `cfg`, as for the
    language-model Transformer; frame_shape, patch_size, frame_layers, num_classes as CR-ViT's."""

    # Options: the positions it accepts (the first is `auto`), the ModelConfig fields only it reads
    # (field -> when it reads them), and its checks of them (called by ModelConfig.validate).
    TASK = "video"
    POSITIONS = ("learned", "sinusoidal", "rotary")
    OPTIONS = dict.fromkeys(FRAME_OPTIONS)

    @staticmethod
    def check_options(cfg: ModelConfig) -> list[tuple[bool, str]]:
        return check_frame_options(cfg)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_classes < 1 or not cfg.frame_shape:
            raise ValueError("video_transformer needs num_classes and frame_shape (set from the data by crt train)")
        self.cfg = cfg
        D = cfg.d_model
        self.positions = AbsolutePositions(cfg.position_encoding, max(cfg.segment_len, cfg.eval_segment_len), D, cfg.n_head)
        self.build_trunk(cfg)
        self.apply(init_weights)  # the sequence model as the language-model Transformer's
        # frame encoder and classifier built after, with torch's initialisation, exactly as in CR-ViT
        self.frames = FrameEncoder(parse_frame_shape(cfg.frame_shape), D, cfg.n_head, cfg.d_ff, cfg.patch_size, cfg.frame_layers, cfg.dropout)
        self.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, cfg.num_classes))

    def init_state(self, batch_size: int, evaluation: bool = False) -> PooledState:
        device = self.ln_f.weight.device
        return PooledState(torch.zeros(batch_size, self.cfg.d_model, device=device), torch.zeros(batch_size, 1, device=device))

    def forward(self, frames: torch.Tensor, state: PooledState, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, PooledState]:
        # frames: [B, T, *frame_shape]; valid: bool [B, T] (a prefix per row) or None
        h, attn_kwargs = self.positions(self.frames(frames))  # [B, T, D]
        h = self.trunk(h, attn_kwargs)  # [B, T, D] causal: padding at the end changes no valid frame
        total, count = pool_frames(state.total, state.count, h, valid)  # [B, D], [B, 1]
        return self.head(total / count.clamp(min=1)), PooledState(total, count)  # [B, C]
