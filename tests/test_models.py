"""SPEC §7 properties of CRT and the segment Transformer, and the shared segment runner."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from crt.errors import CRTError
from crt.models import build_model
from crt.models.crt import CRTState
from crt.state import detach, iter_segments
from crt.train.evaluate import evaluate

V, L = 37, 8
TINY = dict(vocab_size=V, segment_len=L)  # the conftest tiny_config / tiny_lm fields of this module


def tokens(B=2, N=3 * L, seed=1):
    return torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(seed))


def stream_logits(model, x, segment_len=L):
    state = model.init_state(x.shape[0])
    return torch.cat([lg for _, lg, state in iter_segments(model, x, state, segment_len)], dim=1)  # [B, N, V]


def test_memory_position_none_ignores_memory_and_state_still_flows(tiny_lm):
    """With no memory token the logits cannot depend on the memory vector at all."""
    model = tiny_lm(memory_position="none", positions="learned")
    x = tokens(N=L)
    s0 = model.init_state(2)
    s1 = CRTState(torch.randn_like(s0.memory), s0.positions)
    assert torch.equal(model(x, s0)[0], model(x, s1)[0])


def test_zero_memory_semantics(tiny_lm):
    """memory_init=zeros means m_0 = 0 and still a memory token (W_m 0 + b_m); that is not the
    same model as memory_position=none, which has no memory token. Documented in CRT's docstring."""
    zeros = tiny_lm(memory_init="zeros")
    state = zeros.init_state(2)
    assert torch.count_nonzero(state.memory) == 0
    x = tokens(N=L)
    explicit = CRTState(torch.zeros(2, 32), torch.zeros(2, 32))
    assert torch.equal(zeros(x, state)[0], zeros(x, explicit)[0])
    # the same weights without a memory token give different logits
    none = build_model(dataclasses.replace(zeros.cfg, memory_position="none")).eval()
    none.load_state_dict(zeros.state_dict())
    assert not torch.allclose(zeros(x, state)[0], none(x, none.init_state(2))[0])
    # a learned m_0 starts at zero, so at initialisation both choices compute the same function
    learned = build_model(dataclasses.replace(zeros.cfg, memory_init="learned")).eval()
    learned.load_state_dict(zeros.state_dict(), strict=False)
    assert torch.equal(learned(x, learned.init_state(2))[0], zeros(x, state)[0])


def test_learned_initial_memory_gets_gradient(tiny_lm):
    model = tiny_lm()
    model.train()
    state = model.init_state(2)
    _, logits, _ = next(iter_segments(model, tokens(N=L), state, L, bptt_segments=1))
    logits.sum().backward()
    assert model.memory_init.grad is not None and model.memory_init.grad.abs().sum() > 0


def test_detach_cuts_graph(tiny_lm):
    model = tiny_lm()
    _, state = model(tokens(N=L), model.init_state(2))
    assert state.memory.requires_grad
    assert not any(t.requires_grad for t in detach(state))


def test_config_rejects_impossible_choices(tiny_config):
    with pytest.raises(CRTError, match="memory_position=append"):
        tiny_config(memory_reads="memory_token").validate()
    with pytest.raises(CRTError, match="segment_len"):
        tiny_config(segment_len=0).validate()
    with pytest.raises(CRTError, match="positions"):
        tiny_config("transformer", positions="recurrent").validate()


def test_evaluate_scores_every_token_once(tiny_lm):
    model = tiny_lm()
    data = tokens(B=1, N=101).flatten()
    for B in (1, 3, 7):
        assert evaluate(model, data, batch_size=B)["tokens"] == 100


def test_evaluate_matches_manual_perplexity(tiny_lm):
    """Batch size 1: the loss is the mean NLL of streaming the split by hand."""
    model = tiny_lm()
    data = tokens(B=1, N=3 * L + 4).flatten()
    logits = stream_logits(model, data[None, :-1])
    nll = F.cross_entropy(logits[0], data[1:])
    assert evaluate(model, data, batch_size=1)["loss"] == pytest.approx(nll.item(), rel=1e-5)


def test_sliding_window_with_full_stride_equals_segments(tiny_lm):
    model = tiny_lm("transformer")
    data = tokens(B=1, N=5 * L + 3).flatten()
    seg = evaluate(model, data, batch_size=2)
    slide = evaluate(model, data, batch_size=2, stride=L)
    assert slide["loss"] == pytest.approx(seg["loss"], rel=1e-6)
    overlap = evaluate(model, data, batch_size=2, stride=2)
    assert overlap["tokens"] == seg["tokens"]
    assert overlap["loss"] != pytest.approx(seg["loss"], rel=1e-6)  # more context changes the scores


def test_crt_eval_longer_segments_than_training(tiny_lm):
    model = tiny_lm(positions="learned", eval_segment_len=2 * L)
    x = tokens(N=2 * L)
    logits, _ = model(x, model.init_state(2))
    assert logits.shape == (2, 2 * L, V)
