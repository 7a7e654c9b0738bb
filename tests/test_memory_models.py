"""RMT, ARMT and Diagonal Batching: SPEC §7 properties, the associative memory by hand, and
the diagonal schedule's equality with the sequential ARMT."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from crt.errors import CRTError
from crt.layers import AssociativeMemory
from crt.models import build_model
from crt.models.diagonal import DiagonalARMT
from crt.models.rmt import RMTState
from crt.state import iter_segments
from crt.train.evaluate import evaluate

V, L = 37, 8
TINY = dict(vocab_size=V, segment_len=L)  # the conftest tiny_config / tiny_lm fields of this module


def tokens(B=2, N=3 * L, seed=1):
    return torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(seed))


def stream(model, x, segment_len=L):
    state, out = model.init_state(x.shape[0]), []
    for _, logits, state in iter_segments(model, x, state, segment_len):  # noqa: B007 (the last state is returned)
        out.append(logits)
    return torch.cat(out, dim=1), state  # [B, N, V]


def test_rmt_write_only_memory_never_reaches_a_prediction(tiny_lm):
    """placement=write puts the memory after the segment: it is written, but no token attends to it."""
    model = tiny_lm("rmt", rmt_placement="write")
    x = tokens()
    x2 = x.clone()
    x2[:, :L] = (x2[:, :L] + 1) % V
    (a, sa), (b, sb) = stream(model, x), stream(model, x2)
    assert torch.equal(a[:, L:], b[:, L:])
    assert not torch.allclose(sa.memory, sb.memory), "the memory is still written"


def test_armt_with_zero_value_weights_is_a_segment_transformer(tiny_config):
    """At initialisation (W_v = 0) ARMT stores nothing, so segment 1 cannot change segment 3."""
    torch.manual_seed(0)
    model = build_model(tiny_config("armt")).eval()  # not tiny_lm: that gives W_v random values
    x = tokens()
    x2 = x.clone()
    x2[:, :L] = (x2[:, :L] + 1) % V
    assert torch.equal(stream(model, x)[0][:, 2 * L :], stream(model, x2)[0][:, 2 * L :])


def test_zero_state_semantics(tiny_lm):
    """ARMT's initial state is the all-zero (empty) memory; RMT's is the learned M_0 in every row,
    and passing it explicitly is the same call. Both documented in the models' docstrings."""
    armt = tiny_lm("armt")
    s = armt.init_state(3)
    assert s.A.shape[:2] == (3, 2) and torch.count_nonzero(s.A) == 0 and torch.count_nonzero(s.z) == 0
    rmt = tiny_lm("rmt")
    x = tokens(N=L)
    explicit = RMTState(rmt.memory_init.detach().clone().expand(2, -1, -1))
    assert torch.equal(rmt(x, rmt.init_state(2))[0], rmt(x, explicit)[0])


@pytest.mark.parametrize("arch", ["rmt", "armt"])
def test_chunked_evaluation_equals_the_stream(arch, tiny_lm):
    """`evaluate` (batchified, state carried over every segment) scores exactly the stream's NLL."""
    model = tiny_lm(arch)
    data = tokens(B=1, N=3 * L + 4).flatten()  # the last segment is short
    logits, _ = stream(model, data[None, :-1])
    nll = F.cross_entropy(logits[0], data[1:])
    result = evaluate(model, data, batch_size=1)
    assert result["tokens"] == data.numel() - 1
    assert math.isclose(result["loss"], nll.item(), rel_tol=1e-6)


def test_config_rejects_bad_memory_settings(tiny_config):
    with pytest.raises(CRTError, match="mem_tokens"):
        tiny_config("rmt", mem_tokens=0).validate()
    with pytest.raises(CRTError, match="rmt_placement"):
        tiny_config("rmt", rmt_placement="both").validate()
    with pytest.raises(CRTError, match="assoc_heads"):
        tiny_config("armt", assoc_heads=3).validate()


# --- the associative memory on cases small enough to compute by hand ---


def hand_memory(correction=True, floor=True):
    """d_model = d_key = 2, one head, DPFP-1, W_q = W_k = I, W_v = diag(2, 3), write gate ~ 1.

    DPFP-1 of [a, b] is [r(a) r(-b), r(b) r(a), r(-a) r(b), r(-b) r(-a)] (r = relu), so the four
    sign patterns [+1, -1], [+1, +1], [-1, +1], [-1, -1] map to the unit vectors e0..e3: four
    orthogonal keys.
    """
    mem = AssociativeMemory(d_model=2, d_key=2, n_head=1, nu=1, correction=correction, floor=floor)
    with torch.no_grad():
        mem.query.weight.copy_(torch.eye(2))
        mem.key.weight.copy_(torch.eye(2))
        mem.value.weight.copy_(torch.diag(torch.tensor([2.0, 3.0])))
        mem.gate.weight.zero_()
        mem.gate.bias.fill_(30.0)  # sigmoid(30) = 1 - 9e-14
    return mem


def vec(*xs):
    return torch.tensor([[xs]], dtype=torch.float32)  # [1, 1, 2]


def test_dpfp_maps_sign_patterns_to_orthogonal_keys():
    phi = F.normalize(torch.stack([torch.tensor(p) for p in ([1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0])]), dim=-1)
    from crt.layers.associative import dpfp

    assert torch.allclose(F.normalize(dpfp(phi, 1), dim=-1), torch.eye(4))


def test_empty_memory_reads_zero():
    mem = hand_memory()
    A, z = mem.empty(1)
    assert torch.equal(mem.read(torch.randn(1, 5, 2), A, z), torch.zeros(1, 5, 2))


def test_a_stored_key_returns_its_value_and_others_return_nothing():
    mem = hand_memory()
    key = vec(1.0, 1.0)  # -> e1
    A, z = mem.write(key, *mem.empty(1))
    value = torch.tensor([2.0, 3.0])  # W_v key
    torch.testing.assert_close(mem.read(key, A, z)[0, 0], value, rtol=0, atol=1e-4)  # A^T e1 / (z.e1 + eps)
    assert torch.equal(mem.read(vec(1.0, -1.0), A, z), torch.zeros(1, 1, 2))  # e0 was never written
    # two keys at once: each returns its own value
    A, z = mem.write(torch.cat([vec(1.0, 1.0), vec(-1.0, 1.0)], dim=1), *mem.empty(1))
    torch.testing.assert_close(mem.read(vec(-1.0, 1.0), A, z)[0, 0], torch.tensor([-2.0, 3.0]), rtol=0, atol=1e-4)
    torch.testing.assert_close(mem.read(vec(1.0, 1.0), A, z)[0, 0], value, rtol=0, atol=1e-4)


def test_rewriting_a_key_replaces_its_value():
    """The delta rule writes v - v_old, and with the correction the key's second write adds
    nothing to z: the read returns the new value, not the mean of old and new."""
    mem = hand_memory()
    A, z = mem.write(vec(1.0, 1.0), *mem.empty(1))  # e1 -> (2, 3)
    A, z = mem.write(vec(2.0, 2.0), A, z)  # the same key direction (e1), value (4, 6)
    torch.testing.assert_close(z[0, 0], torch.tensor([0.0, 1.0, 0.0, 0.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(mem.read(vec(1.0, 1.0), A, z)[0, 0], torch.tensor([4.0, 6.0]), rtol=0, atol=1e-3)
    # without the correction z counts the key twice and the read halves the value
    plain = hand_memory(correction=False)
    A, z = plain.write(vec(1.0, 1.0), *plain.empty(1))
    A, z = plain.write(vec(2.0, 2.0), A, z)
    torch.testing.assert_close(plain.read(vec(1.0, 1.0), A, z)[0, 0], torch.tensor([2.0, 3.0]), rtol=0, atol=1e-3)


def test_a_weak_match_stays_weak_with_the_floor():
    """A query whose features overlap the stored key by 0.1: the floored read returns 0.1 of the
    value; the original normaliser (z.q + eps) rescales it to (almost) the whole value."""
    phi = F.normalize(torch.tensor([[[[1.0, 0.1, 0.0, 0.0]]]]), dim=-1)  # [1, H, 1, d_phi]: z.phi = 0.1 / |.|
    overlap = phi[0, 0, 0, 1].item()
    value = torch.tensor([2.0, 3.0])
    for floor, expected in ((True, overlap * value), (False, value * overlap / (overlap + 1e-5))):
        mem = hand_memory(floor=floor)
        A, z = mem.write(vec(1.0, 1.0), *mem.empty(1))  # e1 -> (2, 3)
        out, zphi = mem._lookup(A, z, phi)
        torch.testing.assert_close(zphi[0, 0, 0], torch.tensor(overlap), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[0, 0, 0], expected, rtol=1e-4, atol=1e-5)


# --- Diagonal Batching equals the sequential ARMT ---


@pytest.mark.parametrize(
    "n_layer,segments,B,extra",
    [(4, 2, 2, 0), (4, 4, 1, 0), (2, 7, 3, 0), (3, 9, 2, 5), (1, 5, 2, 0), (4, 1, 2, 3), (4, 0, 2, 5)],
)
def test_diagonal_batching_equals_sequential(n_layer, segments, B, extra, tiny_lm):
    """Several S and L (S < L, S = L, S > L, L = 1), batch > 1, a shorter last segment: the
    logits and the final memory of every layer equal the sequential ARMT's in fp32."""
    model = tiny_lm("armt", n_layer=n_layer, mem_tokens=3)
    x = tokens(B=B, N=segments * L + extra, seed=segments)
    seq, seq_state = stream(model, x)
    diag, diag_state = DiagonalARMT(model)(x, model.init_state(B))
    assert diag.shape == seq.shape
    torch.testing.assert_close(diag, seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diag_state.A, seq_state.A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diag_state.z, seq_state.z, rtol=1e-5, atol=1e-5)
    assert seq_state.A.abs().max() > 0.01, "the memory must hold something for the comparison to mean anything"


def test_diagonal_batching_continues_from_a_given_state_with_rotary_positions(tiny_lm):
    model = tiny_lm("armt", n_layer=3, positions="rotary")
    x = tokens(B=2, N=10 * L)
    _, state = stream(model, x[:, : 2 * L])
    seq = torch.cat([lg for _, lg, _ in iter_segments(model, x[:, 2 * L :], state, L)], dim=1)
    diag, _ = DiagonalARMT(model)(x[:, 2 * L :], state)
    torch.testing.assert_close(diag, seq, rtol=1e-5, atol=1e-5)


def test_diagonal_batching_refuses_other_models_and_training_mode(tiny_config):
    with pytest.raises(CRTError, match="ARMT"):
        DiagonalARMT(build_model(tiny_config("rmt")))
    model = build_model(tiny_config("armt"))
    model.train()
    with pytest.raises(CRTError, match="eval"):
        DiagonalARMT(model)(tokens(), model.init_state(2))


class CountLinear(torch.overrides.TorchFunctionMode):
    """Counts calls of F.linear made from Python (under vmap a call covers every mapped layer)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.linear
        return func(*args, **(kwargs or {}))


def test_diagonal_step_batches_the_layers(tiny_lm):
    """A grouped step makes one linear call per weight for all its active layers, not one per
    layer: a step over 4 layers makes as many calls as a step over 1."""
    calls = {}
    for n_layer in (1, 4):
        model = tiny_lm("armt", n_layer=n_layer)
        h, attn_kwargs = model.embed(tokens(B=1, N=L))  # [1, T+k, D]
        state = model.init_state(1)
        with CountLinear() as count:
            DiagonalARMT(model)._cells(0, n_layer - 1, h.expand(n_layer, -1, -1, -1), state.A.movedim(1, 0), state.z.movedim(1, 0), attn_kwargs)
        calls[n_layer] = count.calls
    assert calls[4] == calls[1] > 0
