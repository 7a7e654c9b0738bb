"""Compact Recurrent Transformer (Mucllari, Daniels, Zhang, Ye 2025; arXiv 2505.00929).

A shallow transformer reads one short segment at a time. Between segments, one memory
vector m carries what the model needs from the past:

    segment n:   u   = [W_m m_{n-1} + b_m ;  e_1 .. e_L]        memory token, then the tokens
                 u  += GRU_pos(u, r_{n-1})                      recurrent positions; r_n = last hidden
                 h   = Blocks(u)   (causal, over L + 1 tokens)
                 y_t = softmax(E h_t)                           tied LM head, t = 1..L
                 m_n = RNN(h_1 .. h_L; m_{n-1})                 GRU or NCGRU, last hidden state

Per token CRT adds two small RNN steps and one attended token to a plain segment transformer,
where Transformer-XL attends to M cached states in every layer. Each (choice) of SPEC §3 is
a `ModelConfig` field; `CRTCore.check_options` rejects combinations that cannot work.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from crt.config import ModelConfig
from crt.layers import (
    GRU,
    NCGRU,
    AbsolutePositions,
    MinGRU,
    SegmentCache,
    SegmentTrunk,
    TokenEmbedding,
    blocks_flops,
    gru_flops,
    init_weights,
    mingru_flops,
    recurrent_positions,
)


class CRTState(NamedTuple):
    memory: torch.Tensor  # [B, d_m]  m_{n-1}, the persistent memory vector
    positions: torch.Tensor  # [B, D]  r_{n-1}, hidden state of the recurrent positional GRU (zeros if unused)


class CRTCore(SegmentTrunk):
    """CRT over input vectors: memory token, positions, the shallow transformer and the memory
    RNN. The language model (`CRT`) feeds it token embeddings, CR-ViT frame vectors. Every
    constructor choice comes from `cfg` (see `ModelConfig`):

    d_model, n_layer, n_head, d_ff, dropout, emb_dropout, attn_dropout: the shallow transformer.
    segment_len / eval_segment_len: the longest segment it is fed (sizes learned positions).
    memory_position: prepend (every token attends to the memory token), append (the token
        follows the segment: it sees every token but none sees it, so the memory is written
        but never read; an ablation of the read path) or none (no memory token).
    memory_init: m_0 learned (starts at zero) or fixed zeros. Both still place a memory token;
        with zeros it is W_m 0 + b_m = b_m. Only memory_position=none removes it.
    memory_cell: gru | ncgru | mingru (input-only gates: no sequential matmul); d_memory: its
        width d_m (0: d_model).
    memory_reads: what the memory RNN reads: all segment outputs h_1..h_L, the memory token's
        output (needs memory_position=append), or the last token's output only.
    positions: recurrent (CRT's GRU) | sinusoidal | learned | rotary | none; carry_rpe: carry
        the positional RNN's state to the next segment (else it restarts at zero);
        position_cell: gru | mingru, the positional RNN.
    tie_weights: share the LM head with the token embedding.
    """

    # Options: the positions it accepts (the first is `auto`), the ModelConfig fields only it reads
    # (field -> when it reads them), and its checks of them (called by ModelConfig.validate).
    POSITIONS = ("recurrent", "sinusoidal", "learned", "rotary", "none")
    OPTIONS = {
        **dict.fromkeys(("memory_position", "memory_init", "memory_cell", "memory_reads", "d_memory")),
        **dict.fromkeys(("carry_rpe", "position_cell"), ("positions = recurrent", lambda cfg: cfg.position_encoding == "recurrent")),
        **dict.fromkeys(("ncgru_negative", "ncgru_orthogonal_reset"), ("memory_cell = ncgru", lambda cfg: cfg.memory_cell == "ncgru")),
    }

    @staticmethod
    def check_options(cfg: ModelConfig) -> list[tuple[bool, str]]:
        checks = [
            (
                cfg.memory_reads != "memory_token" or cfg.memory_position == "append",
                "memory_reads=memory_token needs memory_position=append: a prepended memory token sees no segment token under the causal mask",
            )
        ]
        if cfg.memory_cell == "ncgru":
            checks.append(
                (
                    cfg.ncgru_negative <= cfg.memory_dim,
                    f"ncgru_negative={cfg.ncgru_negative} exceeds the memory width {cfg.memory_dim}: use -1 (half) or 0..{cfg.memory_dim}",
                )
            )
        return checks

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, d_m = cfg.d_model, cfg.memory_dim
        # The language model's token embedding (vocab_size 0: none, CR-ViT's core) is registered
        # here, first, so parameter names and the order init_weights draws in stay the LM's.
        self.tokens = TokenEmbedding(cfg.vocab_size, D, tie=cfg.tie_weights) if cfg.vocab_size else None
        self.memory_in = nn.Linear(d_m, D)  # m_{n-1} -> memory token
        self.build_trunk(cfg)
        if cfg.position_encoding != "recurrent":
            max_len = max(cfg.segment_len, cfg.eval_segment_len) + 1  # + memory token
            self.absolute_positions = AbsolutePositions(cfg.position_encoding, max_len, D, cfg.n_head)
        self.apply(init_weights)
        # The RNNs keep torch's / NCGRU's own initialisation, so they are built after init_weights.
        if cfg.position_encoding == "recurrent":
            self.recurrent_positions = recurrent_positions(D, cfg.position_cell)
        if cfg.position_encoding == "recurrent" and self.tokens is not None:
            # Token embeddings on the scale of the recurrent positions they are added to. The
            # positional GRU (torch's init, U(+-1/sqrt(D)) weights and biases) outputs ~1/sqrt(D)
            # per component, while GPT-2's N(0, 0.02) embedding is 4-6x smaller at D = 64..128,
            # so token identity starts as a small part of e + p and of what the memory RNN reads.
            # N(0, 1/sqrt(D)) puts both on an equal footing; with 0.02 the synthetic recall task never
            # learned through the memory (docs/results/synthetic-recall-notes.md).
            # Only for positions=recurrent; every other choice keeps init_weights' embedding.
            nn.init.normal_(self.tokens.embed.weight, 0.0, D**-0.5)
        if cfg.memory_cell == "gru":
            self.memory_rnn = GRU(D, d_m)
        elif cfg.memory_cell == "mingru":
            self.memory_rnn = MinGRU(D, d_m)
        else:
            self.memory_rnn = NCGRU(D, d_m, n_negative=None if cfg.ncgru_negative < 0 else cfg.ncgru_negative, orthogonal_reset=cfg.ncgru_orthogonal_reset)
        # Chrono initialisation (Tallec & Ollivier 2018) of the memory's keep gate: b ~ log U(1, L).
        # At b = 0 the RNN keeps half its state per token, so what it read early in a segment is
        # ~2^-L of the memory by the segment's end and no gradient teaches it to keep anything;
        # sigma(log x) = 1 - 1/(1 + x) gives memory times of 2..L+1 tokens.
        self.memory_rnn.set_keep_bias(torch.empty(d_m).uniform_(1, max(2, cfg.segment_len)).log())  # [d_m]
        # m_0: a parameter when learned (zero at start: the model begins like the zeros choice)
        m0 = torch.zeros(d_m)
        if cfg.memory_init == "learned":
            self.memory_init = nn.Parameter(m0)
        else:
            self.register_buffer("memory_init", m0)

    def init_state(self, batch_size: int, evaluation: bool = False) -> CRTState:
        """State before the first segment: m_0 in every row, zero positional state.

        Gradients reach a learned m_0 through this state until the first detach.
        `evaluation` is accepted for the shared interface; CRT's state is the same in both.
        """
        device = self.memory_init.device  # a parameter or buffer: still fp32 after int8 quantization
        memory = self.memory_init.expand(batch_size, -1)  # [B, d_m]
        positions = torch.zeros(batch_size, self.cfg.d_model, device=device)  # [B, D]
        return CRTState(memory, positions)

    def encode(self, x: torch.Tensor, state: CRTState, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, CRTState]:
        """One segment of input vectors -> final-layer outputs and the next state.

        x: [B, T, D] embedded inputs. valid: optional bool [B, T], True on a prefix of each row
        (a clip that ends inside this segment, then padding). Under the causal mask padding
        after the last valid input changes no valid output, and the memory and positional
        states are taken at each row's last valid input, so padding changes nothing; a row
        with no valid input keeps its state. Needs memory_position prepend or none (an
        appended memory token would come after the padding).
        """
        cfg = self.cfg
        B, T = x.shape[:2]
        n_valid = None if valid is None else valid.sum(dim=1)  # [B] inputs before the padding
        if n_valid is not None and cfg.memory_position == "append":
            raise ValueError("padded segments (valid=...) need memory_position prepend or none")
        memory_token = self.memory_token(state, x.dtype)  # [B, 1, D]
        if cfg.memory_position == "prepend":
            u, first = torch.cat([memory_token, x], dim=1), 1  # [B, T+1, D]; tokens start at 1
        elif cfg.memory_position == "append":
            u, first = torch.cat([x, memory_token], dim=1), 0  # [B, T+1, D]; memory token at T
        else:
            u, first = x, 0  # [B, T, D]

        positions_state = state.positions
        if cfg.position_encoding == "recurrent":
            r0 = state.positions if cfg.carry_rpe else torch.zeros_like(state.positions)
            p, r_last = self.recurrent_positions(u, r0)  # p: [B, S, D], r_last: [B, D]
            if n_valid is not None:  # the GRU's hidden state after the last valid input
                r_last = _at_last_valid(p, torch.where(n_valid > 0, first + n_valid, 0), r0)  # [B, D]
            u, attn_kwargs = u + p, {}  # u_t += GRU_pos(u)_t
            if cfg.carry_rpe:
                positions_state = r_last.to(state.positions.dtype)
        else:
            u, attn_kwargs = self.absolute_positions(u)  # [B, S, D]

        h = self.trunk(u, attn_kwargs)  # [B, S, D]
        h_tokens = h[:, first : first + T]  # [B, T, D]

        # m_n = RNN(reads; m_{n-1}): the memory is updated from this segment's final-layer outputs
        if cfg.memory_reads == "tokens":
            reads = h_tokens  # [B, T, D]
        elif cfg.memory_reads == "memory_token":
            reads = h[:, T:]  # [B, 1, D] (append: the memory token is last)
        elif n_valid is None:
            reads = h_tokens[:, -1:]  # [B, 1, D]
        else:
            reads = _at_last_valid(h_tokens, n_valid, h_tokens[:, 0]).unsqueeze(1)  # [B, 1, D]
        m_prev = state.memory.to(reads.dtype)  # [B, d_m]
        out, memory = self.memory_rnn(reads, m_prev)  # [B, R, d_m], [B, d_m]
        if n_valid is not None:  # the memory after the last valid read; rows with none keep m_{n-1}
            memory = _at_last_valid(out, n_valid if cfg.memory_reads == "tokens" else n_valid.clamp(max=1), m_prev)  # [B, d_m]
        # The state stays in the dtype init_state gave it, whatever autocast computed in.
        return h_tokens, CRTState(memory.to(state.memory.dtype), positions_state)

    @staticmethod
    def flops(cfg: ModelConfig, T: int, evaluation: bool = False) -> dict[str, float]:
        """Forward FLOPs of one segment of T tokens beside the LM head (crt.analysis.flops): the
        blocks over T tokens and the memory token, W_m, the memory RNN over its reads and the
        positional GRU over every position."""
        D, d_m = cfg.d_model, cfg.memory_dim
        S = T + (cfg.memory_position != "none")  # + the memory token
        parts = blocks_flops(cfg.n_layer, S, D, cfg.d_ff)
        parts["memory projection"] = 2 * d_m * D if cfg.memory_position != "none" else 0.0
        rnn_flops = {"gru": gru_flops, "ncgru": gru_flops, "mingru": mingru_flops}
        parts["memory RNN"] = rnn_flops[cfg.memory_cell](D, d_m, T if cfg.memory_reads == "tokens" else 1)
        if cfg.position_encoding == "recurrent":
            parts["positional RNN"] = rnn_flops[cfg.position_cell](D, D, S)
        return parts

    def memory_token(self, state: CRTState, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_m m_{n-1} + b_m: [B, 1, D]."""
        return self.memory_in(state.memory.to(dtype or state.memory.dtype)).unsqueeze(1)

    # --- streaming: one token at a time, the segment's keys and values cached (crt.infer.stream)
    #
    #   segment opens:   u_0 = W_m m_{n-1} + b_m          the memory token, fed like a token
    #   each token:      u_t = e_t (+ GRU_pos step)        attends to u_0..u_t via the cache
    #                    m  <- RNN step(h_t, m)            the memory reads h_t as it comes
    #   segment closes:  m_n = m, r_n = r

    def open_segment(self, state: CRTState) -> SegmentCache:
        cfg = self.cfg
        segment = SegmentCache(cfg.n_layer, state)
        segment.memory = state.memory  # [B, d_m] the memory RNN's hidden state as it reads the segment
        segment.r = state.positions if cfg.carry_rpe else torch.zeros_like(state.positions)  # [B, D]
        segment.last_h = None  # [B, 1, D] the latest token's output
        if cfg.memory_position == "prepend":
            self._advance(segment, self.memory_token(state))
        return segment

    def _advance(self, segment: SegmentCache, u: torch.Tensor) -> torch.Tensor:
        """Inputs u [B, T, D] after the segment's earlier ones -> final-layer outputs [B, T, D]."""
        if self.cfg.position_encoding == "recurrent":
            p, segment.r = self.recurrent_positions(u, segment.r)  # p: [B, T, D]; r: [B, D]
            u, attn_kwargs = u + p, {}
        else:
            u, attn_kwargs = self.absolute_positions(u, offset=segment.offset)
        segment.offset += u.shape[1]
        return self.trunk(u, attn_kwargs, segment.layers)

    def advance(self, segment: SegmentCache, x: torch.Tensor) -> torch.Tensor:
        """One input vector x [B, 1, D] after the segment's earlier ones -> its output [B, 1, D]."""
        h = self._advance(segment, x)  # [B, 1, D]
        if self.cfg.memory_reads == "tokens":
            segment.memory = self.memory_rnn(h, segment.memory.to(h.dtype))[1]  # [B, d_m]  m <- RNN step(h_t, m)
        segment.last_h = h
        return h

    def close_segment(self, segment: SegmentCache) -> CRTState:
        """m_n from what the memory RNN read (an appended memory token is fed first), and r_n."""
        cfg, state = self.cfg, segment.state
        h_memory = self._advance(segment, self.memory_token(state)) if cfg.memory_position == "append" else None  # [B, 1, D]
        if cfg.memory_reads == "tokens":
            memory = segment.memory  # [B, d_m] already stepped over h_1..h_L
        else:
            reads = h_memory if cfg.memory_reads == "memory_token" else segment.last_h  # [B, 1, D]
            memory = self.memory_rnn(reads, state.memory)[1]  # [B, d_m]
        carry = cfg.position_encoding == "recurrent" and cfg.carry_rpe
        return CRTState(memory.to(state.memory.dtype), segment.r.to(state.positions.dtype) if carry else state.positions)


class CRT(CRTCore):
    """The CRT language model: `CRTCore` over token embeddings, read out by the (tied) LM head."""

    def forward(self, tokens: torch.Tensor, state: CRTState) -> tuple[torch.Tensor, CRTState]:
        # tokens: [B, T] with T <= segment length; state: CRTState
        h, state = self.encode(self.tokens(tokens), state)  # [B, T, D]
        return self.tokens.unembed(h), state  # [B, T, V]

    def step(self, segment: SegmentCache, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] after the segment's earlier ones -> logits [B, V] for the next token."""
        return self.tokens.unembed(self.advance(segment, self.tokens(tokens.view(-1, 1))))[:, 0]  # [B, V]


def _at_last_valid(seq: torch.Tensor, n: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """seq[b, n_b - 1] for every row, `empty[b]` where n_b = 0.

    seq: [B, S, H]; n: [B] counts in 0..S; empty: [B, H]  ->  [B, H]
    """
    idx = (n - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, seq.shape[2])  # [B, 1, H]
    last = seq.gather(1, idx).squeeze(1)  # [B, H]
    return torch.where((n > 0).unsqueeze(1), last, empty.to(last.dtype))
