"""MSR Action3D skeletons (20 joints, 20 actions, 10 subjects): the archive, its unpacked
folder or a folder of its files, read into a `VideoData` (`crt.data.clips`)."""

from __future__ import annotations

import math
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch

from crt.data.clips import ClipSet, VideoData
from crt.errors import CRTError


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


MSR_ACTIONS = (
    "high arm wave",
    "horizontal arm wave",
    "hammer",
    "hand catch",
    "forward punch",
    "high throw",
    "draw x",
    "draw tick",
    "draw circle",
    "hand clap",
    "two hand wave",
    "side boxing",
    "bend",
    "forward kick",
    "side kick",
    "jogging",
    "tennis swing",
    "tennis serve",
    "golf swing",
    "pick up & throw",
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
            raise CRTError(
                f"{name} has {values.size} numbers, not a multiple of {MSR_JOINTS} joints x 4 (x y z c): the file is damaged; restore it from the archive"
            )
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
