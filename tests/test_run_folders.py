"""Run folders under hostile conditions: runs started at once, bad --out-dir paths, failures
before the first checkpoint, interrupted saves, resumes from odd places and damaged logs."""

import json
import multiprocessing as mp
import os
import shutil
import stat
from pathlib import Path

import pytest
from cli_helpers import TINY_RUN, cli, interrupted_copy, refused, run_cli, snapshot

from crt.checkpoint import load_checkpoint
from crt.config import ModelConfig, TrainConfig
from crt.errors import CRTError
from crt.train.loop import train
from crt.train.metrics import read_metrics
from crt.train.rundir import RunLock, claim_run_dir

TINY = [*TINY_RUN, "--synth-filler", "4", "--eval-every", "0", "--no-progress", "--no-stages"]


def configs(out: Path, **kw):
    m = ModelConfig(d_model=32, n_layer=1, n_head=4, d_ff=64, segment_len=8)
    t = TrainConfig(
        **{
            "synth_train_docs": 40,
            "synth_valid_docs": 5,
            "synth_test_docs": 5,
            "synth_filler": 4,
            "batch_size": 4,
            "bptt_segments": 0,
            "max_steps": 6,
            "warmup_steps": 1,
            "eval_every": 0,
            "log_every": 1,
            "out_dir": str(out),
            **kw,
        }
    )
    return m, t


def train_records(run: Path):
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]


def _claim(out: str) -> str:
    return str(claim_run_dir(out)[0])


def test_runs_started_at_once_never_share_a_folder(tmp_path):
    with mp.get_context("fork").Pool(6) as pool:
        claimed = pool.map(_claim, [str(tmp_path / "run")] * 6)
    assert len(set(claimed)) == 6 and str(tmp_path / "run") in claimed
    assert all((Path(p) / "metrics.jsonl").exists() for p in claimed)


def test_a_run_in_progress_cannot_be_resumed_twice(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "train", *TINY, "--max-steps", "2", "--out-dir", "r")[0] == 0
    before = snapshot(tmp_path / "r")
    held = RunLock(tmp_path / "r")  # as a training process holds it
    try:
        with pytest.raises(CRTError, match="being trained by another process"):
            RunLock(tmp_path / "r")
        refused(cli(capsys, "train", "--resume", "r", "--max-steps", "4", "--no-progress"), "being trained by another process")
    finally:
        held.release()
    assert snapshot(tmp_path / "r") == before
    assert cli(capsys, "train", "--resume", "r", "--max-steps", "4", "--no-progress")[0] == 0  # released: it resumes


def test_out_dir_that_cannot_be_a_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("mine")
    refused(cli(capsys, "train", *TINY, "--max-steps", "1", "--out-dir", "file"), "is a file, not a folder")
    refused(cli(capsys, "train", *TINY, "--max-steps", "1", "--out-dir", "file/run"), "is a file, not a folder")
    refused(cli(capsys, "train", *TINY, "--max-steps", "1", "--out-dir", "/sys/crt-run"), "cannot write the run folder", "--out-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "mine"


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    import crt.train.segments as segments

    real = segments.F.cross_entropy
    monkeypatch.setattr(segments.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    m, t = configs(tmp_path / "a" / "b" / "run")
    with pytest.raises(CRTError, match="new run folder was removed"):
        train(m, t, progress=False)
    assert list(tmp_path.iterdir()) == []  # not the run folder, nor the parents it made
    (tmp_path / "mine").mkdir()  # a folder the user made is kept, emptied of what the run wrote
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CRTError, match="new run folder was removed"):
        train(m, configs(tmp_path / "mine")[1], progress=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_interrupted_saves_are_cleaned_up(tmp_path):
    m, t = configs(tmp_path / "run", max_steps=2)
    run = Path(train(m, t, progress=False)["run_dir"])
    ckpts = run / "checkpoints"
    (ckpts / ".step-0000003.x1y2.tmp").mkdir()  # a kill during a save: a full copy of the weights
    (ckpts / ".step-0000003.x1y2.tmp" / "model.safetensors").write_bytes(b"\0" * 1000)
    (ckpts / "step-0000002.old").mkdir()
    (ckpts / ".latest.abc.tmp").write_text("step-0000003\n")
    train(m, configs(tmp_path / "run", max_steps=4)[1], resume=load_checkpoint(run), progress=False)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000002", "step-0000004"]


def test_saved_files_have_the_modes_of_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run = Path(train(*configs(tmp_path / "run", max_steps=1), progress=False)["run_dir"])
    finally:
        os.umask(old)
    ckpt = run / "checkpoints" / "step-0000001"
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in ckpt.iterdir()} == dict.fromkeys(["config.json", "model.safetensors", "trainer.pt"], 0o644)


def test_resume_from_a_checkpoint_outside_its_run(tmp_path, monkeypatch, capsys):
    """It used to write into the checkpoint's grandparent folder."""
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "train", *TINY, "--max-steps", "2", "--out-dir", "r")[0] == 0
    (tmp_path / "saved").mkdir()
    shutil.copytree(tmp_path / "r" / "checkpoints" / "step-0000002", tmp_path / "saved" / "step-2")
    before = snapshot(tmp_path)
    refused(cli(capsys, "train", "--resume", "saved/step-2", "--max-steps", "4", "--no-progress"), "not inside a run's checkpoints/", "--out-dir")
    assert snapshot(tmp_path) == before
    rc, out, err = cli(capsys, "train", "--resume", "saved/step-2", "--max-steps", "4", "--no-progress", "--out-dir", "continued")
    assert rc == 0, err
    assert load_checkpoint(tmp_path / "continued").meta["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["continued", "r", "saved"]
    assert snapshot(tmp_path / "saved") == {k[len("saved/") :]: v for k, v in before.items() if k.startswith("saved/")}


def test_resume_into_a_new_folder_keeps_the_log_and_the_source(tmp_path):
    m, t = configs(tmp_path / "run", max_steps=6, checkpoint_every=3, keep_checkpoints=5)
    full = Path(train(m, t, progress=False)["run_dir"])
    cut = interrupted_copy(full, tmp_path / "cut", kept_step=3, dropped_step=6)
    before = snapshot(cut)
    fork = train(
        m,
        configs(tmp_path / "fork", max_steps=6, checkpoint_every=3, keep_checkpoints=5)[1],
        resume=load_checkpoint(cut / "checkpoints" / "step-0000003"),
        progress=False,
    )
    assert train_records(Path(fork["run_dir"])) == train_records(full)  # the log up to step 3 came along
    assert snapshot(cut) == before


def test_resume_refuses_fields_that_define_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "train", *TINY, "--max-steps", "2", "--out-dir", "r")[0] == 0
    before = snapshot(tmp_path / "r")
    for flag, value in (("--batch-size", "2"), ("--seed", "3"), ("--synth-filler", "9"), ("--protocol", "stream")):
        refused(cli(capsys, "train", "--resume", "r", flag, value, "--max-steps", "4", "--no-progress"), f"{flag} {value} differs from the run's")
    refused(cli(capsys, "train", "--resume", "r", "--d-model", "64"), "cannot change model fields")
    assert snapshot(tmp_path / "r") == before


def test_a_log_cut_short_is_recovered(tmp_path):
    """Power loss or a full disk in the middle of a metrics line: resume says so and goes on."""
    m, t = configs(tmp_path / "run", max_steps=6, checkpoint_every=3, keep_checkpoints=5)
    full = Path(train(m, t, progress=False)["run_dir"])
    cut = interrupted_copy(full, tmp_path / "cut", kept_step=3, dropped_step=6)
    log = cut / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # the 4th record cut in half
    with pytest.warns(UserWarning, match="skipped 1 line"):
        train(m, t, resume=load_checkpoint(cut), progress=False)
    records = train_records(cut)
    assert [s for s, _ in records] == [1, 2, 3, 4, 5, 6] and records[3:] == train_records(full)[3:]
    log.write_text(log.read_text() + '{"step": 7, "spl')  # and from the CLI: one warning line, no traceback
    proc = run_cli("train", "--resume", str(cut), "--max-steps", "7", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "metrics.jsonl" in line][0].startswith("crt: warning:") and "skipped 1 line" in proc.stderr
    assert all(isinstance(json.loads(line), dict) for line in log.read_text().splitlines())


def test_the_first_record_after_a_resume_averages_the_same_steps(tmp_path):
    """A checkpoint inside a logging interval (log_every 4, checkpoints every 3): the record at
    step 4 after resuming from 3 averages steps 1-4, as the uninterrupted run's does, not
    step 4 alone; no false dip in the curve."""
    m, t = configs(tmp_path / "run", max_steps=8, checkpoint_every=3, log_every=4, keep_checkpoints=5)
    full = Path(train(m, t, progress=False)["run_dir"])
    cut = interrupted_copy(full, tmp_path / "cut", kept_step=3, dropped_step=6)
    shutil.rmtree(cut / "checkpoints" / "step-0000008")
    train(m, t, resume=load_checkpoint(cut / "checkpoints" / "step-0000003"), progress=False)
    assert train_records(cut) == train_records(full) and [s for s, _ in train_records(full)] == [4, 8]


def test_a_run_stopped_before_its_first_checkpoint_leaves_no_folder(tmp_path):
    """SIGTERM (a scheduler's stop) and Ctrl-C unwind the run: a folder nothing can resume from is removed."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "crt", "train", *TINY, "--max-steps", "100000", "--out-dir", "r"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (tmp_path / "r" / "metrics.jsonl").exists() and time.time() < deadline:  # claimed: training has started
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "crt: interrupted" and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_odd_out_dir_spellings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "train", *TINY, "--max-steps", "1", "--out-dir", "foo/../bar")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bar"]  # no stray foo/
    monkeypatch.chdir(tmp_path / "bar")
    assert cli(capsys, "train", *TINY, "--max-steps", "1", "--out-dir", ".")[0] == 0  # "." holds a run: the next name beside it
    monkeypatch.chdir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bar", "bar-2"]
    refused(cli(capsys, "train", *TINY, "--max-steps", "1", "--out-dir", "/"), "root folder")
    refused(cli(capsys, "train", *TINY, "--max-steps", "1", "--out-dir", "a\0b"), "NUL")
    # the run's own folder, however spelled, continues in place
    for spelling in ("bar/", "./bar", str(tmp_path / "bar")):
        assert cli(capsys, "train", "--resume", "bar", "--out-dir", spelling, "--max-steps", "2", "--no-progress")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bar", "bar-2"] and load_checkpoint(tmp_path / "bar").meta["step"] == 2
    refused(cli(capsys, "train", "--resume", "bar", "--no-stages", "--max-steps", "3"), "--no-stages with --resume")


def test_a_failed_run_keeps_the_users_own_files(tmp_path, monkeypatch):
    import crt.train.segments as segments

    real = segments.F.cross_entropy
    monkeypatch.setattr(segments.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    (tmp_path / "mine" / "tensorboard").mkdir(parents=True)
    (tmp_path / "mine" / "tensorboard" / "events.user").write_text("precious")
    with pytest.raises(CRTError, match="new run folder was removed"):
        train(*configs(tmp_path / "mine"), progress=False)
    assert (tmp_path / "mine" / "tensorboard" / "events.user").read_text() == "precious" and not (tmp_path / "mine" / "metrics.jsonl").exists()
