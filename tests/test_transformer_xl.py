"""Transformer-XL: relative attention, memory, masks, and chunked-equals-single-pass (SPEC §4, §7)."""

from __future__ import annotations

import math

import pytest
import torch

from crt.config import ModelConfig
from crt.layers import sinusoidal_table
from crt.models.transformer_xl import TransformerXL, XLState, attention_mask, relative_distances
from crt.state import detach, reset_rows

V = 50


def make(seed: int = 0, **kw) -> TransformerXL:
    torch.manual_seed(seed)
    args = dict(arch="transformer_xl", vocab_size=V, d_model=32, n_layer=2, n_head=4, d_ff=64, segment_len=4)
    args.update(kw)
    return TransformerXL(ModelConfig(**args)).eval()


def tokens(B: int, N: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(seed))


def stream(model: TransformerXL, x: torch.Tensor, T: int, state: XLState | None = None) -> tuple[torch.Tensor, XLState]:
    """Feed x [B, N] in chunks of T (the last may be shorter); return all logits and the last state."""
    state = model.init_state(x.shape[0]) if state is None else state
    out = []
    for s in range(0, x.shape[1], T):
        logits, state = model(x[:, s : s + T], state)
        out.append(logits)
    return torch.cat(out, dim=1), state


def streaming_mask(N: int, T: int, M: int, same_length: bool) -> torch.Tensor:
    """allowed[i, j] = seg_start(i) - M <= j <= i, and with same_length also j > i - M."""
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    allowed = (j <= i) & (j >= (i // T) * T - M)
    return allowed & (j > i - M) if same_length else allowed


@torch.no_grad()
def test_causality_within_and_across_segments():
    model = make(mem_len=4)
    x = tokens(2, 12)
    base, _ = stream(model, x, 4)
    for t in (2, 6, 9):  # in segment 1, at the start of segment 2, inside segment 3
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % V
        changed, _ = stream(model, y, 4)
        torch.testing.assert_close(changed[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(changed[:, t], base[:, t])


@pytest.mark.parametrize(
    "T, M, clamp_len, same_length",
    [(4, 4, -1, False), (4, 6, -1, False), (6, 4, -1, False), (3, 8, -1, False), (4, 4, 3, False), (4, 6, -1, True), (6, 4, 2, True)],
)
@torch.no_grad()
def test_streaming_equals_single_pass(T, M, clamp_len, same_length):
    model = make(segment_len=T, mem_len=M, clamp_len=clamp_len, same_length=same_length)
    N = 4 * T + T // 2  # a shorter last chunk too
    x = tokens(2, N)
    streamed, _ = stream(model, x, T)
    single = model.forward_with_mask(x, streaming_mask(N, T, M, same_length))
    torch.testing.assert_close(streamed, single, rtol=0, atol=1e-5)


@torch.no_grad()
def test_relative_attention_matches_dai_equation():
    """One layer against A_ij = q.k + q.W_R R_{i-j} + u.k + v.W_R R_{i-j}, softmax(A / sqrt(hd)) by hand."""
    model = make(mem_len=3)
    attn = model.blocks[0].attn
    B, T, M, D, H = 2, 4, 3, 32, 4
    hd = D // H
    torch.manual_seed(5)
    x, mem = torch.randn(B, T, D), torch.randn(B, M, D)
    allowed = attention_mask(torch.tensor([[False, True, True], [True, True, True]]), T, same_length=False)
    rel = sinusoidal_table(torch.arange(M + T), D)
    got = attn(x, memory=mem, rel=rel, dist=relative_distances(T, M, -1), allowed=allowed)

    q = attn.q(x).view(B, T, H, hd)
    k, v = attn.kv(torch.cat([mem, x], 1)).view(B, M + T, 2, H, hd).unbind(2)
    r = attn.pos(rel).view(M + T, H, hd)
    A = torch.full((B, H, T, M + T), float("-inf"))
    for i in range(T):
        for j in range(M + T):
            if allowed[:, i, j].any():
                Rij = r[M + i - j]  # [H, hd]
                a = (q[:, i] * k[:, j]).sum(-1) + (q[:, i] * Rij).sum(-1) + (attn.u * k[:, j]).sum(-1) + (attn.v * Rij).sum(-1)
                A[:, :, i, j] = torch.where(allowed[:, i, j, None], a, float("-inf"))
    w = torch.softmax(A / math.sqrt(hd), dim=-1)  # [B, H, T, M+T]
    want = attn.out(torch.einsum("bhij,bjhd->bihd", w, v).reshape(B, T, D))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_memory_is_used_and_reset_forgets():
    model = make(mem_len=4)
    x = tokens(1, 8)
    y = x.clone()
    y[:, 1] = (y[:, 1] + 1) % V  # change a token of segment 1
    a, _ = stream(model, x, 4)
    b, _ = stream(model, y, 4)
    assert not torch.allclose(a[:, 4:], b[:, 4:])  # segment 2 sees segment 1 through the memory
    _, state_x = model(x[:, :4], model.init_state(1))
    _, state_y = model(y[:, :4], model.init_state(1))
    assert not torch.allclose(state_x.mems, state_y.mems)
    fresh = model.init_state(1)
    ax, _ = model(x[:, 4:], reset_rows(state_x, fresh, torch.tensor([True])))
    ay, _ = model(x[:, 4:], reset_rows(state_y, fresh, torch.tensor([True])))
    torch.testing.assert_close(ax, ay, rtol=0, atol=0)  # after a reset segment 1 is forgotten


def test_state_has_no_gradient_and_valid_shifts():
    model = make(mem_len=6).train()  # T = 4 < M = 6
    x = tokens(2, 12)
    state = model.init_state(2)
    assert state.mems.shape == (2, 2, 6, 32) and not state.valid.any()
    logits, state = model(x[:, :4], state)
    assert not state.mems.requires_grad and not state.valid.requires_grad
    assert state.valid.tolist() == [[False, False, True, True, True, True]] * 2
    logits2, state = model(x[:, 4:8], state)
    assert state.valid.all()
    (logits.sum() + logits2.sum()).backward()  # gradients reach the parameters, not the cache
    attn = model.blocks[0].attn
    assert attn.u.grad is not None and attn.v.grad is not None and attn.pos.weight.grad is not None


@torch.no_grad()
def test_first_segment_ignores_memory_contents():
    model = make(mem_len=4)
    x = tokens(2, 4)
    fresh, _ = model(x, model.init_state(2))
    garbage = XLState(torch.randn(2, 2, 4, 32), torch.zeros(2, 4, dtype=torch.bool))
    torch.testing.assert_close(model(x, garbage)[0], fresh, rtol=0, atol=0)  # invalid slots are never read
    alone = model.forward_with_mask(x, torch.ones(4, 4, dtype=torch.bool).tril())
    torch.testing.assert_close(fresh, alone, rtol=0, atol=1e-5)  # a plain causal pass over the segment


def test_relative_distances_clamp():
    T, M = 3, 4
    full = relative_distances(T, M, -1)
    i, j = torch.arange(T)[:, None], torch.arange(M + T)[None, :]
    assert torch.equal(full, (M + i - j).clamp(min=0))
    clamped = relative_distances(T, M, 2)
    assert torch.equal(clamped, full.clamp(max=2))
    assert clamped.max() == 2


@torch.no_grad()
def test_clamp_len_behaviour():
    x = tokens(1, 12)
    plain, _ = stream(make(mem_len=4), x, 4)
    wide, _ = stream(make(mem_len=4, clamp_len=7), x, 4)  # longest distance is M + T - 1 = 7
    narrow, _ = stream(make(mem_len=4, clamp_len=1), x, 4)
    torch.testing.assert_close(wide, plain, rtol=0, atol=0)  # a clamp beyond every distance does nothing
    assert not torch.allclose(narrow[:, 4:], plain[:, 4:])
    # with clamp_len = 0 every distance looks the same: the model sees a bag of the allowed keys
    model = make(mem_len=4, clamp_len=0)
    a = model.forward_with_mask(x[:, :4], torch.ones(4, 4, dtype=torch.bool))
    b = model.forward_with_mask(x[:, [1, 0, 2, 3]], torch.ones(4, 4, dtype=torch.bool))
    torch.testing.assert_close(a[:, 2:], b[:, 2:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("T, M", [(4, 4), (3, 6), (7, 3)])
def test_same_length_mask(T, M):
    full = torch.ones(1, M, dtype=torch.bool)
    same = attention_mask(full, T, same_length=True)[0]
    assert same.sum(-1).tolist() == [M] * T  # every query attends to exactly M keys
    assert attention_mask(full, T, same_length=False)[0].sum(-1).tolist() == [M + i + 1 for i in range(T)]
    # the reference implementation's mask (True = blocked), with mlen == mem_len == M
    ones = torch.ones(T, M + T)
    mask_len = M + T - M
    mask_shift_len = T - mask_len if mask_len > 0 else T
    blocked = (torch.triu(ones, 1 + M) + torch.tril(ones, -mask_shift_len)).bool()
    assert torch.equal(same, ~blocked)
    # invalid memory slots are never attended
    part = torch.tensor([[False, True] + [True] * (M - 2)])
    assert not attention_mask(part, T, same_length=True)[0, :, 0].any()


@torch.no_grad()
def test_eval_memory_length_and_any_segment_length():
    model = make(segment_len=4, mem_len=4, eval_mem_len=7)
    assert model.init_state(3).mems.shape[2] == 4
    state = model.init_state(3, evaluation=True)
    assert state.mems.shape == (3, 2, 7, 32) and state.valid.shape == (3, 7)
    x = tokens(3, 19)
    for T in (5, 9):  # neither is the training segment length; 9 > M
        streamed, st = stream(model, x, T, model.init_state(3, evaluation=True))
        assert streamed.shape == (3, 19, V) and st.valid.all()
        torch.testing.assert_close(streamed, model.forward_with_mask(x, streaming_mask(19, T, 7, False)), rtol=0, atol=1e-5)
    defaults = make(segment_len=5)
    assert defaults.cfg.memory_len == 5 and defaults.cfg.eval_memory_len == 5


@torch.no_grad()
def test_reset_rows():
    model = make(mem_len=4)
    x = tokens(2, 12)
    _, state = stream(model, x[:, :8], 4)
    logits, _ = model(x[:, 8:], reset_rows(state, model.init_state(2), torch.tensor([False, True])))
    untouched, _ = model(x[:, 8:], state)
    fresh_row, _ = model(x[1:, 8:], model.init_state(1))
    torch.testing.assert_close(logits[0], untouched[0], rtol=0, atol=0)
    torch.testing.assert_close(logits[1], fresh_row[0], rtol=0, atol=1e-6)


def test_bf16_autocast_is_finite():
    model = make(mem_len=4)
    x = tokens(2, 12)
    state = model.init_state(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for s in range(0, 12, 4):
            logits, state = model(x[:, s : s + 4], state)
            assert torch.isfinite(logits.float()).all()
            state = detach(state)
    assert state.mems.dtype == torch.float32 and torch.isfinite(state.mems).all()
