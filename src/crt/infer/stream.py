"""Token-by-token inference over an unbounded stream: the state a model carries, one token at a time.

`open_stream(model)` returns an object with `feed(tokens [B]) -> logits [B, V]`: the logits
after each token, equal to those of running `model(tokens, state)` over whole segments with the
state carried (tests/test_stream.py), whatever the number of tokens fed so far.

CRT (`CRTStream`) keeps, besides its state (memory m and positional state r), the keys and
values of the current segment's earlier tokens in every layer (`KVCache`), so one token costs
one position through the blocks, one step of the positional GRU and one step of the memory RNN:

    segment opens:   u_0 = W_m m_{n-1} + b_m          the memory token, fed like a token
    each token:      u_t = e_t (+ GRU_pos step)        attends to u_0..u_t via the cache
                     m  <- RNN step(h_t, m)            the memory reads h_t as it comes
    after L tokens:  m_n = m, r_n = r; the caches empty and the next segment opens

Memory use is one segment's keys and values plus the state: independent of the stream's length.
RMT (`RMTStream`) streams the same way: its k read-memory tokens open the segment, its k write
tokens close it and their outputs are the next memory. Transformer-XL (`XLStream`) caches what
its memory caches, every layer's input, for the segment's tokens so far: a new token attends to
[memory ; those] and only its own layer inputs are computed (the keys and values of the cached
inputs are re-projected, as XL does for its memory). The others (`SegmentStream`: Transformer,
ARMT) re-run the current segment's tokens from the state at its start for every token: exact,
but O(L) positions per token instead of one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from crt.layers import KVCache
from crt.models.crt import CRT, CRTState
from crt.models.rmt import RMT, RMTState
from crt.models.transformer_xl import TransformerXL, XLState


class _CachedStream:
    """Inputs through a model's positions and blocks, the segment's keys and values cached.

    model: the model (put in eval mode). batch_size: parallel streams B. Segments are
    cfg.eval_segment_len (or segment_len) tokens long, as in `crt eval`. Subclasses open a
    segment in _open() (calling _start_segment()); `absolute_positions` names the model's
    AbsolutePositions module (positions offset by what the segment has seen).
    """

    absolute_positions = "positions"

    def __init__(self, model: nn.Module, batch_size: int = 1):
        self.model, self.cfg = model.eval(), model.cfg
        self.segment_len = self.cfg.eval_segment_len or self.cfg.segment_len
        self.state = model.init_state(batch_size, evaluation=True)
        self._open()

    def _start_segment(self) -> None:
        self.caches = [KVCache() for _ in self.model.blocks]
        self.fed, self.offset = 0, 0  # tokens of this segment; positions used (memory tokens included)

    def _positions(self, u: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return getattr(self.model, self.absolute_positions)(u, offset=self.offset)

    def _advance(self, u: torch.Tensor) -> torch.Tensor:
        """Inputs u [B, T, D] (after the segment's earlier ones) -> final-layer outputs [B, T, D]."""
        m = self.model
        u, attn_kwargs = self._positions(u)
        self.offset += u.shape[1]
        h = m.drop(u)  # [B, T, D]
        for block, cache in zip(m.blocks, self.caches):
            h = block(h, cache=cache, **attn_kwargs)  # [B, T, D]
        return m.ln_f(h)  # [B, T, D]


class CRTStream(_CachedStream):
    """CRT one token at a time with the segment's keys and values reused.

    model: a CRT (put in eval mode: dropout would make the stream differ from the segment path).
    batch_size: parallel streams B.
    Segments are cfg.eval_segment_len (or segment_len) tokens long, as in `crt eval`.
    """

    absolute_positions = "absolute_positions"

    @torch.no_grad()
    def _open(self) -> None:
        """Start a segment from self.state: empty caches, the memory token first (prepend)."""
        cfg, state = self.cfg, self.state
        self._start_segment()
        self.read = state.memory  # [B, d_m] the memory RNN's hidden state as it reads the segment
        self.r = state.positions if cfg.carry_rpe else torch.zeros_like(state.positions)  # [B, D]
        self.last_h = None
        if cfg.memory_position == "prepend":
            self._advance(self._memory_token())

    def _memory_token(self) -> torch.Tensor:
        return self.model.memory_in(self.state.memory).unsqueeze(1)  # [B, 1, D]

    def _positions(self, u: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.cfg.position_encoding == "recurrent":
            p, self.r = self.model.recurrent_positions(u, self.r)  # p: [B, T, D]; r: [B, D]
            return u + p, {}
        return super()._positions(u)

    def _close(self) -> None:
        """The segment is full: m_n from what the memory RNN read, r_n, then the next segment."""
        cfg, m, state = self.cfg, self.model, self.state
        h_memory = self._advance(self._memory_token()) if cfg.memory_position == "append" else None  # [B, 1, D]
        if cfg.memory_reads == "tokens":
            memory = self.read  # [B, d_m] already stepped over h_1..h_L
        else:
            reads = h_memory if cfg.memory_reads == "memory_token" else self.last_h  # [B, 1, D]
            memory = m.memory_rnn(reads, state.memory)[1]  # [B, d_m]
        carry = cfg.position_encoding == "recurrent" and cfg.carry_rpe
        self.state = CRTState(memory.to(state.memory.dtype), self.r.to(state.positions.dtype) if carry else state.positions)
        self._open()

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> logits [B, V] for the next token."""
        m = self.model
        h = self._advance(m.tokens(tokens.view(-1, 1)))  # [B, 1, D]
        if self.cfg.memory_reads == "tokens":
            self.read = m.memory_rnn(h, self.read.to(h.dtype))[1]  # [B, d_m]  m <- RNN step(h_t, m)
        self.last_h = h
        self.fed += 1
        if self.fed == self.segment_len:
            self._close()
        return m.tokens.unembed(h)[:, 0]  # [B, V]


class RMTStream(_CachedStream):
    """RMT one token at a time: the k read-memory tokens open a segment (placements read_write,
    read), tokens follow one by one with their keys and values cached, and after L tokens the k
    write tokens (the memory again, or the learned write slots) are fed; their outputs are the
    next memory.

    model: an RMT (put in eval mode). batch_size: parallel streams B.
    """

    @torch.no_grad()
    def _open(self) -> None:
        self._start_segment()
        if self.cfg.rmt_placement != "write":
            self._advance(self.state.memory)  # [B, k, D] the read copy

    def _close(self) -> None:
        memory = self.state.memory  # [B, k, D]
        write = self.model.write_slots.expand(memory.shape[0], -1, -1) if self.cfg.rmt_placement == "read" else memory
        h = self._advance(write.to(memory.dtype))  # [B, k, D]
        self.state = RMTState(h.to(memory.dtype))
        self._open()

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> logits [B, V] for the next token."""
        m = self.model
        h = self._advance(m.tokens(tokens.view(-1, 1)))  # [B, 1, D]
        self.fed += 1
        if self.fed == self.segment_len:
            self._close()
        return m.tokens.unembed(h)[:, 0]  # [B, V]


class XLStream:
    """Transformer-XL one token at a time: the segment's layer inputs so far extend the memory.

    model: a TransformerXL (put in eval mode). batch_size: parallel streams B.
    """

    def __init__(self, model: TransformerXL, batch_size: int = 1):
        self.model, self.cfg = model.eval(), model.cfg
        self.segment_len = self.cfg.eval_segment_len or self.cfg.segment_len
        self.state = model.init_state(batch_size, evaluation=True)
        self.hids: list[torch.Tensor] = []  # each [B, L, 1, D]: one token's layer inputs

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> logits [B, V] for the next token."""
        state, M, t = self.state, self.state.mems.shape[2], len(self.hids)
        mems = torch.cat([state.mems, *self.hids], dim=2)  # [B, L, M + t, D]
        valid = torch.cat([state.valid, state.valid.new_ones(state.valid.shape[0], t + 1)], dim=1)  # [B, M + t + 1]
        allowed = valid[:, None, :]  # [B, 1, M + t + 1]  the new token is last: every earlier key is causal
        if self.cfg.same_length:  # as in the segment: only the last M keys
            allowed = allowed & (torch.arange(M + t + 1, device=valid.device) > t)
        logits, hids = self.model._run(tokens.view(-1, 1), mems, allowed)  # [B, 1, V], [B, L, 1, D]
        self.hids.append(hids.to(state.mems.dtype))
        if len(self.hids) == self.segment_len:  # as TransformerXL.forward: keep the last M
            T = self.segment_len
            mems = torch.cat([state.mems, *self.hids], dim=2)[:, :, T:]  # [B, L, M, D]
            valid = torch.cat([state.valid, state.valid.new_ones(state.valid.shape[0], T)], dim=1)[:, T:]  # [B, M]
            self.state, self.hids = XLState(mems, valid), []
        return logits[:, 0]  # [B, V]


class SegmentStream:
    """Any model with `logits, state = model(tokens, state)`: the current segment's tokens so
    far are re-run from the state at its start, and the state moves on after every full segment.

    model: any crt language model (Transformer, Transformer-XL, RMT, ARMT; CRT too).
    batch_size: parallel streams B.
    """

    def __init__(self, model: nn.Module, batch_size: int = 1):
        self.model, self.cfg = model.eval(), model.cfg
        self.segment_len = self.cfg.eval_segment_len or self.cfg.segment_len
        self.state = model.init_state(batch_size, evaluation=True)
        self.segment: list[torch.Tensor] = []  # the current segment's tokens, each [B]

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> logits [B, V] for the next token."""
        self.segment.append(tokens.view(-1))
        logits, state = self.model(torch.stack(self.segment, dim=1), self.state)  # [B, t, V]
        if len(self.segment) == self.segment_len:
            self.state, self.segment = state, []
        return logits[:, -1]  # [B, V]


def open_stream(model: nn.Module, batch_size: int = 1) -> CRTStream | RMTStream | XLStream | SegmentStream:
    """The incremental stream for CRT, RMT and Transformer-XL, the re-running one for the others."""
    for kind, stream in ((CRT, CRTStream), (RMT, RMTStream), (TransformerXL, XLStream)):
        if isinstance(model, kind):
            return stream(model, batch_size)
    return SegmentStream(model, batch_size)
