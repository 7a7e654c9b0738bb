"""The onnxruntime per-token and segment runtimes: equal to the PyTorch segment path across
several boundaries, the fallback to the eager stream (said, never silent), the cache, and the CLI."""

from __future__ import annotations

import sys

import pytest
import torch
from cli_helpers import cli, in_process, refused

from crt.errors import CRTError
from crt.infer import Segments, Stream, generate, open_segments, open_stream, score_stream
from crt.state import iter_segments

pytest.importorskip("onnxruntime", reason="the onnxruntime runtimes need the edge extra: pip install -e '.[edge]'")
pytest.importorskip("onnxscript", reason="exporting the graphs needs the edge extra: pip install -e '.[edge]'")

from crt.infer import token_runtime  # noqa: E402  (after the skips: it is only usable with onnxruntime)
from crt.infer.token_runtime import TOLERANCE, SegmentRuntime, TokenRuntime  # noqa: E402

V, L = 23, 4
TINY = dict(vocab_size=V, segment_len=L)  # the conftest tiny_lm fields of this module


def segment_path(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of whole segments with the state carried (what crt eval does)."""
    with torch.no_grad():
        return torch.cat([logits for _, logits, _ in iter_segments(model, tokens, model.init_state(tokens.shape[0], evaluation=True), L)], dim=1)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test exports into its own cache: none reads graphs another test (or the user) made."""
    monkeypatch.setattr(token_runtime, "CACHE_DIR", tmp_path / "cache")


RUNTIME_MODELS = [
    ("crt", {}),
    ("crt", {"memory_cell": "ncgru"}),
    ("crt", {"memory_cell": "mingru", "position_cell": "mingru"}),
    ("crt", {"positions": "learned", "memory_reads": "last_token"}),  # absolute positions at a tensor offset; the memory reads the last output at close
    ("transformer", {}),
    ("armt", {}),
]


@pytest.mark.parametrize("arch,kw", RUNTIME_MODELS, ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()) or "default")
def test_per_token_runtime_equals_the_segment_path_across_boundaries(arch, kw, tiny_lm):
    """Two streams fed 5 segments and 2 tokens one token at a time through onnxruntime (4
    boundaries: close, then open from the carried state) give the segment path's logits within
    TOLERANCE; the state is really carried (a fresh state gives other logits after a boundary)."""
    model = tiny_lm(arch, seed=1, **kw)
    runtime = open_stream(model, batch_size=2, runtime="onnxruntime")
    assert isinstance(runtime, TokenRuntime) and runtime.runtime.startswith("onnxruntime per-token step (exported on the fly")
    assert runtime.max_difference <= TOLERANCE
    tokens = torch.randint(V, (2, 5 * L + 2), generator=torch.Generator().manual_seed(5))
    ours = torch.stack([runtime.feed(tokens[:, t]) for t in range(tokens.shape[1])], dim=1)  # [B, T, V]
    reference = segment_path(model, tokens)
    assert (ours - reference).abs().max() <= TOLERANCE
    if arch != "transformer":  # the Transformer carries nothing
        memoryless = segment_path(model, tokens[:, 3 * L :])
        assert (reference[:, 3 * L :] - memoryless).abs().max() > 1e-3


def test_generation_through_the_runtime_is_the_eager_generation(tiny_lm):
    model = tiny_lm("crt", memory_cell="ncgru")
    eager = generate(model, [3, 1, 4], 14, temperature=0.0)
    assert generate(model, [3, 1, 4], 14, temperature=0.0, stream=open_stream(model, 1, "auto")) == eager
    sampled = generate(model, [2], 10, temperature=1.0, seed=4)
    assert generate(model, [2], 10, temperature=1.0, seed=4, stream=open_stream(model, 1, "onnxruntime")) == sampled


def test_segment_runtime_scores_like_pytorch(tiny_lm):
    """score_stream over 3 whole segments and a shorter last one (PyTorch, from onnxruntime's state)."""
    model = tiny_lm("crt", memory_cell="ncgru")
    data = torch.randint(V, (3 * L + 3,), generator=torch.Generator().manual_seed(6)).tolist()
    segments = open_segments(model, 1, "onnxruntime")
    assert isinstance(segments, SegmentRuntime) and segments.runtime.startswith("onnxruntime segment step")
    ours = list(score_stream(model, iter(data), segments=segments))[-1]
    expected = list(score_stream(model, iter(data)))[-1]
    assert ours["tokens"] == expected["tokens"] == len(data) - 1
    assert ours["loss"] == pytest.approx(expected["loss"], abs=1e-5)


def test_graphs_are_cached_and_still_checked(tiny_lm, monkeypatch):
    model = tiny_lm()
    first = TokenRuntime(model)
    assert "exported on the fly" in first.runtime and "cached in" in first.runtime
    second = TokenRuntime(model)
    assert second.runtime.startswith(f"onnxruntime per-token step (cached in {token_runtime.CACHE_DIR}")
    other = tiny_lm(seed=2)  # other weights: other graphs
    assert "exported on the fly" in TokenRuntime(other).runtime
    monkeypatch.setattr(token_runtime, "TOLERANCE", -1.0)  # cached graphs that no longer reproduce PyTorch are refused
    with pytest.raises(CRTError, match="does not reproduce PyTorch over 3 segments"):
        TokenRuntime(model)


def test_unsupported_models_fall_back_to_the_eager_stream_and_say_why(tiny_lm, monkeypatch):
    """Transformer-XL's step re-reads a growing list of layer inputs: no fixed-size step. auto
    streams it eagerly (equal to the segment path) and says why; onnxruntime refuses."""
    model = tiny_lm("transformer_xl")
    with pytest.raises(CRTError, match="TransformerXL's stream changes what it keeps from one token to the next"):
        open_stream(model, 1, "onnxruntime")
    stream = open_stream(model, 1, "auto")
    assert type(stream) is Stream
    assert stream.runtime.startswith("PyTorch eager stream (onnxruntime cannot run it: TransformerXL's stream changes")
    tokens = torch.randint(V, (1, 2 * L + 1), generator=torch.Generator().manual_seed(2))
    logits = torch.stack([stream.feed(tokens[:, t]) for t in range(tokens.shape[1])], dim=1)
    torch.testing.assert_close(logits, segment_path(model, tokens), atol=2e-5, rtol=1e-4)
    assert open_stream(model, 1).runtime == "PyTorch eager stream"  # the default is the eager stream, unchanged
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if onnxruntime were absent
    segments = open_segments(tiny_lm(), 1, "auto")
    assert type(segments) is Segments and "onnxruntime is not installed" in segments.runtime
    with pytest.raises(CRTError, match="onnxruntime is not installed"):
        open_stream(tiny_lm(), 1, "onnxruntime")
    with pytest.raises(CRTError, match="unknown runtime 'fast': use auto, onnxruntime, torch"):
        open_stream(model, 1, "fast")


def test_cli_generate_and_score_say_which_runtime_ran(tiny_runs, capsys):
    run = str(tiny_runs["words"])
    eager = in_process(capsys, "generate", "--checkpoint", run, "--prompt", "the cat", "--max-new-tokens", "12", "--temperature", "0", "--runtime", "torch")
    assert eager.returncode == 0 and eager.stderr.strip() == "runtime: PyTorch eager stream"
    fast = in_process(capsys, "generate", "--checkpoint", run, "--prompt", "the cat", "--max-new-tokens", "12", "--temperature", "0")
    assert fast.returncode == 0 and fast.stderr.startswith("runtime: onnxruntime per-token step (exported on the fly") and len(fast.stderr.splitlines()) == 1
    assert fast.stdout == eager.stdout
    (tiny_runs["words_data"] / "score.txt").write_text("the cat sat on the mat\na dog ran far away\n" * 3)
    text = str(tiny_runs["words_data"] / "score.txt")
    scores = {r: in_process(capsys, "score", "--checkpoint", run, text, "--runtime", r) for r in ("torch", "onnxruntime")}
    assert scores["onnxruntime"].stderr.startswith("runtime: onnxruntime segment step")
    assert [line.split("peak")[0] for line in scores["onnxruntime"].stdout.splitlines()] == [
        line.split("peak")[0] for line in scores["torch"].stdout.splitlines()
    ]
    refused(cli(capsys, "generate", "--checkpoint", run, "--runtime", "fastest"), "unknown runtime 'fastest'", "auto, onnxruntime, torch")
    refused(cli(capsys, "score", "--checkpoint", run, text, "--runtime", ""), "unknown runtime ''")
