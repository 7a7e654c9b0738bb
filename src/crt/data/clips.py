"""Frame sequences for classification: what every video loader returns, and batching.

Every loader (`crt.data.skeletons`, `crt.data.rgb`, `crt.data.synthetic_video`) returns a
`VideoData`: train/valid/test `ClipSet`s, each clip a float tensor [T, *frame_shape] with
T >= 1 and a class index. Skeleton clips are held in memory (MSR Action3D is 17 MB of text);
RGB clips are decoded when a batch asks for them.

    skeleton frame: [J, 3]   joint positions (x, y, z), y pointing up
    RGB frame:      [3, S, S] floats in [0, 1], resized to S x S
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch


@dataclass
class VideoOptions:
    """The frame-sequence data's fields of TrainConfig (task = video): clips, skeleton transforms,
    training augmentation, RGB size and protocol, the synthetic video task."""

    video_max_frames: int = 64  # frames per clip at most (evenly spaced); 0: all
    video_normalise: bool = True  # skeletons: centre on the clip's centroid, unit RMS joint distance
    video_motion: bool = False  # skeletons: append each joint's velocity (x_t - x_(t-1)) to its position (frames J x 6)
    video_rotate: float = 0.0  # training augmentation: skeleton rotation about the vertical axis, up to +- degrees
    video_scale: float = 0.0  # training augmentation: skeleton scale in [1 - s, 1 + s]
    video_crop: float = 1.0  # training augmentation: temporal crop keeping a random share in [crop, 1] of the frames; 1: none
    video_size: int = 64  # RGB frames are resized to this square size
    video_protocol: str = "cross_subject"  # smarthome: cross_subject | cross_view1 | cross_view2
    video_classes: int = 4  # synthetic-video: classes, one segment each
    video_noise: float = 0.5  # synthetic-video: noise on every frame

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"video_protocol": ("cross_subject", "cross_view1", "cross_view2")}
    RANGES: ClassVar[dict[str, str]] = {
        "video_max_frames": "[0,", "video_rotate": "[0,180]", "video_scale": "[0,1)", "video_crop": "(0,1]", "video_size": "[1,",
        "video_classes": "[2,", "video_noise": "[0,",
    }  # fmt: skip
    USED_BY: ClassVar[dict] = dict.fromkeys(
        (
            "video_max_frames",
            "video_normalise",
            "video_motion",
            "video_rotate",
            "video_scale",
            "video_crop",
            "video_size",
            "video_protocol",
            "video_classes",
            "video_noise",
        ),
        ("task = video", lambda m, t: t.task == "video"),
    )


@dataclass
class ClipSet:
    """Clips of one split. clips[i]: [T_i, *frame_shape]; labels: [N] class indices."""

    clips: Sequence[torch.Tensor]
    labels: torch.Tensor  # [N] long
    names: list[str]  # one per clip (file or folder name), for error messages and reports

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class VideoData:
    name: str
    classes: list[str]
    frame_shape: tuple[int, ...]
    train: ClipSet
    valid: ClipSet
    test: ClipSet
    note: str = ""  # how the splits were made, printed by `crt train`


class LazyClips(Sequence):
    """clips[i] = decode(paths[i]), decoded when asked for (RGB clips do not fit in memory)."""

    def __init__(self, paths: list[Path], decode: Callable[[Path], torch.Tensor]):
        self.paths, self.decode = paths, decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return self.decode(self.paths[i])


# ----------------------------------------------------------------------------- batching


def pad_clips(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack clips of different lengths, zero-padded at the end.

    clips: B tensors [T_i, *frame]  ->  frames [B, max T_i, *frame], lengths [B]
    """
    lengths = torch.tensor([len(c) for c in clips])  # [B]
    frames = torch.zeros(len(clips), int(lengths.max()), *clips[0].shape[1:], dtype=clips[0].dtype)  # [B, T, *frame]
    for i, c in enumerate(clips):
        frames[i, : len(c)] = c
    return frames, lengths


def sample_frames(clip: torch.Tensor, max_frames: int, crop: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """At most max_frames frames of a clip, evenly spaced; with crop < 1 (training) first a
    random contiguous window of a random share in [crop, 1] of the clip (temporal crop).

    clip: [T, *frame]  ->  [T', *frame], T' <= max_frames (0 means no cap)
    """
    T = len(clip)
    if crop < 1.0:
        share = crop + (1.0 - crop) * float(torch.rand((), generator=generator))
        keep = max(1, round(T * share))
        start = int(torch.randint(T - keep + 1, (), generator=generator))
        clip, T = clip[start : start + keep], keep
    if max_frames and T > max_frames:
        idx = torch.linspace(0, T - 1, max_frames).round().long()  # [max_frames]
        clip = clip[idx]
    return clip
