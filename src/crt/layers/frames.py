"""Per-frame encoders and the running mean over frames that video classifiers read out."""

from __future__ import annotations

import torch
import torch.nn as nn

from crt.layers.block import Block


def parse_frame_shape(text: str) -> tuple[int, ...]:
    """'20x3' -> (20, 3); '3x64x64' -> (3, 64, 64)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"frame_shape={text!r}: use JxC for skeleton joints (e.g. 20x3) or CxHxW for images (e.g. 3x64x64)")
    return shape


FRAME_OPTIONS = ("patch_size", "frame_layers")  # the frame encoder's options, read by both video models


def check_frame_options(cfg) -> list[tuple[bool, str]]:
    """The frame encoder's option checks (CR-ViT and the video transformer): (ok, message) pairs."""
    checks = [(cfg.patch_size >= 1 and cfg.frame_layers >= 1, "patch_size and frame_layers must be >= 1")]
    if cfg.frame_shape and checks[0][0]:
        try:
            shape = parse_frame_shape(cfg.frame_shape)
        except ValueError as e:
            return [(False, str(e))]
        checks.append(
            (
                len(shape) == 2 or (shape[1] % cfg.patch_size == 0 and shape[2] % cfg.patch_size == 0),
                f"patch_size={cfg.patch_size} does not divide the {cfg.frame_shape} frames: pick a divisor (or another --video-size)",
            )
        )
    return checks


class FrameEncoder(nn.Module):
    """One frame -> one vector of width d_model.

    frame_shape: (J, C) skeleton joints -> an MLP on the J*C flattened coordinates;
        (C, H, W) images -> a ViT: p x p patches embedded linearly, a class token, learned
        patch positions, `layers` bidirectional blocks, the class token's output.
    d_model, n_head, d_ff, dropout: width and blocks, as in the sequence model.
    patch_size: ViT patch side (must divide H and W).
    layers: ViT blocks per frame.

    forward(frames [B, T, *frame_shape]) -> [B, T, D]
    """

    def __init__(self, frame_shape: tuple[int, ...], d_model: int, n_head: int, d_ff: int, patch_size: int = 8, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.frame_shape = tuple(frame_shape)
        if len(frame_shape) == 2:
            J, C = frame_shape
            self.joints = nn.Sequential(nn.Linear(J * C, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        else:
            C, H, W = frame_shape
            if H % patch_size or W % patch_size:
                raise ValueError(f"patch_size={patch_size} does not divide the {H}x{W} frames: pick a divisor (or resize with --video-size)")
            n_patches = (H // patch_size) * (W // patch_size)
            self.patches = nn.Conv2d(C, d_model, patch_size, stride=patch_size)  # one linear map per p x p patch
            self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
            self.patch_positions = nn.Parameter(0.02 * torch.randn(1, n_patches + 1, d_model))
            self.blocks = nn.ModuleList(Block(d_model, n_head, d_ff, dropout, causal=False) for _ in range(layers))
            self.ln = nn.LayerNorm(d_model)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        # frames: [B, T, *frame_shape]
        B, T = frames.shape[:2]
        if len(self.frame_shape) == 2:
            return self.joints(frames.flatten(2))  # [B, T, D]
        x = self.patches(frames.flatten(0, 1))  # [B*T, D, H/p, W/p]
        x = x.flatten(2).transpose(1, 2)  # [B*T, N, D]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.patch_positions.to(x.dtype)  # [B*T, N+1, D]
        for block in self.blocks:
            x = block(x)  # [B*T, N+1, D]
        return self.ln(x[:, 0]).view(B, T, -1)  # [B, T, D] the class token per frame


def pool_frames(total: torch.Tensor, count: torch.Tensor, h: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one segment's valid frame outputs to a running sum (mean = total / count).

    total: [B, D]; count: [B, 1]; h: [B, T, D]; valid: bool [B, T] or None (all valid)
    """
    w = torch.ones(h.shape[:2], device=h.device) if valid is None else valid.to(h.dtype)  # [B, T]
    total = total + (h * w.unsqueeze(-1).to(h.dtype)).sum(dim=1).to(total.dtype)  # [B, D]
    return total, count + w.sum(dim=1, keepdim=True).to(count.dtype)  # [B, D], [B, 1]
