"""Transformer-XL (Dai et al. 2019): segment recurrence through a cache of hidden states.

Every layer keeps the inputs it saw at the last M positions. The next segment's tokens attend
to those cached states (no gradient through them) and causally to each other, with relative
positions so that a cached state means the same thing wherever the segment starts:

    segment n:   h^0      = Dropout(E[x])                                         [B, T, D]
                 h^l      = Block_l(h^{l-1}, memory = mem^{l-1})                  l = 1..L
                 y        = softmax(E LN(h^L))                                    tied LM head
                 mem'^l   = last M of [mem^l ; h^l]    (layer inputs, detached)

    A_ij = q_i.k_j  +  q_i.W_R R_{i-j}  +  u.k_j  +  v.W_R R_{i-j}                (a)+(b)+(c)+(d)
         = (q_i + u).k_j  +  (q_i + v).W_R R_{i-j}

with R the sinusoidal encoding of the distance i - j (clamped at `clamp_len`) and u, v learned
per head. The memory has a fixed size M from the first call on; a boolean `valid` mask says
which slots hold real states, so the first segment attends to nothing but itself, exactly like
the original's empty memory. Query and key positions below are *key indices* into
[memory ; segment], where query i of the segment sits at index M + i.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from crt.config import ModelConfig
from crt.layers import Block, SegmentCache, SegmentTrunk, TokenEmbedding, init_weights, sinusoidal_table


class XLState(NamedTuple):
    mems: torch.Tensor  # [B, n_layer, M, D]  input of each layer at the last M positions (detached)
    valid: torch.Tensor  # [B, M] bool  which memory slots hold real states (all False at the start)


def relative_distances(T: int, M: int, clamp_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Index of the relative encoding R used by query i (of T) for key j (of M + T): [T, M + T] long.

    The distance is (M + i) - j. Keys in the future (negative distance) get index 0; the
    attention mask removes them anyway. With clamp_len = c >= 0 every distance beyond c uses
    R_c (Dai et al.: longer distances than seen in training reuse the longest one); -1: no clamp.
    """
    query = torch.arange(M, M + T, device=device)[:, None]  # [T, 1]  key index of each query
    key = torch.arange(M + T, device=device)[None, :]  # [1, M+T]
    dist = (query - key).clamp(min=0)  # [T, M+T]
    return dist.clamp(max=clamp_len) if clamp_len >= 0 else dist  # [T, M+T]


def attention_mask(valid: torch.Tensor, T: int, same_length: bool) -> torch.Tensor:
    """Which keys each query may attend to: [B, T, M + T] bool, for memory validity `valid` [B, M].

    Query i (key index M + i) sees key j iff j <= M + i (causal; every memory slot is in the
    past) and j is a valid memory slot or a token of this segment. With same_length it also
    needs j > i: a sliding window of exactly M keys ending at itself, so once the memory is full
    every query attends to the same number of keys. This is the original's
    `triu(ones, 1 + mlen) + tril(ones, -mask_shift_len)` with mask_shift_len = mem_len - mlen,
    which is 0 for our fixed-size memory (mlen == mem_len == M); its empty or part-filled memory
    corresponds to our invalid slots. It needs M >= 1 (a window of 0 keys sees nothing).
    """
    B, M = valid.shape
    query = torch.arange(M, M + T, device=valid.device)[:, None]  # [T, 1]
    key = torch.arange(M + T, device=valid.device)[None, :]  # [1, M+T]
    allowed = key <= query  # [T, M+T]  causal
    if same_length:
        allowed = allowed & (key > query - M)  # [T, M+T]  the last M keys only
    key_valid = torch.cat([valid, valid.new_ones(B, T)], dim=1)  # [B, M+T]  segment tokens always exist
    return allowed[None] & key_valid[:, None, :]  # [B, T, M+T]


class RelativeAttention(nn.Module):
    """Multi-head attention over [memory ; x] with Transformer-XL's relative positions.

    d_model: model width, split across heads.
    n_head: number of heads (must divide d_model).
    dropout: dropout on the attention weights (training only).

    As in the original, the projections W_q, W_k, W_v, W_R, W_o have no bias (u and v play the
    part of a query bias). u and v belong to each layer (the original's untie_r=True) and start
    at N(0, 0.02), the original's initialisation.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model, bias=False)  # queries only for the segment, not the memory
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.pos = nn.Linear(d_model, d_model, bias=False)  # W_R
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.u = nn.Parameter(torch.randn(n_head, d_model // n_head) * 0.02)  # content bias, term (c)
        self.v = nn.Parameter(torch.randn(n_head, d_model // n_head) * 0.02)  # position bias, term (d)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, rel: torch.Tensor, dist: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D] segment; memory: [B, M, D] cached layer inputs (already layer-normed by Block);
        # rel: [P, D] encodings R_0..R_{P-1}; dist: [T, M+T] index into rel; allowed: [B or 1, T, M+T] bool
        B, T, D = x.shape
        H, hd = self.n_head, D // self.n_head
        K = memory.shape[1] + T
        q = self.q(x).view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
        kv = self.kv(torch.cat([memory, x], dim=1))  # [B, M+T, 2D]
        k, val = kv.view(B, K, 2, H, hd).permute(2, 0, 3, 1, 4)  # 2 x [B, H, M+T, hd]
        r = self.pos(rel).view(-1, H, hd).transpose(0, 1)  # [H, P, hd]  W_R R
        # (b) + (d) for every distance, then pick each (i, j)'s distance: a gather instead of the
        # original's pad-and-reshape "relative shift"; same numbers, and clamping is just an index.
        pos_scores = (q + self.v.to(q.dtype)[:, None]) @ r.transpose(1, 2)  # [B, H, T, P]  (q_i + v).W_R R_d
        pos_scores = pos_scores.gather(-1, dist.expand(B, H, T, K))  # [B, H, T, M+T]  d = i - j
        # SDPA computes softmax(Q K^T * scale + attn_mask) V, so (a) + (c) come from Q = q + u and
        # the positional terms enter through attn_mask, pre-multiplied by the same 1/sqrt(hd) scale:
        # exactly softmax((A_ij) / sqrt(hd)) over the allowed keys. -inf removes the others.
        scale = hd**-0.5
        bias = (pos_scores * scale).masked_fill(~allowed[:, None], float("-inf"))  # [B, H, T, M+T]
        y = F.scaled_dot_product_attention(  # (q_i + u).k_j = (a) + (c)
            q + self.u.to(q.dtype)[:, None], k, val, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, scale=scale
        )  # [B, H, T, hd]
        # a copy, not reshape: torch.onnx's decomposition of SDPA returns other strides than eager,
        # and a reshape traced as a view of eager's strides fails there
        return self.out(y.transpose(1, 2).clone(memory_format=torch.contiguous_format).view(B, T, D))  # [B, T, D]


class TransformerXL(SegmentTrunk):
    """Transformer-XL language model with pre-LayerNorm blocks. From `cfg` (see `ModelConfig`):

    vocab_size, d_model, n_layer, n_head, d_ff: sizes of the embedding and the blocks.
    dropout: residual branches and feed-forward; emb_dropout: token embeddings and the relative
        encodings R (as the original); attn_dropout: attention weights.
    tie_weights: share the LM head with the token embedding.
    mem_len: M, cached states per layer in training (0: segment_len).
    eval_mem_len: M at evaluation, `init_state(B, evaluation=True)` (0: mem_len). The segment
        length at evaluation is whatever the caller feeds; any T works with any M.
    clamp_len: relative distances beyond it share R_clamp_len (-1: no clamp; 0 is a valid clamp,
        unlike the original where 0 meant none).
    same_length: every query attends to the last M keys only (see `attention_mask`).
    """

    # Options: the positions it accepts (the first is `auto`), the ModelConfig fields only it reads
    # (field -> when it reads them), and its checks of them (called by ModelConfig.validate).
    POSITIONS = ("relative",)
    OPTIONS = dict.fromkeys(("mem_len", "clamp_len", "same_length", "eval_mem_len"))

    @staticmethod
    def check_options(cfg: ModelConfig) -> list[tuple[bool, str]]:
        return []  # mem_len, eval_mem_len and clamp_len are range-checked with every config

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.tokens = TokenEmbedding(cfg.vocab_size, D, tie=cfg.tie_weights)
        self.build_trunk(
            cfg,
            nn.ModuleList(
                Block(D, cfg.n_head, cfg.d_ff, cfg.dropout, cfg.attn_dropout, attention=RelativeAttention(D, cfg.n_head, cfg.attn_dropout))
                for _ in range(cfg.n_layer)
            ),
        )
        self.apply(init_weights)  # leaves u and v at their own N(0, 0.02)

    def init_state(self, batch_size: int, evaluation: bool = False) -> XLState:
        """Empty memory: M = eval_mem_len if evaluation else mem_len slots, none valid."""
        M = self.cfg.eval_memory_len if evaluation else self.cfg.memory_len
        w = self.ln_f.weight
        mems = w.new_zeros(batch_size, self.cfg.n_layer, M, self.cfg.d_model)  # [B, L, M, D]
        return XLState(mems, torch.zeros(batch_size, M, dtype=torch.bool, device=w.device))  # valid: [B, M]

    def forward(self, tokens: torch.Tensor, state: XLState) -> tuple[torch.Tensor, XLState]:
        # tokens: [B, T], any T >= 1 (it may exceed M)
        T = tokens.shape[1]
        allowed = attention_mask(state.valid, T, self.cfg.same_length)  # [B, T, M+T]
        logits, hids = self._run(tokens, state.mems, allowed)  # [B, T, V], [B, L, T, D]
        state = self.remember(state, hids)
        return logits, XLState(state.mems.detach(), state.valid)

    @staticmethod
    def flops(cfg: ModelConfig, T: int, evaluation: bool = False) -> dict[str, float]:
        """Forward FLOPs of one segment of T tokens beside the LM head (crt.analysis.flops): every
        layer attends over M memory and T segment keys, with P relative encodings."""
        D, N = cfg.d_model, cfg.n_layer
        M = cfg.eval_memory_len if evaluation else cfg.memory_len
        K = M + T  # keys: memory then segment
        P = K if cfg.clamp_len < 0 else min(K, cfg.clamp_len + 1)  # distinct relative encodings
        return {
            "attention projections": N * 2 * D * D * (T + 2 * K + P + T),  # W_q on T, W_k and W_v on M + T, W_R on P encodings, W_o on T
            "attention scores and sums": N * 2 * T * D * (2 * K + P),  # (q+u) k^T: T x K, (q+v) (W_R R)^T: T x P, A V: T x K
            "feed-forward": N * 2 * T * 2 * D * cfg.d_ff,
        }

    def remember(self, state: XLState, hids: torch.Tensor) -> XLState:
        """The last M of [old memory ; a segment's layer inputs hids [B, L, T, D]]: the first T
        of the M + T positions are dropped."""
        T = hids.shape[2]
        mems = torch.cat([state.mems, hids.to(state.mems.dtype)], dim=2)[:, :, T:]  # [B, L, M, D]
        valid = torch.cat([state.valid, state.valid.new_ones(state.valid.shape[0], T)], dim=1)[:, T:]  # [B, M]
        return XLState(mems, valid)

    # --- streaming: the segment's layer inputs so far extend the memory. A new token attends to
    # [memory ; those] and only its own layer inputs are computed (the keys and values of the
    # cached inputs are re-projected, as XL does for its memory).

    def open_segment(self, state: XLState) -> SegmentCache:
        segment = SegmentCache(0, state)
        segment.hids = []  # each [B, L, 1, D]: one token's layer inputs
        return segment

    def step(self, segment: SegmentCache, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] after the segment's earlier ones -> logits [B, V] for the next token."""
        state, M, t = segment.state, segment.state.mems.shape[2], len(segment.hids)
        mems = torch.cat([state.mems, *segment.hids], dim=2)  # [B, L, M + t, D]
        valid = torch.cat([state.valid, state.valid.new_ones(state.valid.shape[0], t + 1)], dim=1)  # [B, M + t + 1]
        allowed = valid[:, None, :]  # [B, 1, M + t + 1]  the new token is last: every earlier key is causal
        if self.cfg.same_length:  # as in the segment: only the last M keys
            allowed = allowed & (torch.arange(M + t + 1, device=valid.device) > t)
        logits, hids = self._run(tokens.view(-1, 1), mems, allowed)  # [B, 1, V], [B, L, 1, D]
        segment.hids.append(hids.to(state.mems.dtype))
        return logits[:, 0]  # [B, V]

    def close_segment(self, segment: SegmentCache) -> XLState:
        return self.remember(segment.state, torch.cat(segment.hids, dim=2))

    def forward_with_mask(self, tokens: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """One pass over the whole of `tokens` [B, N] where query i attends to key j iff allowed[i, j].

        A test reference: streaming segment by segment equals this with
        allowed[i, j] = (segment_start(i) - M <= j <= i). allowed: [N, N] or [B, N, N] bool,
        every row with at least one True (a query with no key has no defined output).
        Relative distances are i - j, as in streaming. Returns logits [B, N, V].
        """
        B = tokens.shape[0]
        if allowed.dim() == 2:
            allowed = allowed[None]  # [1, N, N]
        no_memory = self.ln_f.weight.new_zeros(B, self.cfg.n_layer, 0, self.cfg.d_model)  # [B, L, 0, D]
        return self._run(tokens, no_memory, allowed.to(tokens.device))[0]

    def _run(self, tokens: torch.Tensor, mems: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # tokens: [B, T]; mems: [B, L, M, D]; allowed: [B or 1, T, M+T] -> logits [B, T, V], layer inputs [B, L, T, D]
        T, M = tokens.shape[1], mems.shape[2]
        clamp = self.cfg.clamp_len
        n_rel = M + T if clamp < 0 else min(M + T, clamp + 1)  # distinct distances 0..n_rel-1
        dist = relative_distances(T, M, clamp, tokens.device)  # [T, M+T]
        rel = self.drop(sinusoidal_table(torch.arange(n_rel, device=tokens.device), self.cfg.d_model))  # [P, D]
        h = self.drop(self.tokens(tokens))  # [B, T, D]
        hids = []
        for l, block in enumerate(self.blocks):
            hids.append(h)  # the layer's input is what the next segment attends to
            h = block(h, memory=mems[:, l], rel=rel, dist=dist, allowed=allowed)  # [B, T, D]
        return self.tokens.unembed(self.ln_f(h)), torch.stack(hids, dim=1)  # [B, T, V], [B, L, T, D]
