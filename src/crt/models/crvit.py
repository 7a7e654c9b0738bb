"""CR-ViT: the Compact Recurrent Transformer over frame sequences (SPEC §5).

Each frame becomes one vector (an MLP of the joint coordinates for skeletons, a small ViT for
RGB frames); the frame vectors run through the CRT core one segment of F frames at a time,
exactly as CRT runs through tokens (memory token, recurrent positions, shallow transformer,
memory RNN: `CRTCore`, the module under the CRT language model, fed vectors through `encode`); the class is read from

    readout = memory:  m_N                          the final memory vector
              mean:    (1/T) sum_t h_t              the mean of every frame's output
              both:    [m_N ; mean]

    logits = W LN(readout) + b

The state carries the memory, the positional GRU's state and the running sum of frame outputs,
so `logits, state = model(frames, state, valid)` gives the prediction after every segment
(streaming classification), and a clip's last call gives its class.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from crt.config import ModelConfig
from crt.layers.frames import FRAME_OPTIONS, FrameEncoder, check_frame_options, parse_frame_shape, pool_frames
from crt.models.crt import CRTCore, CRTState


class CRViTState(NamedTuple):
    memory: torch.Tensor  # [B, d_m]  m_n
    positions: torch.Tensor  # [B, D]  the recurrent positional GRU's state
    total: torch.Tensor  # [B, D]  sum of the frame outputs so far
    count: torch.Tensor  # [B, 1]  frames so far


class CRViT(nn.Module):
    """Every choice comes from `cfg` (see `ModelConfig`): the CRT fields for the core;
    frame_shape, patch_size, frame_layers for the frame encoder; readout; num_classes."""

    # Options: the positions it accepts (the first is `auto`), the ModelConfig fields only it reads
    # (field -> when it reads them), and its checks of them (called by ModelConfig.validate).
    TASK = "video"
    POSITIONS = CRTCore.POSITIONS
    OPTIONS = {**CRTCore.OPTIONS, **dict.fromkeys((*FRAME_OPTIONS, "readout"))}

    @staticmethod
    def check_options(cfg: ModelConfig) -> list[tuple[bool, str]]:
        return [
            *check_frame_options(cfg),
            (
                cfg.memory_position != "append",
                "crvit needs memory_position prepend or none: clips end inside a segment and an appended memory token would follow the padding",
            ),
            (cfg.memory_reads != "memory_token", "crvit: memory_reads=memory_token needs an appended memory token; use tokens or last_token"),
            *(c for c in CRTCore.check_options(cfg) if "ncgru" in c[1]),
        ]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_classes < 1 or not cfg.frame_shape:
            raise ValueError("crvit needs num_classes and frame_shape (set from the data by crt train)")
        self.cfg = cfg
        D = cfg.d_model
        self.frames = FrameEncoder(parse_frame_shape(cfg.frame_shape), D, cfg.n_head, cfg.d_ff, cfg.patch_size, cfg.frame_layers, cfg.dropout)
        self.core = CRTCore(cfg)  # vocab_size 0: no token embedding, no LM head
        width = {"memory": cfg.memory_dim, "mean": D, "both": cfg.memory_dim + D}[cfg.readout]
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, cfg.num_classes))

    def init_state(self, batch_size: int, evaluation: bool = False) -> CRViTState:
        memory, positions = self.core.init_state(batch_size)
        zeros = torch.zeros(batch_size, self.cfg.d_model, device=memory.device)  # [B, D]
        return CRViTState(memory, positions, zeros, torch.zeros(batch_size, 1, device=memory.device))

    def forward(self, frames: torch.Tensor, state: CRViTState, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, CRViTState]:
        # frames: [B, T, *frame_shape], T <= segment_len; valid: bool [B, T] (a prefix per row) or None
        x = self.frames(frames)  # [B, T, D]
        h, core = self.core.encode(x, CRTState(state.memory, state.positions), valid)  # [B, T, D]
        total, count = pool_frames(state.total, state.count, h, valid)  # [B, D], [B, 1]
        mean = total / count.clamp(min=1)  # [B, D]
        readout = {"memory": core.memory, "mean": mean, "both": torch.cat([core.memory.to(mean.dtype), mean], dim=-1)}[self.cfg.readout]
        return self.head(readout), CRViTState(core.memory, core.positions, total, count)  # [B, C]
