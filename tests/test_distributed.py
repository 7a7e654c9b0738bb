"""Data-parallel training under torchrun (crt.train.distributed): 2 Gloo processes against 1.

The 2-process runs are launched as a user launches them (`torchrun --standalone
--nproc_per_node 2 -m crt train ...`, here via `python -m torch.distributed.run`), and compared
with the 1-process run of the same global batch, trained in this process. No dropout, fp32.

Tolerance: 1e-5 relative on every step's loss and on perplexity. The processes see half the
rows each, so matrix products run on other shapes and sum in another order (about 1e-7 apart
over these 6 steps); a wrong share, normaliser or state gives differences of 1e-3 and more.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, refused

from crt.train.distributed import World, anchor, drop_unused_grads, micro_rows, reached, row_share, seed_process, world
from crt.train.evaluate import Tally

RTOL = 1e-5

# a tiny CRT on characters: K = 1, so the memory RNN that writes the next state gets no gradient in
# any step, and m_0 only in the first (the pitfall DDP without find_unused_parameters must survive)
STREAM = ["--preset", "ptb-crt-35", "--data", "chars", "--d-model", "32", "--n-layer", "1", "--d-ff", "64", "--n-head", "2", "--segment-len", "16"]
STREAM += ["--batch-size", "4", "--bptt-segments", "1", "--max-steps", "6", "--eval-every", "0", "--checkpoint-every", "3", "--log-every", "1"]
STREAM += ["--dropout", "0", "--emb-dropout", "0", "--precision", "fp32", "--eval-max-tokens", "3000", "--no-progress"]
# the segment Transformer on the recall task's documents, the loss on the answers only: the ranks'
# micro-batches hold different numbers of answers, so the mean needs the global count
DOCS = ["--preset", "synthetic-transformer", "--no-stages", "--d-model", "32", "--n-layer", "1", "--d-ff", "64", "--batch-size", "8"]
DOCS += ["--synth-train-docs", "64", "--synth-valid-docs", "10", "--synth-test-docs", "6", "--loss", "answers", "--protocol", "document"]
DOCS += ["--max-steps", "4", "--eval-every", "0", "--log-every", "1", "--dropout", "0", "--emb-dropout", "0", "--precision", "fp32", "--no-progress"]


def torchrun(*args: str, cwd: Path, module: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *(["-m", "crt"] if module else []), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env={**env, "PYTHONUNBUFFERED": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def records(run: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in records(run, "train")]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    words = "the cat sat on a mat and dog ran far away while birds sang".split()
    lines = [" ".join(words[i] for i in torch.randint(len(words), (12,), generator=g).tolist()) for _ in range(2000)]
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def stream_runs(text):
    """The CRT stream run on 2 processes with --grad-accum 2 (4 micro-batches of one row), and its
    resume from the step-3 checkpoint, also on 2 processes."""
    root = text.parent
    proc = torchrun("train", *STREAM, "--data-dir", str(text), "--grad-accum", "2", "--out-dir", "two", cwd=root)
    assert "2 processes, gloo, DDP with find_unused_parameters=False" in proc.stdout  # read off the DDP object itself
    torchrun("train", "--resume", "two/checkpoints/step-0000003", "--out-dir", "two-resumed", "--no-progress", cwd=root)
    return root / "two", root / "two-resumed"


def test_two_processes_train_as_one(stream_runs, text, capsys, monkeypatch):
    monkeypatch.chdir(text.parent)
    rc, _, err = cli(capsys, "train", *STREAM, "--data-dir", str(text), "--out-dir", "one")
    assert rc == 0, err
    one, (two, _) = Path("one"), stream_runs
    assert len(losses(one)) == len(losses(two)) == 6
    assert losses(two) == pytest.approx(losses(one), rel=RTOL)
    assert [r["tokens_seen"] for r in records(two, "train")] == [r["tokens_seen"] for r in records(one, "train")]
    assert records(two, "valid")[-1]["ppl"] == pytest.approx(records(one, "valid")[-1]["ppl"], rel=RTOL)
    # the unused memory RNN was left alone, as in one process (a zero gradient would still have decayed it)
    from crt.checkpoint import load_model

    a, _ = load_model(one)
    b, _ = load_model(two)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=RTOL, atol=1e-6, msg=name)


def test_two_process_checkpoint_resumes_exactly(stream_runs):
    two, resumed = stream_runs
    assert losses(resumed) == losses(two)  # bit for bit: the same processes redo the same steps
    assert records(resumed, "valid")[-1]["ppl"] == records(two, "valid")[-1]["ppl"]
    trainer = torch.load(two / "checkpoints" / "step-0000006" / "trainer.pt", weights_only=False)
    assert trainer["world"] == 2 and len(trainer["rank_rng"]) == 2
    assert trainer["state"][0].shape[0] == 4  # every row of the global batch, not rank 0's share


def test_other_world_size_continues_the_state_with_a_warning(stream_runs, capsys, tmp_path):
    two, _ = stream_runs
    rc, _, err = cli(capsys, "train", "--resume", str(two / "checkpoints" / "step-0000003"), "--out-dir", str(tmp_path / "one"), "--no-progress")
    assert rc == 0, err
    assert "written by 2 processes and resumes on 1" in err
    assert losses(tmp_path / "one") == pytest.approx(losses(two), rel=RTOL)  # no dropout: the same run


def test_two_processes_train_documents_as_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torchrun("train", *DOCS, "--out-dir", "two", cwd=tmp_path)
    rc, _, err = cli(capsys, "train", *DOCS, "--out-dir", "one")
    assert rc == 0, err
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=RTOL)
    for key in ("ppl", "recall", "answer_loss"):
        assert records(tmp_path / "two", "valid")[-1][key] == pytest.approx(records(tmp_path / "one", "valid")[-1][key], rel=RTOL)


def test_two_process_resume_with_dropout_restores_every_rank_s_random_stream(tmp_path):
    """With dropout each rank draws its own masks; the checkpoint keeps every rank's stream, so the
    resumed run redraws the same masks and retraces the uninterrupted one bit for bit."""
    flags = [*DOCS, "--dropout", "0.1", "--emb-dropout", "0.1", "--checkpoint-every", "2", "--keep-checkpoints", "3"]
    torchrun("train", *flags, "--out-dir", "two", cwd=tmp_path)
    torchrun("train", "--resume", "two/checkpoints/step-0000002", "--out-dir", "resumed", "--no-progress", cwd=tmp_path)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "two")


def test_an_error_on_rank_0_alone_ends_every_rank_with_its_message(tmp_path):
    """Rank 0 alone claims the run folder: when it cannot, every rank stops with rank 0's error
    (not a hang in the next collective, nor a traceback on the others)."""
    (tmp_path / "taken").write_text("a file where the run folder would go")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "crt", "train", *DOCS, "--out-dir", "taken"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("crt: error")]
    assert proc.returncode != 0 and len(errors) == 2, proc.stderr[-3000:]
    # the two processes print in either order
    assert sorted(e.split(":", 2)[1] for e in errors) == [" error", " error (rank 1)"] and all("cannot make the run folder" in e for e in errors)
    assert not [
        line for line in proc.stderr.splitlines() if line.strip().startswith('File "') and "crt" in line.split("site-packages")[-1]
    ]  # no frame of crt's: torchrun's own report only


def test_eval_is_the_same_at_any_world_size(stream_runs):
    """The 2-process run's last validation (each process its share of the 10 rows, sums reduced)
    equals this process scoring the same checkpoint alone: the split is scored once."""
    from crt.checkpoint import load_model
    from crt.data.load import load_corpus
    from crt.train.evaluate import evaluate

    two, _ = stream_runs
    model, ckpt = load_model(two, "cpu")
    t = ckpt.train_config()
    corpus = load_corpus(t, model.cfg.segment_len)
    one = evaluate(model, corpus.valid, t.eval_batch_size, max_tokens=t.eval_max_tokens, token_bytes=corpus.token_bytes)
    last = records(two, "valid")[-1]
    assert last["step"] == 6 and last["tokens"] == one["tokens"] == t.eval_max_tokens  # every token scored once, none twice
    assert last["loss"] == pytest.approx(one["loss"], rel=1e-6) and last["bpb"] == pytest.approx(one["bpb"], rel=1e-6)


# --- the pieces, in one process


def test_row_shares_partition_the_batch():
    for n, parts in [(10, 3), (4, 4), (2, 3), (32, 8)]:
        shares = [row_share(n, parts, i) for i in range(parts)]
        assert [r for s in shares for r in range(n)[s]] == list(range(n))  # contiguous, in order, each row once
        assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1
    assert world() == World(0, 1)
    assert micro_rows(8, 2) == [slice(0, 4), slice(4, 8)]


def test_a_batch_that_does_not_split_is_refused(capsys, tmp_path):
    refused(cli(capsys, "train", *DOCS, "--grad-accum", "3", "--out-dir", str(tmp_path / "r")), "--batch-size 8", "multiple of 3")


def test_grad_accum_is_the_same_update(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, extra in [("whole", []), ("pieces", ["--grad-accum", "4"])]:
        rc, _, err = cli(capsys, "train", *DOCS, "--out-dir", name, *extra)
        assert rc == 0, err
    assert losses(tmp_path / "pieces") == pytest.approx(losses(tmp_path / "whole"), rel=RTOL)


def test_each_rank_draws_its_own_random_stream():
    torch.manual_seed(7)
    seed_process(7, 0)  # rank 0 keeps the run's stream: one process is the run it always was
    zero = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(4), zero)
    draws = []
    for rank in (1, 2):
        torch.manual_seed(7)
        seed_process(7, rank)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], zero) and not torch.equal(draws[1], zero) and not torch.equal(draws[0], draws[1])


def test_anchor_reaches_exactly_the_unused_parameters():
    used, idle = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    params = [*used.parameters(), *idle.parameters()]
    loss = used(torch.ones(1, 3)).sum()
    here = reached(loss, params)
    assert here == [True, True, False, False]
    (loss + anchor(params, here)).backward()
    assert all(p.grad is not None for p in params)  # DDP's reduction sees every parameter
    assert not any(p.grad.any() for p in idle.parameters())  # with zeros where the step did not reach
    drop_unused_grads(params, here)
    assert [p.grad is None for p in params] == [False, False, True, True]


def test_tally_reduced_keeps_its_token_bytes_and_its_types():
    t = Tally(token_bytes=torch.ones(5, dtype=torch.int64))
    t.nll, t.count, t.hits, t.answers, t.answer_nll, t.bytes = 3.5, 7, 2, 4, 1.5, 9
    before = t.result()
    assert t.reduced().result() == before and t.count == 7 and isinstance(t.count, int) and t.token_bytes.shape == (5,)


def test_commands_that_do_not_run_distributed_are_refused(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused(cli(capsys, "flops"), "torchrun", "train and eval")


def test_under_torchrun_the_command_ends_with_os_exit_after_flushing(capsys, monkeypatch):
    """entry(), the `crt` command: under torchrun it skips the interpreter's teardown of the
    distributed runtime (os._exit, main's status, output flushed first); outside, a normal exit."""
    import crt.cli.main as cli_main

    class Exited(Exception):
        pass

    def os_exit(code):
        calls.append("os._exit")
        raise Exited(code)

    calls: list[str] = []
    monkeypatch.setattr(cli_main.os, "_exit", os_exit)
    monkeypatch.setattr(sys.stdout, "flush", lambda: calls.append("stdout flushed"))
    monkeypatch.setattr(sys.stderr, "flush", lambda: calls.append("stderr flushed"))
    monkeypatch.setattr(sys, "argv", ["crt", "flops"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exited) as ended:
        cli_main.entry()
    assert ended.value.args == (2,) and calls[-3:] == ["stdout flushed", "stderr flushed", "os._exit"]  # flops refuses torchrun: status 2
    assert "only train and eval run distributed" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit) as normal:
        cli_main.entry()
    assert normal.value.code == 0 and "MFLOP" in capsys.readouterr().out


def test_world_size_without_torchrun_is_a_clear_error(capsys, monkeypatch, tmp_path):
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused(cli(capsys, "train", *DOCS, "--out-dir", str(tmp_path / "r")), "WORLD_SIZE=2", "launch with torchrun")
    assert not torch.distributed.is_initialized()
