"""Hostile input to the command line: every bad value is one line naming it, exit 2, no
traceback, and nothing written. (Run folders, checkpoints and export have their own modules.)"""

import re
from pathlib import Path

import pytest
from cli_helpers import TINY_RUN, cli, refused, snapshot

# a small synthetic run; the flag under test is added to it
SMALL = [*TINY_RUN, "--max-steps", "2", "--eval-every", "0", "--no-progress", "--no-stages", "--out-dir", "run"]


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--lr", "0", "lr=0.0"),
        ("--lr", "nan", "lr=nan"),
        ("--lr", "-1", "lr=-1.0"),
        ("--lr", "inf", "finite"),
        ("--min-lr", "0.5", "min_lr=0.5 exceeds lr"),
        ("--beta1", "2", "beta1=2.0"),
        ("--beta2", "1", "beta2=1.0"),
        ("--dropout", "2", "dropout=2.0"),
        ("--dropout", "-0.1", "dropout=-0.1"),
        ("--emb-dropout", "1", "emb_dropout"),
        ("--d-memory", "-1", "d_memory=-1"),
        ("--log-every", "0", "log_every=0"),
        ("--max-steps", "0", "max_steps=0"),
        ("--max-steps", "-5", "max_steps=-5"),
        ("--keep-checkpoints", "0", "keep_checkpoints=0"),
        ("--seed", "-1", "seed=-1"),
        ("--seed", "99999999999999999999", "seed="),
        ("--batch-size", "0", "batch_size=0"),
        ("--eval-batch-size", "0", "eval_batch_size=0"),
        ("--grad-clip", "nan", "grad_clip"),
        ("--warmup-steps", "-1", "warmup_steps"),
        ("--weight-decay", "-0.1", "weight_decay"),
        ("--eval-every", "-1", "eval_every"),
        ("--synth-pairs", "0", "synth_pairs"),
        ("--video-crop", "0", "video_crop"),
        ("--precision", "fp16", "unknown precision"),
        ("--device", "tpu", "unknown device"),
        ("--out-dir", " ", "out_dir is empty"),
        ("--eval-stride", "9", "eval_stride=9 exceeds"),
        ("--mem-tokens", "-1", "mem_tokens"),
        ("--lr", "abc", "invalid float value"),
    ],
)
def test_bad_training_values_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, flag, value, needle):
    monkeypatch.chdir(tmp_path)
    refused(cli(capsys, "train", *SMALL, flag, value), needle)
    assert list(tmp_path.iterdir()) == []  # no run folder, no half file


PRESET = Path(__import__("crt.configs", fromlist=["x"]).__file__).parent / "synthetic-crt.toml"


def with_train(line: str) -> str:
    """The synthetic-crt preset with `line` (KEY = VALUE) in place of its [train] value of KEY."""
    key = line.split("=")[0].strip()
    text = re.sub(rf"(?m)^{key} = .*\n", "", PRESET.read_text())
    return text.replace("[train]\n", f"[train]\n{line}\n", 1)


def test_preset_values_are_typed_strictly(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    preset = tmp_path / "p.toml"
    for line, needle in [
        ("batch_size = 2.5", "batch_size expects an integer, got 2.5"),  # not silently 2
        ('batch_size = "4"', "batch_size expects an integer, got '4'"),  # a quoted number is a string
        ("batch_size = true", "batch_size expects an integer, got True"),
        ("precision = 16", "precision expects a string, got 16"),
        ("lr = -0.5", "lr=-0.5"),
    ]:
        preset.write_text(with_train(line))
        refused(cli(capsys, "train", "--preset", str(preset), "--no-progress"), needle)
    preset.write_text(with_train("batch_size = 4.0"))
    rc, out, err = cli(capsys, "flops", "--preset", str(preset))  # a float without a fraction is that whole number
    assert rc == 0, err
    stage = tmp_path / "s.toml"
    stage.write_text(PRESET.read_text() + "\n[[stage]]\nsteps = 5\nsynth_filler = -3\n")
    refused(cli(capsys, "train", "--preset", str(stage), "--no-progress"), "stage 4", "synth_filler=-3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.toml", "s.toml"]


def test_preset_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refused(cli(capsys, "train", "--preset", str(tmp_path / "missing.toml")), "preset file", "does not exist")
    refused(cli(capsys, "flops", "--preset", "./nowhere/x.TOML"), "does not exist")
    refused(cli(capsys, "train", "--preset", "synthetic-crtt"), "unknown preset 'synthetic-crtt'")
    (tmp_path / "dir.toml").mkdir()
    refused(cli(capsys, "flops", "--preset", "dir.toml"), "is not a file")
    (tmp_path / "bom.TOML").write_bytes(b"\xef\xbb\xbf" + PRESET.read_bytes())  # Windows editors write a BOM
    rc, out, err = cli(capsys, "flops", "--preset", "bom.TOML")
    assert rc == 0 and "crt" in out, err
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n[model]\n")
    refused(cli(capsys, "flops", "--preset", "latin1.toml"), "not UTF-8")


def test_the_default_job_is_not_silently_repurposed(tmp_path, monkeypatch, capsys):
    """--arch, --task or --data without a preset used to train both synthetic models anyway."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("some text\n" * 50)
    refused(cli(capsys, "train", "--data", "chars", "--data-dir", "t.txt", "--max-steps", "20"), "--data without --preset", "--preset")
    refused(cli(capsys, "train", "--arch", "rmt"), "--arch without --preset")
    refused(cli(capsys, "train", "--task", "video"), "--task without --preset")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_flags_that_do_nothing_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(capsys, "flops", "--preset", "synthetic-crt", "--mem-len", "5")
    assert rc == 0 and "crt: warning: --mem-len does nothing here: it is read by transformer_xl only" in err
    rc, out, err = cli(capsys, "train", *SMALL, "--assoc-dim", "8", "--vocab-size", "7", "--video-rotate", "10")
    assert rc == 0, err
    for flag in ("--assoc-dim", "--vocab-size", "--video-rotate"):
        assert f"crt: warning: {flag} does nothing here" in err
    # a field the default pair's CRT reads is not reported because the Transformer ignores it
    rc, out, err = cli(capsys, "flops", "--d-memory", "16")
    assert rc == 0 and "warning" not in err


def test_generate_and_bench_values(tmp_path, monkeypatch, capsys, tiny_runs):
    monkeypatch.chdir(tmp_path)
    run = str(tiny_runs["words"])
    for flags, needle in [
        (("--temperature", "nan"), "--temperature"),
        (("--temperature", "-1"), "--temperature"),
        (("--top-p", "0"), "--top-p"),
        (("--top-p", "nan"), "--top-p"),
        (("--max-new-tokens", "-1"), "--max-new-tokens"),
        (("--top-k", "-2"), "--top-k"),
        (("--prompt", "zebra"), "the prompt's word 'zebra'"),
    ]:
        refused(cli(capsys, "generate", "--checkpoint", run, *flags), needle)
    refused(cli(capsys, "generate", "--checkpoint", str(tiny_runs["chars"]), "--prompt", "quiz"), "character 'q'", "characters seen")
    for flag in ("--rounds", "--threads", "--steps", "--repeats", "--infer-batch", "--infer-tokens"):
        refused(cli(capsys, "bench", "--preset", "ptb-crt-35", flag, "0"), f"{flag} 0")
    refused(cli(capsys, "bench", "--preset", "synthetic-crt", "--rounds", "1"), "whole documents", "ptb-crt-35")
    assert list(tmp_path.iterdir()) == []


def test_generate_without_a_prompt_starts_a_line_for_words_and_characters(capsys, tiny_runs):
    for name in ("words", "chars"):  # a character model has no <eos>: it starts after a newline
        rc, out, err = cli(capsys, "generate", "--checkpoint", str(tiny_runs[name]), "--max-new-tokens", "5", "--temperature", "0")
        assert rc == 0 and out, err
    rc, out, _ = cli(capsys, "generate", "--checkpoint", str(tiny_runs["chars"]), "--prompt", " ", "--max-new-tokens", "3")
    assert rc == 0 and out.startswith(" ")  # a space is text to a character model, not "no prompt"


def test_score_reads_a_file_and_stdin_alike(tmp_path, monkeypatch, capsys, tiny_runs):
    """A byte-order mark and CRLF line ends: the file and the same bytes on stdin score alike,
    and as the training loaders read that text (words: CRLF ends a line as LF does; characters:
    \\r is a character like any other, and only the mark is dropped)."""
    import io
    import sys

    def score(run, source, stdin=b""):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        rc, out, err = cli(capsys, "score", "--checkpoint", str(run), source, "--report-every", "0")
        assert rc == 0 and "tokens" in out, err
        return out.split("  peak")[0]  # the peak RSS differs from call to call

    cases = {
        "words": (b"the cat sat\r\na dog ran\r\n" * 3, b"the cat sat\na dog ran\n" * 3),
        "chars": (b"hello world\r\nthis is\r\n" * 3, b"hello world\r\nthis is\r\n" * 3),
    }
    for name, (body, as_read) in cases.items():
        (tmp_path / "in.txt").write_bytes(b"\xef\xbb\xbf" + body)
        (tmp_path / "plain.txt").write_bytes(as_read)
        from_file = score(tiny_runs[name], str(tmp_path / "in.txt"))
        assert from_file == score(tiny_runs[name], "-", stdin=b"\xef\xbb\xbf" + body) == score(tiny_runs[name], str(tmp_path / "plain.txt"))
    (tmp_path / "bad.txt").write_bytes(b"the cat\nsat \xff\n")
    refused(cli(capsys, "score", "--checkpoint", str(tiny_runs["words"]), str(tmp_path / "bad.txt")), "not UTF-8", "line 2")
    refused(cli(capsys, "score", "--checkpoint", str(tiny_runs["words"]), str(tmp_path)), "is not a file")


def test_eval_scores_the_whole_split_and_refuses_what_does_not_apply(tmp_path, capsys, tiny_runs):
    from crt.data import load_words

    run = str(tiny_runs["words"])
    test_tokens = len(load_words(tiny_runs["words_data"]).test)
    rc, out, err = cli(capsys, "eval", "--checkpoint", run, "--split", "test")
    assert rc == 0 and f"tokens {test_tokens - 1:,}" in out and "only the first" not in out, err
    rc, out, err = cli(capsys, "eval", "--checkpoint", run, "--split", "test", "--eval-max-tokens", "50")
    assert rc == 0 and "tokens 50" in out and f"only the first 50 of {test_tokens - 1:,} tokens" in out, err  # capped only when asked, and said
    refused(cli(capsys, "eval", "--checkpoint", run, "--protocol", "document"), "running text", "--protocol stream")
    refused(cli(capsys, "eval", "--checkpoint", run, "--eval-stride", "9"), "eval_stride=9 exceeds")
    refused(cli(capsys, "eval", "--checkpoint", run, "--confusion", str(tmp_path / "c.png")), "--confusion is for video")
    refused(cli(capsys, "eval", "--checkpoint", run, "--eval-batch-size", "0"), "eval_batch_size=0")
    refused(cli(capsys, "eval", "--checkpoint", str(tiny_runs["synthetic"]), "--eval-max-tokens", "10"), "scored as documents")
    assert list(tmp_path.iterdir()) == []


def test_download_refuses_what_it_cannot_verify_and_leaves_no_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refused(cli(capsys, "data", "download", "ptb", "--dir", ""), "give --dir a folder")
    fake = tmp_path / "fake"
    fake.mkdir()
    for split in ("train", "valid", "test"):
        (fake / f"ptb.{split}.txt").write_text("not ptb\n")
    before = snapshot(fake)
    refused(cli(capsys, "data", "download", "ptb", "--dir", str(fake)), "is not the published ptb file", "move it away")
    assert snapshot(fake) == before
    (tmp_path / "afile").write_text("x")
    refused(cli(capsys, "data", "download", "ptb", "--dir", "afile/sub"), "--dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "fake"]


def test_extreme_numbers(tmp_path, monkeypatch, capsys, tiny_runs):
    monkeypatch.chdir(tmp_path)
    huge = str(10**400)
    refused(cli(capsys, "train", *SMALL, "--batch-size", huge), "batch_size=")
    refused(cli(capsys, "flops", "--d-model", huge), "out of range")
    refused(cli(capsys, "train", *SMALL, "--d-model", "1000000", "--d-ff", "100000000000"), "out of memory", "lower the sizes")
    refused(cli(capsys, "generate", "--checkpoint", str(tiny_runs["words"]), "--seed", str(2**64)), "--seed")
    refused(cli(capsys, "generate", "--checkpoint", str(tiny_runs["words"]), "--seed", "-1"), "--seed")
    for flags in (("--temperature", "1e-300"), ("--top-p", "1e-300")):  # tiny but valid: the most likely token
        rc, out, err = cli(capsys, "generate", "--checkpoint", str(tiny_runs["words"]), "--max-new-tokens", "3", *flags)
        assert rc == 0, err
    assert list(tmp_path.iterdir()) == []


def test_preset_structure_and_unknown_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for text in ("stage = 5\n", "model = 5\n", "stage = [1, 2]\n"):
        (tmp_path / "p.toml").write_text(text)
        refused(cli(capsys, "flops", "--preset", "p.toml"), "must be tables")
    (tmp_path / "p.toml").write_text(PRESET.read_text().replace("steps = 1500\n", "steps = 1500.0\n", 1))
    from crt.config import load_curriculum

    assert load_curriculum(str(tmp_path / "p.toml"))[0].steps == 1500  # a whole float, as for every field
    refused(cli(capsys, "train", *SMALL, "--data", "nonsense"), "unknown data 'nonsense'")
