"""Shared fixtures: tiny seeded models, and the read-only benchmark data beside the repository (../shared/data)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from crt.config import ModelConfig
from crt.models import build_model

_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The onnxruntime per-token runtime caches its exported graphs (crt.infer.token_runtime): the tests,
# and the CLI processes they start, keep theirs in a folder of their own, removed at exit.
os.environ["CRT_CACHE_DIR"] = tempfile.mkdtemp(prefix="crt-test-cache-")
atexit.register(shutil.rmtree, os.environ["CRT_CACHE_DIR"], True)


@pytest.fixture
def tiny_config(request):
    """Factory of tiny ModelConfigs: tiny_config(arch="crt", **fields). Width 32, 2 layers, 4 heads,
    feed-forward 64, no dropout, vocabulary 23 and segments of 5, updated by the test module's
    TINY dict (its own vocabulary, segment length, dropout) and then by `fields`."""
    base = {**dict(vocab_size=23, d_model=32, n_layer=2, n_head=4, d_ff=64, segment_len=5, dropout=0.0, emb_dropout=0.0), **getattr(request.module, "TINY", {})}

    def make(arch: str = "crt", **fields) -> ModelConfig:
        return ModelConfig(arch=arch, **{**base, **fields})

    return make


@pytest.fixture
def tiny_lm(tiny_config):
    """Factory of tiny models in eval mode, seeded: tiny_lm(arch="crt", seed=0, **fields) (fields as
    `tiny_config`). ARMT starts with W_v = 0, so its memory stores nothing; here W_v is drawn at
    random so that its memory path is exercised."""

    def make(arch: str = "crt", seed: int = 0, **fields) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = build_model(tiny_config(arch, **fields)).eval()
        if arch == "armt":
            with torch.no_grad():
                for layer in model.layers:
                    layer.memory.value.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(3))
        return model

    return make


@pytest.fixture
def ptb_dir() -> Path:
    """../shared/data/ptb (ptb.{train,valid,test}.txt), or skip when this machine lacks it."""
    path = _DATA / "ptb"
    if not path.is_dir():
        pytest.skip(f"../shared/data/ptb not found: {path} holds the PTB files on the project machines")
    return path


@pytest.fixture
def wikitext2_dir() -> Path:
    """../shared/data/wikitext-2 (wiki.{train,valid,test}.tokens), or skip when this machine lacks it."""
    path = _DATA / "wikitext-2"
    if not path.is_dir():
        pytest.skip(f"../shared/data/wikitext-2 not found: {path} holds the WikiText-2 files on the project machines")
    return path


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """Three finished 4-step runs, trained once per session (tests copy them before changing
    anything): `words` (a word corpus, stream protocol), `chars` (a character file with a
    byte-order mark and CRLF line ends) and `synthetic` (the recall task, document protocol)."""
    from crt.config import ModelConfig, TrainConfig
    from crt.train.loop import train

    root = tmp_path_factory.mktemp("tiny_runs")
    words = root / "words-data"
    words.mkdir()
    for split, n in (("train", 200), ("valid", 20), ("test", 20)):
        (words / f"ptb.{split}.txt").write_text("the cat sat on the mat\na dog ran far away\n" * n)
    chars = root / "chars.txt"
    chars.write_bytes("\ufeff".encode() + b"hello world\r\nthis is a text\r\n" * 200)
    model = dict(d_model=32, n_layer=1, n_head=4, d_ff=64, segment_len=8)
    run = dict(batch_size=4, bptt_segments=2, max_steps=4, warmup_steps=1, eval_every=0, log_every=1, checkpoint_every=2, keep_checkpoints=5)
    data = {
        "words": dict(data="words", data_dir=str(words)),
        "chars": dict(data="chars", data_dir=str(chars)),
        "synthetic": dict(data="synthetic", synth_train_docs=40, synth_valid_docs=5, synth_test_docs=5, synth_filler=4, bptt_segments=0),
    }
    runs = {}
    for name, fields in data.items():
        t = TrainConfig(**{**run, **fields, "out_dir": str(root / name)})
        runs[name] = Path(train(ModelConfig(**model), t, progress=False)["run_dir"])
    runs["words_data"], runs["chars_data"] = words, chars
    return runs
