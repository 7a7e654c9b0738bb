"""Token-by-token inference over an unbounded stream: the state a model carries, one token at a time.

`open_stream(model)` returns an object with `feed(tokens [B]) -> logits [B, V]`: the logits
after each token, equal to those of running `model(tokens, state)` over whole segments with the
state carried (tests/test_stream.py), whatever the number of tokens fed so far. Every model
streams incrementally: a token costs one position through the layers, never a re-run of its
segment.

The segment Transformer (`TransformerStream`, the base of the others) keeps the keys and values
of the current segment's earlier tokens in every layer (`KVCache`); after L tokens the caches
empty and the next segment starts. The memory models add what they carry:

CRT (`CRTStream`): memory m and positional state r.

    segment opens:   u_0 = W_m m_{n-1} + b_m          the memory token, fed like a token
    each token:      u_t = e_t (+ GRU_pos step)        attends to u_0..u_t via the cache
                     m  <- RNN step(h_t, m)            the memory reads h_t as it comes
    after L tokens:  m_n = m, r_n = r; the caches empty and the next segment opens

RMT (`RMTStream`): its k read-memory tokens open the segment, its k write tokens close it and
their outputs are the next memory. ARMT (`ARMTStream`): every position reads each layer's
associative memory of the previous segment; after L tokens the k memory tokens are fed and
their layer outputs write the memories. Transformer-XL (`XLStream`) caches what its memory
caches, every layer's input, for the segment's tokens so far: a new token attends to
[memory ; those] and only its own layer inputs are computed (the keys and values of the cached
inputs are re-projected, as XL does for its memory).

Memory use is one segment's keys and values (XL: its memory plus one segment) and the state:
independent of the stream's length.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from crt.errors import CRTError
from crt.layers import KVCache
from crt.models.armt import ARMT, ARMTState
from crt.models.crt import CRT, CRTState
from crt.models.rmt import RMT, RMTState
from crt.models.transformer import Transformer
from crt.models.transformer_xl import TransformerXL, XLState


class TransformerStream:
    """The segment Transformer one token at a time, and the base of the memory models' streams:
    the inputs go through the model's positions and blocks with the segment's keys and values
    cached, and after L tokens the segment closes.

    model: the model (put in eval mode: dropout would make the stream differ from the segment
    path). batch_size: parallel streams B. Segments are cfg.eval_segment_len (or segment_len)
    tokens long, as in `crt eval`. A subclass opens a segment in _open() (calling
    _start_segment()), closes it in _close(), and may read each token's output in _read();
    `absolute_positions` names the model's AbsolutePositions module (positions are offset by
    what the segment has seen).
    """

    absolute_positions = "positions"

    def __init__(self, model: nn.Module, batch_size: int = 1):
        self.model, self.cfg = model.eval(), model.cfg
        self.segment_len = self.cfg.eval_segment_len or self.cfg.segment_len
        self.state = model.init_state(batch_size, evaluation=True)
        self._open()

    def _start_segment(self) -> None:
        self.caches = [KVCache() for _ in range(self.cfg.n_layer)]
        self.fed, self.offset = 0, 0  # tokens of this segment; positions used (memory tokens included)

    def _open(self) -> None:
        self._start_segment()  # the Transformer carries nothing across segments

    def _close(self) -> None:
        self._open()

    def _read(self, h: torch.Tensor) -> None:
        """A token's final output h [B, 1, D], for a model whose memory reads it as it comes."""

    def _positions(self, u: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return getattr(self.model, self.absolute_positions)(u, offset=self.offset)

    def _layers(self, h: torch.Tensor, attn_kwargs: dict) -> torch.Tensor:
        for block, cache in zip(self.model.blocks, self.caches):
            h = block(h, cache=cache, **attn_kwargs)  # [B, T, D]
        return h

    def _advance(self, u: torch.Tensor) -> torch.Tensor:
        """Inputs u [B, T, D] (after the segment's earlier ones) -> final-layer outputs [B, T, D]."""
        u, attn_kwargs = self._positions(u)
        self.offset += u.shape[1]
        return self.model.ln_f(self._layers(self.model.drop(u), attn_kwargs))  # [B, T, D]

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> logits [B, V] for the next token."""
        m = self.model
        h = self._advance(m.tokens(tokens.view(-1, 1)))  # [B, 1, D]
        self._read(h)
        self.fed += 1
        if self.fed == self.segment_len:
            self._close()
        return m.tokens.unembed(h)[:, 0]  # [B, V]


class CRTStream(TransformerStream):
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

    def _read(self, h: torch.Tensor) -> None:
        if self.cfg.memory_reads == "tokens":
            self.read = self.model.memory_rnn(h, self.read.to(h.dtype))[1]  # [B, d_m]  m <- RNN step(h_t, m)
        self.last_h = h


class RMTStream(TransformerStream):
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


class ARMTStream(TransformerStream):
    """ARMT one token at a time: in every layer, each position first reads that layer's
    associative memory (A_l, z_l) of the previous segment, then goes through the block with the
    segment's keys and values cached. After L tokens the k memory tokens are fed the same way
    and their outputs write each layer's memory (the delta rule of `AssociativeMemory.write`).

    model: an ARMT (put in eval mode). batch_size: parallel streams B.
    """

    def _layers(self, h: torch.Tensor, attn_kwargs: dict) -> torch.Tensor:
        A, z = self.state  # [B, L, H, d_phi, d_v], [B, L, H, d_phi]
        writing = self.fed == self.segment_len  # the segment is full: h holds the memory tokens
        As, zs = [], []
        for l, (layer, cache) in enumerate(zip(self.model.layers, self.caches)):
            h, A_l, z_l = layer(h, A[:, l].to(h.dtype), z[:, l].to(h.dtype), write=writing, cache=cache, **attn_kwargs)  # [B, T, D]
            As.append(A_l)
            zs.append(z_l)
        if writing:
            self.state = ARMTState(torch.stack(As, dim=1).to(A.dtype), torch.stack(zs, dim=1).to(z.dtype))
        return h

    def _close(self) -> None:
        memory_tokens = self.model.memory_tokens.expand(self.state.A.shape[0], -1, -1)  # [B, k, D]
        self._advance(memory_tokens.to(self.state.A.dtype))  # writes self.state
        self._open()


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


STREAMS = {CRT: CRTStream, RMT: RMTStream, ARMT: ARMTStream, TransformerXL: XLStream, Transformer: TransformerStream}


def open_stream(model: nn.Module, batch_size: int = 1) -> TransformerStream | XLStream:
    """The incremental stream of a crt language model (CRT, Transformer, Transformer-XL, RMT, ARMT)."""
    for kind, stream in STREAMS.items():
        if isinstance(model, kind):
            return stream(model, batch_size)
    raise CRTError(f"{type(model).__name__} has no token-by-token stream; stream a language model (crt, transformer, transformer_xl, rmt, armt)")
