"""RGB frame sequences: Toyota Smarthome's layout (mp4 clips, or folders of frame images) and
its cross-subject and cross-view protocols, decoded on demand into a `VideoData`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crt.data.clips import ClipSet, LazyClips, VideoData, sample_frames
from crt.errors import CRTError

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
        raise CRTError(f'decoding RGB clips needs the optional video extra ({module} is missing): pip install -e ".[video]"') from None


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
            raise CRTError(
                f"class {unknown[0]!r} in {where} has no training clip ({len(unknown)} such classes): add training clips of it or drop it from the list"
            )

    def decode(p: Path) -> torch.Tensor:
        return decode_frame_folder(p, size, max_frames) if p.is_dir() else decode_video(p, size, max_frames)

    sets = {s: ClipSet(LazyClips([clips[n] for n in names[s]], decode), torch.tensor([index[activity_of(n)] for n in names[s]]), names[s]) for s in names}
    note = f"{protocol} from {source}; valid = test"
    return VideoData("smarthome", classes, (3, size, size), sets["train"], sets["test"], sets["test"], note)
