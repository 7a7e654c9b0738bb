"""Training loop, checkpoints, resume, error handling and the CLI."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, in_process, interrupted_copy, one_line_error, refused, run_cli

from crt.checkpoint import load_checkpoint
from crt.config import ModelConfig, TrainConfig, apply_overrides, load_preset, preset_names
from crt.errors import CRTError
from crt.models import build_model
from crt.train.loop import train
from crt.train.metrics import read_metrics

SMALL_MODEL = dict(d_model=32, n_layer=2, n_head=4, d_ff=64, segment_len=8, dropout=0.1, emb_dropout=0.1)
SMALL_DATA = dict(synth_train_docs=120, synth_valid_docs=10, synth_test_docs=10, synth_filler=12)


def configs(tmp_path: Path, arch="crt", **train_kw):
    m = ModelConfig(arch=arch, **SMALL_MODEL)
    t = TrainConfig(
        **{
            **SMALL_DATA,
            "protocol": "stream",
            "batch_size": 4,
            "bptt_segments": 2,
            "max_steps": 6,
            "warmup_steps": 2,
            "eval_every": 0,
            "log_every": 1,
            "out_dir": str(tmp_path / "run"),
            **train_kw,
        }
    )
    return m, t


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["split"] == "train"]


@pytest.mark.parametrize("arch", ["crt", "transformer", "transformer_xl", "rmt", "armt"])
def test_training_reduces_loss_and_writes_outputs(tmp_path, arch):
    m, t = configs(tmp_path, arch, max_steps=30, lr=3e-3)
    summary = train(m, t, progress=False)
    run = Path(summary["run_dir"])
    trace = losses(run)
    assert len(trace) == 30 and sum(trace[-5:]) / 5 < sum(trace[:5]) / 5
    assert (run / "curves.png").stat().st_size > 0
    ckpt = load_checkpoint(run)
    assert ckpt.meta["step"] == 30 and ckpt.meta["model"]["arch"] == arch
    assert summary["valid_ppl"] > 1


def test_bf16_training_runs_and_learns(tmp_path):
    m, t = configs(tmp_path, max_steps=20, lr=3e-3, precision="bf16")
    summary = train(m, t, progress=False)
    trace = losses(summary["run_dir"])
    assert all(map(math.isfinite, trace)) and sum(trace[-5:]) < sum(trace[:5])


def test_map_unk_is_reported(tmp_path, capsys):
    folder = tmp_path / "ptb"
    folder.mkdir()
    (folder / "ptb.train.txt").write_text("a b c a b c\n" * 40)
    (folder / "ptb.valid.txt").write_text("a b zebra\n" * 3)
    (folder / "ptb.test.txt").write_text("a b c\n")
    m, t = configs(tmp_path, max_steps=1, data="ptb", data_dir=str(folder), batch_size=2)
    with pytest.raises(CRTError, match="zebra"):
        train(m, t, progress=False)
    train(m, dataclasses.replace(t, map_unk=True), progress=False)
    assert "3 valid tokens unseen in train were mapped to <unk>" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["crt", "rmt", "armt"])
def test_resume_equals_uninterrupted(tmp_path, arch):
    """Interrupt after step 3 (keep only that checkpoint), resume: the loss trajectory is identical."""
    m, t = configs(tmp_path, arch, checkpoint_every=3, keep_checkpoints=5)
    full = Path(train(m, t, progress=False)["run_dir"])
    cut = interrupted_copy(full, tmp_path / "cut", kept_step=3, dropped_step=6)
    train(m, t, resume=load_checkpoint(cut), progress=False)
    assert losses(cut) == losses(full)  # exact: same data, RNG, optimizer and carried state
    assert load_checkpoint(cut).meta["step"] == 6


def test_new_run_never_overwrites_an_existing_one(tmp_path):
    m, t = configs(tmp_path, max_steps=2)
    first = train(m, t, progress=False)["run_dir"]
    before = (Path(first) / "checkpoints" / "step-0000002" / "model.safetensors").read_bytes()
    second = train(m, t, progress=False)["run_dir"]
    assert second != first and second.endswith("run-2")
    assert (Path(first) / "checkpoints" / "step-0000002" / "model.safetensors").read_bytes() == before


def test_non_finite_loss_stops_with_step_and_keeps_checkpoints(tmp_path, monkeypatch):
    m, t = configs(tmp_path, max_steps=6, checkpoint_every=2)
    import crt.train.segments as segments

    real = segments.F.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        out = real(*args, **kw)
        return out * float("nan") if calls["n"] > 2 * 3 else out  # 2 segments per step: step 4 is poisoned

    monkeypatch.setattr(segments.F, "cross_entropy", poisoned)
    with pytest.raises(CRTError, match="at step 4"):
        train(m, t, progress=False)
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.meta["step"] == 2
    model = build_model(apply_overrides(m, t, {"vocab_size": len(ckpt.meta["vocab"])})[0])
    ckpt.load_weights(model)  # intact: hashes verify
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.fixture
def trained(tmp_path):
    m, t = configs(tmp_path, max_steps=2)
    return Path(train(m, t, progress=False)["run_dir"]), m, t


def _model_for(ckpt, arch="crt"):
    return build_model(ModelConfig(**{**ckpt.meta["model"], "arch": arch}))


def test_checkpoint_damage_is_reported(trained):
    run, m, t = trained
    folder = load_checkpoint(run).path
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CRTError, match="corrupted or truncated"):
        load_checkpoint(run).load_weights(_model_for(load_checkpoint(run)))
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit
    with pytest.raises(CRTError, match="corrupted or truncated"):
        load_checkpoint(run).load_weights(_model_for(load_checkpoint(run)))
    weights.write_bytes(good)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CRTError, match="not valid JSON"):
        load_checkpoint(run)


def test_checkpoint_from_another_model_is_rejected(trained):
    run, _, _ = trained
    ckpt = load_checkpoint(run)
    with pytest.raises(CRTError, match="another architecture"):
        ckpt.load_weights(_model_for(ckpt, "transformer"))


def test_weights_with_shared_buffers_and_tied_tensors_round_trip(tmp_path):
    """On CUDA, cuDNN packs a GRU's weights into one buffer (views that share it without covering
    it), which safetensors' save_model refuses; tied embedding and head are one tensor. Both save
    (the tied one once), load back exactly, and a file from save_model still loads."""
    from safetensors.torch import load_file, save_model

    from crt.checkpoint import load_weights, save_weights

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="crt", vocab_size=20, d_model=16, n_layer=1, n_head=2, d_ff=32, segment_len=4))
    gru = model.memory_rnn.gru
    flat = torch.cat([p.detach().reshape(-1) for p in gru._flat_weights])  # what cuDNN's flatten_parameters does
    offset = 0
    for name in gru._flat_weights_names:
        p = getattr(gru, name)
        setattr(gru, name, torch.nn.Parameter(flat[offset : offset + p.numel()].view_as(p)))
        offset += p.numel()
    with pytest.raises(RuntimeError):
        save_model(model, str(tmp_path / "refused.safetensors"))
    save_weights(model, tmp_path / "w.safetensors")
    saved = load_file(str(tmp_path / "w.safetensors"))
    assert ("tokens.embed.weight" in saved) != ("tokens.head.weight" in saved)  # the tied tensor once
    fresh = build_model(model.cfg)
    assert load_weights(fresh, tmp_path / "w.safetensors") == ([], [])
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.tokens.head.weight is fresh.tokens.embed.weight  # still tied after loading
    plain = build_model(model.cfg)
    save_model(plain, str(tmp_path / "old.safetensors"))  # checkpoints written before save_weights
    assert load_weights(fresh, tmp_path / "old.safetensors") == ([], [])
    assert torch.equal(fresh.tokens.head.weight, plain.tokens.embed.weight)
    untied = build_model(dataclasses.replace(model.cfg, tie_weights=False))
    save_weights(untied, tmp_path / "untied.safetensors")  # a head of its own: not silently dropped
    assert load_weights(fresh, tmp_path / "untied.safetensors") == ([], ["tokens.head.weight"])
    wider = build_model(dataclasses.replace(model.cfg, d_model=24))
    with pytest.raises(CRTError, match=r"does not fit this model: memory_init is \[16\] there and \[24\] here"):
        load_weights(wider, tmp_path / "w.safetensors")


def test_missing_checkpoint_is_reported(tmp_path):
    with pytest.raises(CRTError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CRTError, match="no checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_every_preset_loads_and_validates():
    for name in preset_names():
        m, t = load_preset(name)
        m.validate()
    with pytest.raises(CRTError, match="unknown preset"):
        load_preset("no-such-preset")


def test_unknown_config_key_is_rejected():
    with pytest.raises(CRTError, match="unknown config key"):
        apply_overrides(ModelConfig(), TrainConfig(), {"d_modle": 3})
    with pytest.raises(CRTError, match="expects an integer"):
        apply_overrides(ModelConfig(), TrainConfig(), {"d_model": "wide"})


def test_model_and_train_fields_are_disjoint():
    """The CLI offers every field as a flat flag, so no name may be in both dataclasses."""
    from crt.config import MODEL_FIELDS, TRAIN_FIELDS

    assert not set(MODEL_FIELDS) & set(TRAIN_FIELDS)


# ---------------------------------------------------------------- CLI


TINY = [
    "--d-model",
    "32",
    "--n-layer",
    "1",
    "--d-ff",
    "64",
    "--segment-len",
    "8",
    "--batch-size",
    "4",
    "--synth-train-docs",
    "60",
    "--synth-valid-docs",
    "5",
    "--synth-test-docs",
    "5",
    "--synth-filler",
    "10",
    "--max-steps",
    "3",
    "--eval-every",
    "0",
    "--no-progress",
    "--no-stages",
]


def test_cli_train_eval_smoke(tmp_path):
    proc = run_cli("train", "--preset", "synthetic-crt", *TINY, "--out-dir", "r", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "valid recall" in proc.stdout and "test recall" in proc.stdout and "crt" in proc.stdout
    proc = run_cli("eval", "--checkpoint", "r", "--split", "test", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ppl" in proc.stdout and "recall" in proc.stdout
    proc = run_cli("train", "--resume", "r", "--max-steps", "4", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(tmp_path / "r").meta["step"] == 4


STAGED = (
    '[model]\narch = "crt"\nd_model = 32\nn_layer = 1\nn_head = 4\nd_ff = 64\nsegment_len = 8\n'
    '[train]\nprotocol = "document"\nloss = "answers"\nsynth_filler = 1\nsynth_train_docs = 60\nsynth_valid_docs = 5\nsynth_test_docs = 5\n'
    'batch_size = 4\nbptt_segments = 0\nmax_steps = 40\neval_every = 2\nlog_every = 1\nkeep_checkpoints = 10\nout_dir = "r"\n'
)


def staged(tmp_path: Path, *stages: str) -> str:
    path = tmp_path / "staged.toml"
    path.write_text(STAGED + "".join(f"[[stage]]\n{s}\n" for s in stages))
    return str(path)


def stage_records(run: Path) -> list[tuple[int, int]]:
    return [(r["step"], r["stage"]) for r in read_metrics(run / "metrics.jsonl") if r["split"] == "stage"]


def test_curriculum_advances_when_the_condition_holds_and_ends_when_the_last_one_does(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # ppl <= 1e9 holds at the first validation (step 2); recall >= 0 too
    preset = staged(tmp_path, 'steps = 10\nadvance = "ppl <= 1e9"', 'synth_filler = 9\nsteps = 10\nadvance = "recall >= 0"')
    proc = in_process(capsys, "train", "--preset", preset, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "-- stage 2 of 2 (synth_filler = 9), from step 3: valid ppl <= 1e9 held" in proc.stdout
    assert stage_records(tmp_path / "r") == [(2, 2)]
    ckpt = load_checkpoint(tmp_path / "r")
    assert ckpt.meta["step"] == 4 and ckpt.meta["stage"] == 1 and ckpt.train_config().synth_filler == 9
    assert "passed 2/2" in proc.stdout and "valid recall" in proc.stdout and "test recall" in proc.stdout and " of 10" in proc.stdout  # 5 documents x 2 pairs


def test_curriculum_fails_a_stage_at_its_step_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preset = staged(tmp_path, 'steps = 6\nadvance = "recall >= 1.01"', "synth_filler = 9\nsteps = 10")
    proc = in_process(capsys, "train", "--preset", preset, "--no-progress")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    failure = [line for line in proc.stderr.splitlines() if "failed" in line]
    assert len(failure) == 1 and "stage 1 of 2" in failure[0] and "within its 6 steps" in failure[0], proc.stderr
    assert "failed at 1/2" in proc.stdout
    ckpt = load_checkpoint(tmp_path / "r")
    assert ckpt.meta["step"] == 6 and ckpt.meta["stage"] == 0  # the failed stage's last checkpoint is kept
    # a stage without a condition simply runs its steps, and the next one follows
    preset = staged(tmp_path, "steps = 3", "synth_filler = 9\nsteps = 2")
    proc = in_process(capsys, "train", "--preset", preset, "--no-progress", "--out-dir", "plain")
    assert proc.returncode == 0, proc.stderr
    assert stage_records(tmp_path / "plain") == [(3, 2)] and load_checkpoint(tmp_path / "plain").meta["step"] == 5


def test_explicit_flags_beat_the_stages(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preset = staged(tmp_path, "steps = 3", "synth_filler = 9\nbptt_segments = 2\nsteps = 30")
    proc = in_process(capsys, "train", "--preset", preset, "--no-progress", "--synth-filler", "5", "--max-steps", "7")
    assert proc.returncode == 1  # stopped by --max-steps before the curriculum was done: said, not hidden
    assert "--synth-filler given" in proc.stderr and "stopped at max_steps = 7 in stage 2 of 2" in proc.stderr
    ckpt = load_checkpoint(tmp_path / "r")
    t = ckpt.train_config()
    assert ckpt.meta["step"] == 7 and t.synth_filler == 5 and t.bptt_segments == 2


def test_resume_continues_the_right_stage_exactly(tmp_path, capsys, monkeypatch):
    """Interrupted inside stage 1 and inside stage 2, the resumed runs retrace the uninterrupted one."""
    monkeypatch.chdir(tmp_path)
    preset = staged(tmp_path, 'steps = 10\nadvance = "ppl <= 1e9"', "synth_filler = 9\nsteps = 6")
    proc = in_process(capsys, "train", "--preset", preset, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    full = losses(tmp_path / "r")
    assert len(full) == 8 and stage_records(tmp_path / "r") == [(2, 2)]
    # a curriculum that has ended is not trained further by a resume: it is reported again
    proc = in_process(capsys, "train", "--resume", str(tmp_path / "r"), "--no-progress")
    assert proc.returncode == 0 and "passed 2/2" in proc.stdout and losses(tmp_path / "r") == full, proc.stderr
    for kept, dropped in ((2, 4), (4, 6)):  # step 2 ends stage 1 (its checkpoint starts stage 2); step 4 is inside stage 2
        run = interrupted_copy(tmp_path / "r", tmp_path / f"cut{kept}", kept, dropped)
        ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
        for name in ckpts:
            if int(name.split("-")[1]) > kept:
                import shutil

                shutil.rmtree(run / "checkpoints" / name)
        proc = in_process(capsys, "train", "--resume", str(run), "--no-progress")
        assert proc.returncode == 0, proc.stderr
        assert "stage 2 of 2" in proc.stdout
        assert losses(run)[kept:] == pytest.approx(full[kept:], rel=0, abs=0)


def test_curriculum_tables_are_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from crt.config import load_curriculum

    bad = tmp_path / "bad.toml"
    for text, needle in [
        ("[[stage]]\nsynth_filler = 3\n", "steps = N"),
        ("[[stage]]\nsteps = 0\n", "steps = N"),
        ('[[stage]]\nsteps = 5\nadvance = "recall > 0.9"\n', "METRIC >= X"),
        ('[[stage]]\nsteps = 5\nadvance = "accuracy >= 0.9"\n', "METRIC >= X"),
        ('[[stage]]\nsteps = 5\nadvance = "recall >= nan"\n', "METRIC >= X"),
        ("[[stage]]\nsteps = 5\nseed = 3\n", "cannot change"),
        ("[[stage]]\nsteps = 5\nd_model = 8\n", "training fields only"),
        ('[[stage]]\nsteps = 5\nsynth_filler = "long"\n', "expects an integer"),
    ]:
        bad.write_text(text)
        with pytest.raises(CRTError, match=needle):
            load_curriculum(str(bad))
    one_line_error(in_process(capsys, "train", "--preset", str(bad), "--no-progress"), "expects an integer")
    # the embedded default's two models share one curriculum
    crt, transformer = load_curriculum("synthetic-crt"), load_curriculum("synthetic-transformer")
    assert crt == transformer and len(crt) == 3 and all(s.advance for s in crt)


def test_cli_default_runs_both_models(tmp_path):
    proc = run_cli("train", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.split("test recall")[1]
    assert "crt" in table and "transformer" in table


def test_protocol_and_loss_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
        (ptb / name).write_text("a b c d e f g h\n" * 50)
    words = ["--preset", "ptb-crt-35", "--data-dir", str(ptb), "--max-steps", "1", "--no-progress"]
    refused(cli(capsys, "train", *words, "--protocol", "document"), "running text", "--protocol stream")
    refused(cli(capsys, "train", *words, "--loss", "answers"), "marks none", "--loss all")
    refused(cli(capsys, "train", *TINY, "--protocol", "documents"), "unknown protocol")
    refused(cli(capsys, "train", *TINY, "--loss", "some"), "unknown loss")
    refused(cli(capsys, "train", *TINY, "--protocol", "stream", "--bptt-segments", "0"), "stream protocol needs K >= 1")
    refused(cli(capsys, "train", *TINY, "--eval-batch-size", "0"), "eval_batch_size")
    refused(cli(capsys, "train", *TINY, "--batch-size", "100"), "exceeds the 60 training documents")


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(cli(capsys, "train", "--preset", "nope"), "unknown preset")
    refused(cli(capsys, "train", "--d-modle", "3"), "--d-modle")
    refused(cli(capsys, "train", "--d-model", "wide"), "wide")
    refused(cli(capsys, "train", "--segment-len", "0", *TINY[2:6]), "segment_len")
    refused(cli(capsys, "train", "--preset", "ptb-crt-35", "--data-dir", str(tmp_path / "missing")), "missing")
    (tmp_path / "empty").mkdir()
    for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
        (tmp_path / "empty" / name).write_text("" if name == "ptb.train.txt" else "a b\n")
    refused(cli(capsys, "train", "--preset", "ptb-crt-35", "--data-dir", str(tmp_path / "empty")), "has no words")
    refused(cli(capsys, "eval", "--checkpoint", str(tmp_path / "nothing")), "does not exist")
    refused(cli(capsys, "data", "download", "ptb", "--dir", str(tmp_path / "dl")), "could not download")
    assert not any((tmp_path / "dl").glob("*")) if (tmp_path / "dl").exists() else True


def write_ptb(folder: Path, words: list[str], lines: int = 60) -> Path:
    folder.mkdir()
    for split, n in (("train", lines), ("valid", 10), ("test", 10)):
        text = "".join(" ".join(words[(i + j) % len(words)] for j in range(7)) + "\n" for i in range(n))
        (folder / f"ptb.{split}.txt").write_text(text)
    return folder


def test_cli_eval_rejects_another_vocabulary_and_damage(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = write_ptb(tmp_path / "a", ["the", "cat", "sat", "on", "a", "mat"])
    b = write_ptb(tmp_path / "b", ["dogs", "bark", "at", "night", "and", "day"])
    model = ["--d-model", "32", "--n-layer", "1", "--d-ff", "64", "--segment-len", "8", "--batch-size", "2"]
    rc, out, err = cli(
        capsys, "train", "--preset", "ptb-crt-35", "--data-dir", str(a), *model, "--max-steps", "2", "--eval-every", "0", "--no-progress", "--out-dir", "r"
    )
    assert rc == 0, err
    assert cli(capsys, "eval", "--checkpoint", "r")[0] == 0
    refused(cli(capsys, "eval", "--checkpoint", "r", "--data-dir", str(b)), "vocabulary")
    # a corrupted checkpoint through the CLI: one line, and the file is left as it was
    weights = next((tmp_path / "r" / "checkpoints").glob("step-*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    refused(cli(capsys, "eval", "--checkpoint", "r"), "corrupted or truncated")
    assert weights.stat().st_size == 100


def test_ptb_presets_train_a_step_on_real_data(ptb_dir, tmp_path):
    """Each PTB preset builds its model and runs one update on the real corpus."""
    for name in [n for n in preset_names() if n.startswith("ptb-")]:
        m, t = load_preset(name)
        m, t = apply_overrides(
            m,
            t,
            {
                "data_dir": str(ptb_dir),
                "max_steps": 1,
                "batch_size": 2,
                "eval_max_tokens": 200,
                "d_model": 32,
                "d_ff": 64,
                "n_head": 2,
                "out_dir": str(tmp_path / name),
            },
        )
        summary = train(m, t, progress=False)
        assert summary["step"] == 1 and summary["valid_ppl"] > 100  # one step on a 10k vocabulary


def test_default_demo_answers_are_out_of_segment_reach():
    """In every stage of the embedded default every scored answer is predicted in a later segment
    than its value (the grid starts at each document), and in the last stage at least two whole
    segments of filler lie between a pair and its query: only a memory can beat chance."""
    from crt.config import load_curriculum, stage_config
    from crt.data.load import load_corpus

    for name in ("synthetic-crt", "synthetic-transformer"):
        m, base = load_preset(name)
        stages = load_curriculum(name)
        for i in range(len(stages)):
            t = dataclasses.replace(stage_config(base, stages, i), synth_valid_docs=50)
            docs = load_corpus(t).documents["valid"]
            L = m.segment_len
            for doc, answers in zip(docs.tokens, docs.answers):
                for a in answers.nonzero().flatten().tolist():
                    value_pos = (doc[: 2 * t.synth_pairs + 1] == doc[a - 1]).nonzero().flatten()[0].item() + 1  # k v in the header
                    assert doc[value_pos] == doc[a]
                    assert (a - 1) // L > value_pos // L  # predicted from a later segment
                    if i == len(stages) - 1:
                        query = a - 2  # its <q>
                        assert query // L - value_pos // L - 1 >= 2  # two whole segments between them


def test_patience_stops_once_valid_loss_stalls_and_a_resume_reports_it(tmp_path, monkeypatch, capsys):
    from crt.train.loop import StreamTask

    scripted = iter([3.0, 2.0, 2.5, 2.0, 2.6, 1.0, 1.0])  # best 2.0 at the 2nd; 2.5 and 2.0 (not below it) make two without improvement
    real = StreamTask.validate

    def validate(self, model):
        return {**real(self, model), "loss": next(scripted)}

    monkeypatch.setattr(StreamTask, "validate", validate)
    m, t = configs(tmp_path, max_steps=20, eval_every=2, patience=2, eval_test=True)
    summary = train(m, t, progress=False)
    assert summary["step"] == 8 and summary["curriculum"]["passed"]  # the 4th validation, at step 8, is the 2nd without improvement
    assert "stopped early at step 8" in capsys.readouterr().err
    records = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
    valid = [r for r in records if r["split"] == "valid"]
    test = [r for r in records if r["split"] == "test"]
    assert [r["step"] for r in valid] == [r["step"] for r in test] == [2, 4, 6, 8]
    from crt.data.load import load_corpus

    assert {r["tokens"] for r in test} == {len(load_corpus(t, m.segment_len).test) - 1}  # the whole test split each time
    again = train(m, t, resume=load_checkpoint(summary["run_dir"]), progress=False)
    assert again["step"] == 8 and "stopped early at step 8" in capsys.readouterr().err  # ended: not trained on


def test_patience_with_a_curriculum_is_refused(capsys, tmp_path):
    refused(cli(capsys, "train", "--patience", "3", "--out-dir", str(tmp_path / "r")), "--patience 3", "--no-stages")
