"""Frame sequences for classification: skeletons (MSR Action3D), RGB clips (Toyota Smarthome
layout, folders of frames) and a synthetic task that only a memory can solve.

Every loader returns a `VideoData`: train/valid/test `ClipSet`s, each clip a float tensor
[T, *frame_shape] with T >= 1 and a class index. Skeleton clips are held in memory (MSR
Action3D is 17 MB of text); RGB clips are decoded when a batch asks for them.

    skeleton frame: [J, 3]   joint positions (x, y, z), y pointing up
    RGB frame:      [3, S, S] floats in [0, 1], resized to S x S
"""

from __future__ import annotations

import math
import re
import tarfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crt.errors import CRTError


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


def augment_skeleton(clip: torch.Tensor, rotate: float, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random rotation about the vertical (y) axis by up to +-rotate degrees and a random
    isotropic scale in [1 - scale, 1 + scale]: one draw per clip, applied to every (x, y, z)
    triple of a joint (its position, and its velocity when `add_motion` appended one).

    clip: [T, J, 3k]  ->  [T, J, 3k]
    """
    theta = math.radians(rotate) * (2 * float(torch.rand((), generator=generator)) - 1)
    s = 1 + scale * (2 * float(torch.rand((), generator=generator)) - 1)
    c, si = math.cos(theta), math.sin(theta)
    R = torch.tensor([[c, 0.0, si], [0.0, 1.0, 0.0], [-si, 0.0, c]], dtype=clip.dtype)  # [3, 3] rotation about y
    T, J, C = clip.shape
    return (s * clip.view(T, J, C // 3, 3) @ R.T).view(T, J, C)  # [T, J, 3k]


def add_motion(clip: torch.Tensor) -> torch.Tensor:
    """Append each joint's velocity, v_t = x_t - x_{t-1} (v_0 = 0), to its position:
    [T, J, 3] -> [T, J, 6]. A frame then says where the joints are and where they move."""
    velocity = torch.cat([torch.zeros_like(clip[:1]), clip[1:] - clip[:-1]])  # [T, J, 3]
    return torch.cat([clip, velocity], dim=-1)  # [T, J, 6]


def normalise_skeleton(clip: torch.Tensor) -> torch.Tensor:
    """Translation and scale invariance: subtract the clip's centroid (all joints, all frames),
    divide by the RMS distance of the joints from it. [T, J, 3] -> [T, J, 3]"""
    centred = clip - clip.mean(dim=(0, 1), keepdim=True)  # [T, J, 3]
    return centred / centred.pow(2).sum(-1).mean().sqrt().clamp(min=1e-6)


# ----------------------------------------------------------------------------- MSR Action3D

MSR_ACTIONS = (
    "high arm wave", "horizontal arm wave", "hammer", "hand catch", "forward punch", "high throw", "draw x", "draw tick",
    "draw circle", "hand clap", "two hand wave", "side boxing", "bend", "forward kick", "side kick", "jogging",
    "tennis swing", "tennis serve", "golf swing", "pick up & throw",
)
MSR_ARCHIVE = "MSRAction3DSkeletonReal3D.tar.xz"
_MSR_NAME = re.compile(r"a(\d\d)_s(\d\d)_e(\d\d)_skeleton3D\.txt$")
MSR_JOINTS = 20


def _msr_files(path: Path) -> list[tuple[str, bytes]]:
    """(file name, contents) of every MSR Action3D skeleton file under `path`: the .tar.xz
    archive itself, a folder holding it, or a folder of the unpacked text files."""
    if not path.exists():
        raise CRTError(f"MSR Action3D not found at {path}: give --data-dir the folder holding {MSR_ARCHIVE} (or the archive, or its unpacked folder)")
    archive = path if path.is_file() else path / MSR_ARCHIVE
    if archive.is_file():
        try:
            with tarfile.open(archive) as tar:
                return [(Path(m.name).name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile() and _MSR_NAME.search(m.name)]
        except (tarfile.TarError, EOFError, OSError) as e:
            raise CRTError(f"{archive} is not a readable .tar.xz archive ({e}): download it again") from None
    files = sorted(p for p in path.rglob("*_skeleton3D.txt") if _MSR_NAME.search(p.name))
    return [(p.name, p.read_bytes()) for p in files]


def load_msr_action3d(path: str | Path, normalise: bool = True, motion: bool = False) -> VideoData:
    """MSR Action3D skeletons (Li, Zhang, Liu 2010) with the standard cross-subject split:
    odd subjects (1, 3, 5, 7, 9) train, even subjects test. The dataset has no validation
    split; `valid` is the test split, scored during training for the curves only (nothing is
    selected on it). Clips whose joints are all zero (a13_s09_e02, a known defect) are skipped
    with a warning. Frames: [20, 3] joint positions in metres (x, y up, z depth), normalised
    by `normalise_skeleton` unless normalise=False; [20, 6] with their velocities (`add_motion`)
    when motion=True.
    """
    path = Path(path)
    files = _msr_files(path)
    if not files:
        raise CRTError(f"no MSR Action3D skeleton files (aXX_sXX_eXX_skeleton3D.txt) in {path}: unpack {MSR_ARCHIVE} there or name the folder that holds it")
    splits: dict[str, tuple[list, list, list]] = {"train": ([], [], []), "test": ([], [], [])}
    for name, data in sorted(files):
        action, subject, _ = (int(g) for g in _MSR_NAME.search(name).groups())
        if not 1 <= action <= len(MSR_ACTIONS):
            raise CRTError(f"{name}: action {action} is not one of MSR Action3D's 20 (a01..a20): remove the file")
        values = np.array(data.split(), dtype=np.float32)
        if values.size == 0:
            raise CRTError(f"{name} in {path} is an empty clip (no frames): remove it or restore it from the archive")
        if values.size % (MSR_JOINTS * 4):
            raise CRTError(f"{name} has {values.size} numbers, not a multiple of {MSR_JOINTS} joints x 4 (x y z c): the file is damaged; restore it from the archive")
        clip = torch.from_numpy(values.reshape(-1, MSR_JOINTS, 4)[..., :3].copy())  # [T, 20, 3]
        if not clip.any():
            warnings.warn(f"skipping {name}: every joint is zero (a known defect of MSR Action3D)", stacklevel=2)
            continue
        clips, labels, names = splits["train" if subject % 2 else "test"]
        clip = normalise_skeleton(clip) if normalise else clip
        clips.append(add_motion(clip) if motion else clip)
        labels.append(action - 1)
        names.append(name)
    sets = {s: ClipSet(c, torch.tensor(lab, dtype=torch.long), n) for s, (c, lab, n) in splits.items()}
    for s, cs in sets.items():
        if not len(cs):
            raise CRTError(f"MSR Action3D in {path} has no {s} clips ({'odd' if s == 'train' else 'even'} subjects): the folder is incomplete")
    note = "cross-subject split: odd subjects train, even subjects test; valid = test (MSR Action3D has no validation split)"
    return VideoData("msr-action3d", list(MSR_ACTIONS), (MSR_JOINTS, 6 if motion else 3), sets["train"], sets["test"], sets["test"], note)


# ----------------------------------------------------------------------------- RGB: Toyota Smarthome layout and frame folders

# Toyota Smarthome (Das et al., ICCV 2019) names clips Activity_pSS_rRR_vVV_cCC; the protocols
# of the paper: cross-subject trains on 11 subjects and tests on the other 7; cross-view
# CV1 trains on camera 1, CV2 on cameras 1, 3, 4, 6, 7, both test on camera 2.
SMARTHOME_CS_TRAIN = (3, 4, 6, 7, 9, 12, 13, 15, 17, 19, 25)
SMARTHOME_CV_TRAIN = {"cross_view1": (1,), "cross_view2": (1, 3, 4, 6, 7)}
SMARTHOME_CV_TEST = 2
_SMARTHOME_NAME = re.compile(r"^(?P<activity>.+?)_p(?P<subject>\d+)(?:_r\d+)?(?:_v\d+)?_c(?P<camera>\d+)$")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise CRTError(f"decoding RGB clips needs the optional video extra ({module} is missing): pip install -e \".[video]\"") from None


def _resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, size, size] in [0, 1]."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W]
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)  # [T, 3, S, S]


def decode_video(path: Path, size: int, max_frames: int) -> torch.Tensor:
    """An mp4 (or any file PyAV reads) -> [T, 3, size, size], at most max_frames evenly spaced."""
    av = _need("av")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.error.FFmpegError as e:
        raise CRTError(f"cannot decode {path} ({e}): the file is damaged or not a video") from None
    if not frames:
        raise CRTError(f"{path} is an empty clip (no frames): remove it from the data and the split lists")
    return sample_frames(_resize(torch.from_numpy(np.stack(frames)), size), max_frames)


def decode_frame_folder(path: Path, size: int, max_frames: int) -> torch.Tensor:
    """A folder of images (sorted by name) -> [T, 3, size, size], at most max_frames evenly spaced."""
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise CRTError(f"{path} is an empty clip (no {'/'.join(_IMAGE_SUFFIXES)} frames): remove it from the data and the split lists")
    if max_frames and len(images) > max_frames:
        images = [images[int(i)] for i in torch.linspace(0, len(images) - 1, max_frames).round().long()]
    _need("PIL")
    from PIL import Image
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    return _resize(torch.from_numpy(np.stack(arrays)), size)


def _protocol_split(name: str, protocol: str) -> str | None:
    """train | test | None (not used by the protocol) for a clip named like Toyota Smarthome's."""
    m = _SMARTHOME_NAME.match(name)
    if m is None:
        raise CRTError(f"clip {name!r} is not named Activity_pXX_..._cXX: add split lists (splits/{protocol}_train.txt, _test.txt) or rename it")
    subject, camera = int(m["subject"]), int(m["camera"])
    if protocol == "cross_subject":
        return "train" if subject in SMARTHOME_CS_TRAIN else "test"
    if protocol in SMARTHOME_CV_TRAIN:
        return "train" if camera in SMARTHOME_CV_TRAIN[protocol] else "test" if camera == SMARTHOME_CV_TEST else None
    raise CRTError(f"unknown protocol {protocol!r}: use cross_subject, cross_view1 or cross_view2")


def activity_of(name: str) -> str:
    """The class of a clip named Activity_pXX_..., i.e. everything before _pXX."""
    m = _SMARTHOME_NAME.match(name)
    return m["activity"] if m else name.split("_")[0]


def load_smarthome(path: str | Path, protocol: str = "cross_subject", size: int = 64, max_frames: int = 64) -> VideoData:
    """RGB clips in the Toyota Smarthome layout:

        DIR/mp4/Activity_pXX_rXX_vXX_cXX.mp4     (or DIR/frames/<same name>/0001.jpg ...)
        DIR/splits/{protocol}_train.txt, {protocol}_test.txt   optional: one clip name per line

    Without split lists the protocol is applied to the names (SMARTHOME_* above). The class
    is the activity before _pXX; a class in the test list that no training clip has is an
    error. valid = test (the protocols define no validation split). Decoding needs the
    `video` extra (PyAV for mp4, Pillow for frames).
    """
    root = Path(path)
    if not root.is_dir():
        raise CRTError(f"video folder {root} does not exist: give --data-dir the folder holding mp4/ (or frames/)")
    clips: dict[str, Path] = {}
    if (root / "mp4").is_dir():
        clips.update({p.stem: p for p in sorted((root / "mp4").iterdir()) if p.suffix.lower() in (".mp4", ".avi", ".mkv", ".webm")})
    if (root / "frames").is_dir():
        clips.update({p.name: p for p in sorted((root / "frames").iterdir()) if p.is_dir()})
    if not clips:
        raise CRTError(f"no clips in {root}: put videos in {root / 'mp4'} or frame folders in {root / 'frames'}")
    lists = {s: root / "splits" / f"{protocol}_{s}.txt" for s in ("train", "test")}
    if all(p.is_file() for p in lists.values()):
        names = {}
        for s, p in lists.items():
            names[s] = [line.strip().removesuffix(".mp4") for line in p.read_text().splitlines() if line.strip()]
            missing = [n for n in names[s] if n not in clips]
            if missing:
                raise CRTError(f"{p} names {len(missing)} clip(s) not in {root} (first: {missing[0]}): fix the list or add the clip")
        source = f"split lists {lists['train'].name}, {lists['test'].name}"
    else:
        names = {"train": [], "test": []}
        for n in clips:
            split = _protocol_split(n, protocol)
            if split:
                names[split].append(n)
        source = f"the {protocol} protocol applied to the clip names"
    classes = sorted({activity_of(n) for n in names["train"]})
    index = {c: i for i, c in enumerate(classes)}
    for s in ("train", "test"):
        if not names[s]:
            raise CRTError(f"{protocol}: no {s} clips in {root} ({source}): check the names or the split lists")
        unknown = sorted({activity_of(n) for n in names[s]} - set(index))
        if unknown:
            where = lists[s] if lists[s].is_file() else root
            raise CRTError(f"class {unknown[0]!r} in {where} has no training clip ({len(unknown)} such classes): add training clips of it or drop it from the list")

    def decode(p: Path) -> torch.Tensor:
        return decode_frame_folder(p, size, max_frames) if p.is_dir() else decode_video(p, size, max_frames)

    sets = {s: ClipSet(LazyClips([clips[n] for n in names[s]], decode), torch.tensor([index[activity_of(n)] for n in names[s]]), names[s]) for s in names}
    note = f"{protocol} from {source}; valid = test"
    return VideoData("smarthome", classes, (3, size, size), sets["train"], sets["test"], sets["test"], note)


# ----------------------------------------------------------------------------- synthetic


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
    return VideoData("synthetic-video", [f"pattern{i}" for i in range(classes)], tuple(frame_shape), split(train_clips, 1), split(valid_clips, 2), split(test_clips, 3), note)
