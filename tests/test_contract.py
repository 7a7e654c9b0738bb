"""SPEC §7, once, for every language model and its interesting choices.

Causality, recurrence, no hidden state, reset, the state's dtype under autocast, gradients
through exactly K segments, the stream equal to the segment path, and export parity. Each
model's own maths (XL's attention, the associative memory, NCGRU, Diagonal Batching) is tested
in its own file.
"""

from __future__ import annotations

import pytest
import torch

from crt.infer import open_stream
from crt.state import iter_segments, reset_rows

V, L = 23, 5
TINY = dict(vocab_size=V, segment_len=L)  # the conftest tiny_lm fields of this module


def case(arch: str, recurrent: bool = True, **kw) -> pytest.param:
    """A model to test. recurrent: whether the state carries anything a later logit reads
    (RMT's write-only memory does not; nor does a CRT whose memory is never read and whose
    positions restart each segment)."""
    name = arch + "".join(f",{k}={v}" for k, v in kw.items())
    return pytest.param(arch, kw, recurrent, id=name)


CASES = [
    case("crt"),
    case("crt", memory_cell="ncgru"),
    case("crt", memory_cell="mingru", position_cell="mingru"),
    case("crt", positions="sinusoidal"),
    case("crt", positions="learned"),
    case("crt", positions="rotary"),
    case("crt", positions="none"),
    case("crt", carry_rpe=False),
    case("crt", memory_init="zeros", d_memory=48, tie_weights=False),
    case("crt", memory_reads="last_token"),
    case("crt", memory_position="append", memory_reads="memory_token"),  # the memory is never read, but the positional GRU's state is
    case("crt", recurrent=False, memory_position="append", memory_reads="memory_token", positions="learned"),
    case("crt", recurrent=False, memory_position="none", positions="learned"),
    case("transformer", recurrent=False),
    case("transformer", recurrent=False, positions="rotary"),
    case("transformer_xl"),
    case("transformer_xl", same_length=True),
    case("transformer_xl", clamp_len=3),
    case("transformer_xl", mem_len=3),
    case("transformer_xl", mem_len=9, eval_mem_len=4),
    case("rmt"),
    case("rmt", rmt_placement="read"),
    case("rmt", recurrent=False, rmt_placement="write"),
    case("rmt", positions="rotary"),
    case("rmt", positions="sinusoidal", mem_tokens=1),
    case("armt"),
    case("armt", assoc_heads=2),
    case("armt", assoc_heads=2, assoc_nu=1),
    case("armt", positions="rotary"),
    case("armt", mem_tokens=1, positions="learned"),
    case("armt", assoc_correction=False, assoc_floor=False),
]
DEFAULTS = [c for c in CASES if not c.values[1]]  # each arch with its default options


def tokens(B: int = 2, N: int = 3 * L, seed: int = 1) -> torch.Tensor:
    return torch.randint(V, (B, N), generator=torch.Generator().manual_seed(seed))


def segment_path(model, x: torch.Tensor, state=None, segment_len: int = L) -> tuple[torch.Tensor, tuple]:
    """Logits [B, N, V] of whole segments with the state carried, and the state after them."""
    state = model.init_state(x.shape[0], evaluation=True) if state is None else state
    out = []
    for _, logits, state in iter_segments(model, x, state, segment_len):  # noqa: B007 (the last state is returned)
        out.append(logits)
    return torch.cat(out, dim=1), state


@pytest.mark.parametrize("arch,kw,recurrent", CASES)
@torch.no_grad()
def test_causality(arch, kw, recurrent, tiny_lm):
    """Changing token t changes no logit before t, within a segment and across segments, and changes its own."""
    model = tiny_lm(arch, **kw)
    x = tokens()
    base, _ = segment_path(model, x)
    for t in (3, L + 2, 2 * L):  # inside segment 1, inside segment 2, the first token of segment 3
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % V
        out, _ = segment_path(model, x2)
        assert torch.equal(out[:, :t], base[:, :t]), f"logits before {t} changed"
        assert not torch.allclose(out[:, t], base[:, t]), "the changed token must change its own logits"


@pytest.mark.parametrize("arch,kw,recurrent", CASES)
@torch.no_grad()
def test_recurrence(arch, kw, recurrent, tiny_lm):
    """Changing segment 1 changes the logits of segment 3 exactly when the state carries something read."""
    model = tiny_lm(arch, **kw)
    x = tokens()
    x2 = x.clone()
    x2[:, :L] = (x2[:, :L] + 1) % V
    late = (segment_path(model, x)[0] - segment_path(model, x2)[0])[:, 2 * L :].abs().max()
    assert late > 1e-4 if recurrent else late == 0


@pytest.mark.parametrize("arch,kw,recurrent", CASES)
@torch.no_grad()
def test_no_hidden_state_between_calls(arch, kw, recurrent, tiny_lm):
    """The same (tokens, state) gives the same logits and state, whatever ran in between."""
    model = tiny_lm(arch, **kw)
    x, state = tokens(N=L), model.init_state(2)
    first, after = model(x, state)
    model(tokens(N=L, seed=9), after)  # another call in between
    again, after2 = model(x, state)
    assert torch.equal(first, again) and all(torch.equal(a, b) for a, b in zip(after, after2, strict=True))


@pytest.mark.parametrize("arch,kw,recurrent", CASES)
@torch.no_grad()
def test_reset_rows_starts_a_new_document_in_one_row(arch, kw, recurrent, tiny_lm):
    model = tiny_lm(arch, **kw)
    x = tokens(N=2 * L)
    _, state = model(x[:, :L], model.init_state(2))
    out, _ = model(x[:, L:], reset_rows(state, model.init_state(2), torch.tensor([False, True])))
    carried, _ = model(x[:1, L:], model(x[:1, :L], model.init_state(1))[1])
    fresh, _ = model(x[1:, L:], model.init_state(1))
    torch.testing.assert_close(out[:1], carried, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1:], fresh, rtol=0, atol=1e-6)
    if recurrent:  # carrying and restarting must differ, else the check above says nothing
        assert not torch.allclose(carried, model(x[:1, L:], model.init_state(1))[0])


@pytest.mark.parametrize("arch,kw,recurrent", CASES)
@torch.no_grad()
def test_bf16_autocast_keeps_the_state_dtype(arch, kw, recurrent, tiny_lm):
    """Under bf16 autocast the logits are finite and near fp32's, and the state stays in the dtype init_state gave it."""
    model = tiny_lm(arch, **kw)
    x = tokens()
    fp32, _ = segment_path(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, state = segment_path(model, x)
    assert all(t.dtype == s.dtype for t, s in zip(state, model.init_state(2), strict=True))
    assert torch.isfinite(bf16.float()).all()
    # bf16 keeps 8 bits of mantissa; logits of these tiny models are O(1), so 0.1 absolute is loose but not vacuous
    assert (bf16.float() - fp32).abs().max() < 0.1


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("arch,kw,recurrent", [*DEFAULTS, case("crt", memory_cell="ncgru"), case("crt", memory_cell="mingru", position_cell="mingru")])
def test_gradients_reach_exactly_K_segments_back(arch, kw, recurrent, K, tiny_lm):
    """The loss of the last segment back-propagates into exactly its last K segments through the
    state. Transformer-XL stops gradients at its memory by design (as the original), so only the
    last segment; the segment Transformer carries nothing."""
    model = tiny_lm(arch, **kw).train()
    captured = []

    def keep(module, inputs, out):  # returns None, so the output is left as it is
        out.retain_grad()
        captured.append(out)

    hook = model.tokens.embed.register_forward_hook(keep)
    *_, (_, logits, _) = list(iter_segments(model, tokens(N=2 * K * L), model.init_state(2), L, bptt_segments=K))
    logits.sum().backward()
    hook.remove()
    reached = [e.grad is not None and e.grad.abs().sum().item() > 0 for e in captured]
    back = K if recurrent and arch != "transformer_xl" else 1
    assert reached == [False] * (2 * K - back) + [True] * back


@pytest.mark.parametrize("arch,kw,recurrent", CASES)
def test_stream_equals_the_segment_path(arch, kw, recurrent, tiny_lm):
    """Token by token (three boundaries, a partial last segment, two rows) the stream's logits
    equal the segment path's. Dropout is set, and off in eval mode."""
    model = tiny_lm(arch, dropout=0.1, emb_dropout=0.1, **kw)
    x = tokens(N=17, seed=5)
    stream = open_stream(model, batch_size=2)
    streamed = torch.stack([stream.feed(x[:, t]) for t in range(x.shape[1])], dim=1)  # [B, N, V]
    with torch.no_grad():
        torch.testing.assert_close(streamed, segment_path(model, x)[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,kw,recurrent", DEFAULTS)
def test_exported_step_loops_like_pytorch(tmp_path, arch, kw, recurrent, tiny_lm):
    """The torch.export program of one segment step, looped over six segments with its own
    state, gives the model's logits and states."""
    from safetensors.numpy import load_file

    from crt.infer.export import export

    model = tiny_lm(arch, **kw)
    r = export(model, "pt2", tmp_path / "step.pt2", int8=False)
    assert r["int8_path"] is None and r["max_difference"] <= 1e-4
    program = torch.export.load(str(tmp_path / "step.pt2")).module()
    saved = load_file(str(r["state_path"]))
    state = [torch.from_numpy(saved[f"state_in_{i}"]) for i in range(len(saved))]
    reference = model.init_state(1, evaluation=True)
    with torch.no_grad():
        for i in range(6):
            x = torch.randint(V, (1, L), generator=torch.Generator().manual_seed(i))
            logits, reference = model(x, reference)
            out = program(x, *state)
            torch.testing.assert_close(out[0], logits, atol=1e-5, rtol=1e-5)
            for a, b in zip(out[1:], torch.utils._pytree.tree_flatten(reference)[0], strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            state = list(out[1:])
