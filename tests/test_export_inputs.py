"""`crt export` given hostile output paths and sizes: it writes only regular files it owns,
refuses what it cannot do in one line, and leaves what was there as it was."""

import os
import stat

import pytest
from cli_helpers import cli, refused, snapshot


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def export(capsys, run, out, *flags):
    return cli(capsys, "export", "--checkpoint", str(run), "--format", "onnx", "--out", str(out), "--no-int8", *flags)


def test_special_files_and_links_are_never_replaced(capsys, work, tiny_runs):
    """As root, --out /dev/full used to replace the device node; a FIFO became a regular file."""
    os.mkfifo(work / "pipe.onnx")
    (work / "target.onnx").write_bytes(b"precious")
    (work / "link.onnx").symlink_to(work / "target.onnx")
    os.mkfifo(work / "side.onnx.state.safetensors")  # the initial state goes beside the program
    before = snapshot(work)
    refused(export(capsys, tiny_runs["words"], work / "pipe.onnx"), "pipe.onnx exists and is not a regular file")
    refused(export(capsys, tiny_runs["words"], work / "link.onnx"), "link.onnx exists and is not a regular file")
    refused(export(capsys, tiny_runs["words"], work / "side.onnx"), "side.onnx.state.safetensors exists and is not a regular file")
    refused(export(capsys, tiny_runs["words"], "/dev/full"), "/dev/full exists and is not a regular file")
    assert snapshot(work) == before and stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert stat.S_ISFIFO((work / "pipe.onnx").lstat().st_mode) and (work / "target.onnx").read_bytes() == b"precious"


def test_unwritable_and_contradictory_outputs(capsys, work, tiny_runs):
    refused(export(capsys, tiny_runs["words"], "/sys/crt-export/m.onnx"), "cannot write to /sys/crt-export", "--out")
    (work / "file").write_text("x")
    refused(export(capsys, tiny_runs["words"], work / "file" / "m.onnx"), "cannot write to", "--out")
    refused(export(capsys, tiny_runs["words"], work / "m.pt2"), "names a pt2 file but --format is onnx")
    (work / "dir.onnx").mkdir()
    refused(export(capsys, tiny_runs["words"], work / "dir.onnx"), "is a folder")
    assert sorted(p.name for p in work.iterdir()) == ["dir.onnx", "file"]


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "100000000"), ("--check-segments", "0"), ("--check-segments", "100000000")])
def test_sizes_out_of_bounds(capsys, work, tiny_runs, flag, value):
    refused(export(capsys, tiny_runs["words"], work / "m.onnx", flag, value), f"{flag} ")
    assert list(work.iterdir()) == []


def test_a_good_export_replaces_only_its_own_files_with_ordinary_modes(capsys, work, tiny_runs):
    (work / "m.onnx").write_bytes(b"an older export")
    old = os.umask(0o022)
    try:
        rc, out, err = export(capsys, tiny_runs["words"], work / "m.onnx")
    finally:
        os.umask(old)
    assert rc == 0, err
    written = ["m.onnx", "m.onnx.state.safetensors", "m.tokenizer.json"]  # the tokenizer serves m.onnx and an m.int8.onnx alike
    assert sorted(p.name for p in work.iterdir()) == written
    assert (work / "m.onnx").read_bytes() != b"an older export"
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in work.iterdir()} == dict.fromkeys(written, 0o644)


def test_export_never_writes_into_the_checkpoint_it_reads(capsys, work, tiny_runs):
    import shutil

    run = shutil.copytree(tiny_runs["words"], work / "run")
    before = snapshot(run)
    for out in (run / "checkpoints" / "step-0000004" / "model.safetensors", run / "checkpoints" / "m.onnx"):
        refused(export(capsys, run, out), "inside the checkpoint folder")
    assert snapshot(run) == before


def test_a_failed_export_removes_the_folders_it_made(capsys, work, tiny_runs, monkeypatch):
    import crt.infer.export as ex

    monkeypatch.setattr(ex, "_check", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # interrupted mid-way
    rc, _, err = export(capsys, tiny_runs["words"], work / "new" / "deep" / "m.onnx")
    assert rc == 130 and list(work.iterdir()) == [], err
