"""Frame-sequence classification: CR-ViT, the video transformer, the loaders, training and the CLI."""

from __future__ import annotations

import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import in_process, interrupted_copy, one_line_error

from crt.checkpoint import load_checkpoint
from crt.config import ModelConfig, apply_overrides, load_preset
from crt.data.clips import pad_clips, sample_frames
from crt.data.rgb import load_smarthome
from crt.data.skeletons import MSR_ARCHIVE, augment_skeleton, load_msr_action3d
from crt.data.synthetic_video import make_synthetic_video
from crt.errors import CRTError
from crt.models import build_model
from crt.train.loop import train
from crt.train.metrics import read_metrics
from crt.train.video import classify, evaluate_clips

MSR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "video"
SMALL = dict(d_model=32, n_layer=2, n_head=4, d_ff=64, segment_len=8, num_classes=5)


def video_model(arch: str, frame_shape: str = "6x3", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, frame_shape=frame_shape, **{**SMALL, **kw})).eval()


MODELS = [
    ("crvit", "6x3", {"readout": "memory"}),
    ("crvit", "6x3", {"readout": "mean"}),
    ("crvit", "6x3", {"readout": "both", "memory_cell": "ncgru"}),
    ("crvit", "6x3", {"readout": "memory", "memory_reads": "last_token"}),
    ("crvit", "6x3", {"readout": "memory", "carry_rpe": False}),
    ("crvit", "6x3", {"readout": "both", "positions": "sinusoidal"}),
    ("crvit", "6x3", {"readout": "memory", "memory_position": "none"}),
    ("crvit", "3x16x16", {"readout": "both", "patch_size": 8}),
    ("video_transformer", "6x3", {}),
    ("video_transformer", "3x16x16", {"patch_size": 8}),
    ("video_transformer", "6x3", {"segment_len": 32}),  # all frames in one segment
]


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("arch,shape,kw", MODELS)
def test_padding_never_changes_a_prediction(arch, shape, kw):
    """Clips of 5, 13 and 20 frames in one padded batch get exactly the logits each gets alone,
    across segment boundaries (segments of 8 frames)."""
    model = video_model(arch, shape, **kw)
    g = torch.Generator().manual_seed(1)
    frame = tuple(int(v) for v in shape.split("x"))
    clips = [torch.randn(n, *frame, generator=g) for n in (5, 13, 20)]
    frames, lengths = pad_clips(clips)  # [3, 20, *frame]
    assert frames.shape == (3, 20, *frame) and lengths.tolist() == [5, 13, 20]
    frames[0, 5:] = 1e3  # garbage in the padding must not leak
    frames[1, 13:] = -1e3
    with torch.no_grad():
        batched = classify(model, frames, lengths, model.cfg.segment_len)  # [3, C]
        alone = torch.cat([classify(model, c.unsqueeze(0), torch.tensor([len(c)]), model.cfg.segment_len) for c in clips])
    assert batched.shape == (3, 5)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("readout", ["memory", "both"])
def test_crvit_memory_carries_an_early_segment(readout):
    """Changing only the first segment of a 24-frame clip changes CR-ViT's prediction after the
    third segment through the memory alone: the third segment's own frame outputs depend on it."""
    model = video_model("crvit", readout=readout)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(1, 24, 6, 3, generator=g)
    b = a.clone()
    b[:, :8] = torch.randn(1, 8, 6, 3, generator=g)
    with torch.no_grad():
        states, outs = [], []
        for clip in (a, b):
            state = model.init_state(1)
            for start in (0, 8):
                _, state = model(clip[:, start : start + 8], state)
            states.append(state)
            outs.append(model(clip[:, 16:], state)[0])
    assert not torch.allclose(states[0].memory, states[1].memory)
    assert (outs[0] - outs[1]).abs().max() > 1e-4
    # same memory and positions but zero pooled history: the third segment alone still differs
    with torch.no_grad():
        fresh = [s._replace(total=torch.zeros_like(s.total), count=torch.zeros_like(s.count)) for s in states]
        third = [model(a[:, 16:], s)[0] for s in fresh]  # identical frames, different memory
    assert (third[0] - third[1]).abs().max() > 1e-4


def test_segment_transformer_has_no_memory():
    """The segment-limited baseline's state is only the pooled frame outputs: what segment 3
    contributes does not depend on segment 1."""
    model = video_model("video_transformer")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1, 24, 6, 3, generator=g)
    b = a.clone()
    b[:, :8] = torch.randn(1, 8, 6, 3, generator=g)
    with torch.no_grad():
        deltas = []
        for clip in (a, b):
            state = model.init_state(1)
            for start in (0, 8):
                _, state = model(clip[:, start : start + 8], state)
            before = state.total.clone()
            _, state = model(clip[:, 16:], state)
            deltas.append(state.total - before)  # [1, D] the third segment's contribution
    torch.testing.assert_close(deltas[0], deltas[1])


def test_frame_shape_and_patch_size_are_validated():
    with pytest.raises(CRTError, match="patch_size=7 does not divide the 3x16x16 frames"):
        ModelConfig(arch="crvit", frame_shape="3x16x16", patch_size=7, num_classes=2).validate()
    with pytest.raises(CRTError, match="frame_shape='16x'"):
        ModelConfig(arch="video_transformer", frame_shape="16x", num_classes=2).validate()


def test_crvit_shares_the_crt_core():
    """CR-ViT's sequence model is the core under the CRT language model, without a token embedding or LM head."""
    from crt.models.crt import CRT, CRTCore

    model = video_model("crvit")
    assert isinstance(model.core, CRTCore) and issubclass(CRT, CRTCore) and not isinstance(model.core, CRT)
    assert model.core.tokens is None  # no token embedding or LM head: the frames are its inputs


# ---------------------------------------------------------------- data


def test_sample_frames_and_augmentation():
    clip = torch.arange(100.0).view(100, 1, 1).expand(100, 4, 3).contiguous()  # frame index everywhere
    even = sample_frames(clip, 10)
    assert len(even) == 10 and even[0, 0, 0] == 0 and even[-1, 0, 0] == 99
    assert torch.equal(sample_frames(clip, 0), clip)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        crop = sample_frames(clip, 0, crop=0.6, generator=g)[:, 0, 0]
        assert 60 <= len(crop) <= 100 and torch.equal(crop, crop[0] + torch.arange(len(crop)))  # contiguous
    x = torch.randn(7, 4, 3, generator=g)
    y = augment_skeleton(x, rotate=30.0, scale=0.0, generator=g)
    torch.testing.assert_close(y[..., 1], x[..., 1])  # rotation about the vertical axis keeps y
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(y, x)
    s = augment_skeleton(x, rotate=0.0, scale=0.2, generator=g)
    ratio = s / x
    assert 0.8 <= ratio.mean() <= 1.2 and torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))


def test_synthetic_video_shows_every_pattern_once_and_labels_the_first():
    data = make_synthetic_video(classes=4, frames_per_segment=3, noise=0.0, train_clips=64, seed=5)
    assert torch.equal(make_synthetic_video(classes=4, frames_per_segment=3, noise=0.0, train_clips=64, seed=5).train.clips[5], data.train.clips[5])
    for clip in data.train.clips:
        assert clip.shape == (12, 8, 3)
        segments = clip.view(4, 3, 8, 3)  # [segment, frame, joint, xyz]
        assert (segments == segments[:, :1]).all()  # one pattern per segment
        assert len({tuple(s[0].flatten().tolist()) for s in segments}) == 4  # every pattern once
    first = torch.stack([c[0] for c in data.train.clips])  # [N, 8, 3] the first segment's pattern
    for c in range(4):  # the label names the first segment's pattern
        assert (first[data.train.labels == c] == first[data.train.labels == c][:1]).all()
    assert len(set(data.train.labels.tolist())) == 4


def write_msr(folder: Path, files: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, values in files.items():
        (folder / name).write_text("\n".join(" ".join(f"{v:.4f}" for v in row) for row in values.reshape(-1, 4)) + "\n")
    return folder


def fake_msr_clip(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(frames, 20, 4)).astype(np.float32)


def test_msr_loader_split_zero_file_and_bad_inputs(tmp_path):
    files = {f"a{a:02d}_s{s:02d}_e01_skeleton3D.txt": fake_msr_clip(5 + a, a * 10 + s) for a in (1, 2) for s in (1, 2, 3)}
    files["a02_s03_e02_skeleton3D.txt"] = np.zeros((4, 20, 4), dtype=np.float32)
    folder = write_msr(tmp_path / "msr", files)
    with pytest.warns(UserWarning, match="a02_s03_e02.*every joint is zero"):
        data = load_msr_action3d(folder)
    assert (len(data.train), len(data.test)) == (4, 2)  # odd subjects 1, 3 train; subject 2 tests
    assert data.valid is data.test and data.frame_shape == (20, 3) and len(data.classes) == 20
    assert sorted(data.train.labels.tolist()) == [0, 0, 1, 1] and data.train.clips[0].shape == (6, 20, 3)
    clip = data.train.clips[0]
    torch.testing.assert_close(clip.mean(dim=(0, 1)), torch.zeros(3), atol=1e-5, rtol=0)  # normalised: centred
    torch.testing.assert_close(clip.pow(2).sum(-1).mean(), torch.tensor(1.0))  # unit RMS joint distance
    # the archive, and a folder holding it, read the same
    archive = tmp_path / "pack" / MSR_ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(folder, arcname="MSRAction3DSkeletonReal3D")
    for source in (archive, archive.parent):
        with pytest.warns(UserWarning):
            packed = load_msr_action3d(source)
        assert packed.train.names == data.train.names and all(torch.equal(x, y) for x, y in zip(packed.train.clips, data.train.clips))
    # bad inputs
    with pytest.raises(CRTError, match="MSR Action3D not found"):
        load_msr_action3d(tmp_path / "missing")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CRTError, match="no MSR Action3D skeleton files"):
        load_msr_action3d(tmp_path / "nothing")
    (folder / "a01_s02_e02_skeleton3D.txt").write_text("")
    with pytest.raises(CRTError, match="a01_s02_e02_skeleton3D.txt .*empty clip"):
        load_msr_action3d(folder)
    (folder / "a01_s02_e02_skeleton3D.txt").write_text("1 2 3\n")
    with pytest.raises(CRTError, match="damaged"):
        load_msr_action3d(folder)
    broken = tmp_path / "broken" / MSR_ARCHIVE
    broken.parent.mkdir()
    broken.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(CRTError, match="not a readable"):
        load_msr_action3d(broken)


def test_msr_action3d_real_archive_counts(tmp_path):
    """The shared archive: 567 skeleton files, one all-zero; cross-subject 291 train / 275 test;
    the unpacked folder reads the same."""
    if not (MSR_DIR / MSR_ARCHIVE).is_file():
        pytest.skip(f"{MSR_DIR / MSR_ARCHIVE} not found: the project machines hold MSR Action3D there")
    with pytest.warns(UserWarning, match="a13_s09_e02"):
        data = load_msr_action3d(MSR_DIR)
    assert (len(data.train), len(data.valid), len(data.test)) == (291, 275, 275)
    assert torch.bincount(data.train.labels, minlength=20).min() > 0 and torch.bincount(data.test.labels, minlength=20).min() > 0
    assert all(c.shape[1:] == (20, 3) and len(c) >= 10 for c in data.train.clips)
    with tarfile.open(MSR_DIR / MSR_ARCHIVE) as tar:
        tar.extractall(tmp_path, filter="data")
    with pytest.warns(UserWarning):
        unpacked = load_msr_action3d(tmp_path)
    assert unpacked.test.names == data.test.names
    assert all(torch.equal(x, y) for x, y in zip(unpacked.test.clips, data.test.clips))


SMARTHOME_TRAIN = ["Cook.Stir_p03_r00_v01_c01", "Drink.Fromcup_p04_r01_v02_c01", "Cook.Stir_p06_r00_v01_c03"]
SMARTHOME_TEST = ["Cook.Stir_p05_r00_v01_c02", "Drink.Fromcup_p08_r00_v01_c02"]


def write_mp4(path: Path, frames: int, colour: int) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            image = np.full((32, 32, 3), colour, dtype=np.uint8)
            image[:, : 4 * (t + 1) % 32] = 255 - colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_frames(folder: Path, frames: int, colour: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for t in range(frames):
        Image.fromarray(np.full((24, 40, 3), colour + t, dtype=np.uint8)).save(folder / f"{t:04d}.png")


def test_smarthome_mp4_and_frame_folders(tmp_path):
    pytest.importorskip("av", reason="the video extra (PyAV) decodes mp4: pip install -e '.[video]'")
    pytest.importorskip("PIL", reason="the video extra (Pillow) reads frame images: pip install -e '.[video]'")
    root = tmp_path / "smarthome"
    for i, name in enumerate(SMARTHOME_TRAIN + SMARTHOME_TEST[:1]):
        write_mp4(root / "mp4" / f"{name}.mp4", frames=6 + i, colour=40 * i)
    write_frames(root / "frames" / SMARTHOME_TEST[1], frames=5, colour=100)
    data = load_smarthome(root, "cross_subject", size=16, max_frames=4)
    assert data.classes == ["Cook.Stir", "Drink.Fromcup"] and data.frame_shape == (3, 16, 16)
    assert data.train.names == sorted(SMARTHOME_TRAIN) and data.test.names == sorted(SMARTHOME_TEST)
    assert data.test.labels.tolist() == [0, 1]
    video = data.train.clips[0]
    assert video.shape == (4, 3, 16, 16) and 0.0 <= video.min() and video.max() <= 1.0
    assert (video[0] - video[-1]).abs().max() > 0.2  # frames differ: decoded, not repeated
    images = data.test.clips[1]
    assert images.shape == (4, 3, 16, 16)
    torch.testing.assert_close(images[0, 0], torch.full((16, 16), 100 / 255))
    # cross-view 1: camera 1 trains, camera 2 tests, the others are left out
    cv = load_smarthome(root, "cross_view1", size=16, max_frames=4)
    assert cv.train.names == ["Cook.Stir_p03_r00_v01_c01", "Drink.Fromcup_p04_r01_v02_c01"] and cv.test.names == sorted(SMARTHOME_TEST)
    # a model classifies the decoded clips end to end
    model = video_model("crvit", "3x16x16", num_classes=2, patch_size=8)
    r = evaluate_clips(model, data.test, 2, batch_size=2, max_frames=4)
    assert r["clips"] == 2 and r["confusion"].sum() == 2


def test_smarthome_split_lists_and_bad_inputs(tmp_path):
    pytest.importorskip("PIL", reason="the video extra (Pillow) reads frame images: pip install -e '.[video]'")
    root = tmp_path / "sh"
    for i, name in enumerate(SMARTHOME_TRAIN + SMARTHOME_TEST + ["Walk_p09_r00_v01_c01"]):
        write_frames(root / "frames" / name, frames=3, colour=10 * i)
    splits = root / "splits"
    splits.mkdir()
    (splits / "cross_subject_train.txt").write_text("\n".join(SMARTHOME_TRAIN) + "\n")
    (splits / "cross_subject_test.txt").write_text("\n".join(SMARTHOME_TEST) + "\n")
    data = load_smarthome(root, size=8, max_frames=8)
    assert data.train.names == SMARTHOME_TRAIN and data.classes == ["Cook.Stir", "Drink.Fromcup"]
    (splits / "cross_subject_test.txt").write_text("\n".join(SMARTHOME_TEST + ["Walk_p09_r00_v01_c01"]) + "\n")
    with pytest.raises(CRTError, match="class 'Walk' in .*cross_subject_test.txt has no training clip"):
        load_smarthome(root, size=8)
    (splits / "cross_subject_test.txt").write_text("Sleep_p02_r00_v01_c02\n")
    with pytest.raises(CRTError, match="names 1 clip.*Sleep_p02"):
        load_smarthome(root, size=8)
    shutil.rmtree(splits)
    empty = root / "frames" / "Cook.Stir_p02_r00_v01_c02"
    empty.mkdir()
    data = load_smarthome(root, size=8)
    with pytest.raises(CRTError, match="empty clip"):
        data.test.clips[data.test.names.index(empty.name)]
    with pytest.raises(CRTError, match="does not exist"):
        load_smarthome(tmp_path / "nowhere")
    with pytest.raises(CRTError, match="unknown protocol"):
        load_smarthome(root, protocol="cross_room")


# ---------------------------------------------------------------- training


def synthetic_run(tmp_path: Path, preset: str, **overrides):
    m, t = load_preset(preset)
    return apply_overrides(m, t, {"out_dir": str(tmp_path / preset), "log_every": 1, **overrides})


def test_synthetic_task_needs_the_memory(tmp_path):
    """A short run: CR-ViT learns which pattern came first; the segment-limited transformer,
    which sees every clip's patterns pooled, stays at chance (1/3)."""
    kw = dict(video_classes=3, max_steps=120, eval_every=0, d_model=32, d_ff=64)
    crvit = train(*synthetic_run(tmp_path, "synthetic-video-crvit", **kw), progress=False)
    base = train(*synthetic_run(tmp_path, "synthetic-video-transformer", **kw), progress=False)
    assert crvit["valid_mean_class_acc"] > 0.9
    assert base["valid_mean_class_acc"] < 0.45


def video_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]


def test_video_resume_equals_uninterrupted(tmp_path):
    m, t = synthetic_run(
        tmp_path,
        "synthetic-video-crvit",
        max_steps=6,
        eval_every=0,
        checkpoint_every=3,
        keep_checkpoints=5,
        d_model=32,
        d_ff=64,
        dropout=0.1,
        batch_size=8,
        video_crop=0.7,
    )
    full = Path(train(m, t, progress=False)["run_dir"])
    cut = interrupted_copy(full, tmp_path / "cut", kept_step=3, dropped_step=6)
    train(m, t, resume=load_checkpoint(cut), progress=False)
    assert video_losses(cut) == video_losses(full) and len(video_losses(full)) == 6


VIDEO_TINY = ["--d-model", "32", "--d-ff", "64", "--max-steps", "3", "--eval-every", "0", "--no-progress", "--batch-size", "8"]


def test_cli_video_train_eval_and_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = in_process(capsys, "train", "--preset", "synthetic-video-crvit", *VIDEO_TINY, "--out-dir", "v")
    assert proc.returncode == 0, proc.stderr
    assert "mean per-class" in proc.stdout and "crvit" in proc.stdout
    assert (tmp_path / "v" / "curves.png").stat().st_size > 0
    proc = in_process(capsys, "eval", "--checkpoint", "v", "--split", "test")
    assert proc.returncode == 0, proc.stderr
    assert "top-1 acc" in proc.stdout and "mean per-class acc" in proc.stdout
    assert (tmp_path / "v" / "confusion-test.png").stat().st_size > 0
    proc = in_process(capsys, "eval", "--checkpoint", "v", "--confusion", "cm.png")
    assert proc.returncode == 0 and (tmp_path / "cm.png").stat().st_size > 0
    proc = in_process(capsys, "train", "--resume", "v", "--max-steps", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(tmp_path / "v").meta["step"] == 4
    # bad inputs: one line, exit 2
    one_line_error(in_process(capsys, "train", "--preset", "msr-crvit", "--data-dir", str(tmp_path / "missing"), *VIDEO_TINY), "MSR Action3D not found")
    one_line_error(in_process(capsys, "train", "--preset", "synthetic-video-crvit", "--arch", "crt", *VIDEO_TINY), "--arch crvit")
    one_line_error(in_process(capsys, "train", "--preset", "synthetic-video-crvit", "--readout", "last", *VIDEO_TINY), "readout")
    one_line_error(in_process(capsys, "train", "--preset", "synthetic-crt", "--arch", "crvit", *VIDEO_TINY), "--task video")
    one_line_error(in_process(capsys, "flops", "--preset", "msr-crvit"), "frame-sequence classifier")
    one_line_error(in_process(capsys, "eval", "--checkpoint", "v", "--int8"), "--int8")


def test_video_presets_share_the_width_of_their_baselines():
    crvit, _ = load_preset("msr-crvit")
    for name, seg in (("msr-transformer-segment", crvit.segment_len), ("msr-transformer-all", 64)):
        m, t = load_preset(name)
        assert (m.arch, m.d_model, m.n_layer, m.d_ff, m.segment_len) == ("video_transformer", crvit.d_model, crvit.n_layer, crvit.d_ff, seg)
    _, t = load_preset("msr-transformer-all")
    assert t.video_max_frames <= 64  # the all-frames transformer's one segment holds a whole (subsampled) clip


def test_msr_presets_train_a_step_on_the_real_archive(tmp_path):
    if not (MSR_DIR / MSR_ARCHIVE).is_file():
        pytest.skip(f"{MSR_DIR / MSR_ARCHIVE} not found: the project machines hold MSR Action3D there")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_msr_action3d(MSR_DIR, motion=True)
    for name in ("msr-crvit", "msr-transformer-segment", "msr-transformer-all"):
        m, t = load_preset(name)
        m, t = apply_overrides(m, t, {"max_steps": 1, "eval_every": 0, "out_dir": str(tmp_path / name)})
        summary = train(m, t, corpus=data, progress=False)
        assert summary["step"] == 1 and load_checkpoint(summary["run_dir"]).meta["model"]["frame_shape"] == "20x6"  # positions and velocities
    # clips loaded without the preset's velocities are refused, not silently trained on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = load_msr_action3d(MSR_DIR)
    m, t = apply_overrides(*load_preset("msr-crvit"), {"max_steps": 1, "out_dir": str(tmp_path / "plain")})
    with pytest.raises(CRTError, match="video_motion=True"):
        train(m, t, corpus=plain, progress=False)
