"""A synthetic frame-sequence task that only a memory can solve (seeded, no download)."""

from __future__ import annotations

import torch

from crt.data.clips import ClipSet, VideoData
from crt.errors import CRTError


def make_synthetic_video(
    classes: int = 4,
    frames_per_segment: int = 8,
    frame_shape: tuple[int, ...] = (8, 3),
    noise: float = 0.5,
    train_clips: int = 1024,
    valid_clips: int = 256,
    test_clips: int = 256,
    seed: int = 0,
) -> VideoData:
    """Clips of `classes` segments of `frames_per_segment` frames. Each segment shows one of
    `classes` fixed random patterns (plus Gaussian noise per frame); the patterns of a clip are
    a random permutation, and the label is the pattern of the first segment.

    Every clip holds every pattern exactly once, so a model that sees one segment at a time
    without memory (and pools over segments) gets the same evidence for every class: chance,
    1 / classes. Knowing which pattern came first needs a memory across segments (or attention
    over all frames).
    """
    if classes < 2 or frames_per_segment < 1:
        raise CRTError(f"synthetic video needs >= 2 classes and >= 1 frame per segment, got {classes} and {frames_per_segment}")
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, *frame_shape, generator=g)  # [C, *frame]

    def split(n: int, offset: int) -> ClipSet:
        gs = torch.Generator().manual_seed(seed * 1000 + offset)
        order = torch.rand(n, classes, generator=gs).argsort(dim=1)  # [N, C] pattern of each segment
        frames = patterns[order].repeat_interleave(frames_per_segment, dim=1)  # [N, C*F, *frame]
        frames = frames + noise * torch.randn(frames.shape, generator=gs)  # [N, C*F, *frame]
        return ClipSet(list(frames), order[:, 0].clone(), [f"clip{i}" for i in range(n)])

    note = f"{classes} segments of {frames_per_segment} frames; label = pattern of the first segment"
    return VideoData(
        "synthetic-video", [f"pattern{i}" for i in range(classes)], tuple(frame_shape), split(train_clips, 1), split(valid_clips, 2), split(test_clips, 3), note
    )
