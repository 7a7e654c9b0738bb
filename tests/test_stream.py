"""Token-by-token inference: the incremental stream equals the segment path; generation; streaming perplexity."""

from __future__ import annotations

import pytest
import torch

from crt.config import ModelConfig
from crt.errors import CRTError
from crt.infer import Stream, generate, open_stream, sample, score_stream
from crt.models import build_model
from crt.state import iter_segments
from crt.train.evaluate import evaluate

V, L = 23, 5
TINY = dict(vocab_size=V, segment_len=L, dropout=0.1, emb_dropout=0.1)  # the conftest tiny_lm fields of this module


def segment_path(model, tokens: torch.Tensor, segment_len: int = L) -> torch.Tensor:
    """Logits [B, T, V] of running whole segments with the state carried (what crt eval does)."""
    with torch.no_grad():
        segments = iter_segments(model, tokens, model.init_state(tokens.shape[0], evaluation=True), segment_len)
        return torch.cat([logits for _, logits, _ in segments], dim=1)


def stream_path(stream, tokens: torch.Tensor) -> torch.Tensor:
    return torch.stack([stream.feed(tokens[:, t]) for t in range(tokens.shape[1])], dim=1)  # [B, T, V]


def test_crt_stream_keeps_one_segment_of_keys_and_values(tiny_lm):
    model = tiny_lm()
    stream = Stream(model)
    for t in range(3 * L + 2):
        stream.feed(torch.tensor([t % V]))
        assert all(len(c) == (t + 1) % L + 1 for c in stream.segment.layers)  # memory token + this segment's tokens


def test_armt_incremental_stream_writes_its_memory_at_the_boundary(tiny_lm):
    """ARMT one token at a time (each layer reads last segment's associative memory, the memory
    tokens write it at the boundary) gives the segment path's logits across boundaries. W_v starts
    at zero (memory reads 0), so it is set at random here: the memory then changes the logits."""
    model = tiny_lm("armt")
    with torch.no_grad():
        for layer in model.layers:
            layer.memory.value.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    tokens = torch.randint(V, (2, 17), generator=torch.Generator().manual_seed(7))
    stream = open_stream(model, batch_size=2)
    assert isinstance(stream, Stream)
    logits = stream_path(stream, tokens)
    torch.testing.assert_close(logits, segment_path(model, tokens), atol=2e-5, rtol=1e-4)
    assert stream.state.A.abs().sum() > 0 and len(stream.segment.layers[0]) == 17 % L
    memoryless = model(tokens[:, L : 2 * L], model.init_state(2, evaluation=True))[0]  # the second segment without the first's memory
    assert (logits[:, L : 2 * L] - memoryless).abs().max() > 1e-3


def test_transformer_stream_caches_one_segment_and_rejects_other_models(tiny_lm):
    model = tiny_lm("transformer")
    tokens = torch.randint(V, (2, 13), generator=torch.Generator().manual_seed(2))
    stream = open_stream(model, batch_size=2)
    assert isinstance(stream, Stream)
    torch.testing.assert_close(stream_path(stream, tokens), segment_path(model, tokens), atol=2e-5, rtol=1e-4)
    assert all(len(c) == 13 % L for c in stream.segment.layers)
    video = build_model(ModelConfig(arch="crvit", num_classes=3, frame_shape="6x3", d_model=32, n_layer=1, n_head=4, d_ff=64, segment_len=4))
    with pytest.raises(CRTError, match="no token-by-token stream"):
        open_stream(video)


@pytest.mark.parametrize("arch", ["crt", "transformer", "transformer_xl", "rmt", "armt"])
def test_streams_use_the_evaluation_segment_length(arch, tiny_lm):
    """With eval_segment_len (3) shorter than the training segments (5), every stream closes its
    segments where `crt eval` does: its logits equal the segment path over segments of 3."""
    model = tiny_lm(arch, eval_segment_len=3, positions="learned" if arch not in ("crt", "transformer_xl") else "auto")
    tokens = torch.randint(V, (2, 11), generator=torch.Generator().manual_seed(8))
    logits = stream_path(open_stream(model, batch_size=2), tokens)
    torch.testing.assert_close(logits, segment_path(model, tokens, 3), atol=2e-5, rtol=1e-4)
    if arch != "transformer_xl":  # XL's memory spans segments: the boundary moves nothing it can see
        assert (logits - segment_path(model, tokens, L)).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["crt", "transformer", "transformer_xl", "rmt", "armt"])
def test_greedy_generation_is_the_argmax_of_teacher_forced_logits(arch, tiny_lm):
    """Generate 19 tokens greedily after a 3-token prompt (crossing four segment boundaries);
    re-reading prompt + output through the segment path, each generated token is the argmax
    at the position before it."""
    model = tiny_lm(arch)
    prompt = [3, 1, 4]
    out = generate(model, prompt, max_new_tokens=19, temperature=0.0)
    assert len(out) == 19
    full = torch.tensor([prompt + out])
    logits = segment_path(model, full)[0]  # [T, V]
    assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == out


def test_sampling_is_seeded_and_respects_top_k_and_top_p(tiny_lm):
    model = tiny_lm()
    a = generate(model, [1, 2], 30, temperature=1.0, seed=7)
    assert a == generate(model, [1, 2], 30, temperature=1.0, seed=7)
    assert a != generate(model, [1, 2], 30, temperature=1.0, seed=8)
    greedy = generate(model, [1, 2], 12, temperature=0.0)
    assert generate(model, [1, 2], 12, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(model, [1, 2], 12, temperature=1.0, top_p=1e-6, seed=3) == greedy
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_k=3, generator=g)) for _ in range(200)}
    assert draws == {1, 2, 4}
    probs = logits.softmax(-1)[0]  # nucleus: the smallest set reaching top_p
    p = float(probs[1] + probs[2]) - 1e-3
    assert {int(sample(logits, 1.0, top_p=p, generator=g)) for _ in range(200)} == {1, 2}
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], 3)


@pytest.mark.parametrize("arch", ["crt", "transformer_xl"])
def test_streaming_perplexity_equals_crt_eval(arch, tiny_lm):
    """score_stream over a token iterator equals evaluate() with one stream, and reports on the way."""
    model = tiny_lm(arch)
    data = torch.randint(V, (203,), generator=torch.Generator().manual_seed(4))
    reports = list(score_stream(model, iter(data.tolist()), report_every=50))
    assert [r["tokens"] for r in reports[:-1]] == [54, 104, 154] and reports[-1]["tokens"] == 202
    expected = evaluate(model, data, batch_size=1)
    assert reports[-1]["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
