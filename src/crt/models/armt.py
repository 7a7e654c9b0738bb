"""Associative Recurrent Memory Transformer (Rodkin et al. 2024).

Like RMT, k memory tokens follow each segment; unlike RMT, they are the same learned vectors
in every segment and carry nothing themselves. What carries the past is a layer-local
associative memory (A_l, z_l) per layer (`crt.layers.associative`):

    segment n, layer l:   h^{l-1} += read(A_l^{n-1}, z_l^{n-1}, h^{l-1})       every position
                          h^l      = Block_l(h^{l-1})                            [B, T+k, D]
                          (A_l^n, z_l^n) = write(h^l[T:], A_l^{n-1}, z_l^{n-1})  memory tokens' outputs

    input  h^0 = [E[x_1..x_T] ; P] + positions,  P the k learned memory tokens
    output y_t = softmax(E LN(h^L_t)),  t = 1..T

Layer l of segment n needs only layer l-1 of segment n and layer l of segment n-1. That is
what lets `crt.models.diagonal` run all cells with n + l = i at once. `ARMTLayer` is the unit
both executors run: this file's sequential loop and the diagonal one call the same code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from crt.config import ModelConfig
from crt.layers import AbsolutePositions, AssociativeMemory, Block, SegmentCache, TokenEmbedding, blocks_flops, init_weights


class ARMTState(NamedTuple):
    A: torch.Tensor  # [B, n_layer, H, d_phi, d_v]  associative matrix of every layer
    z: torch.Tensor  # [B, n_layer, H, d_phi]       its normaliser


class ARMTLayer(nn.Module):
    """One cell: read the layer's memory, run the block, write the memory tokens' outputs.

    d_model, n_head, d_ff, dropout, attn_dropout: the block.
    mem_tokens: how many trailing positions are memory tokens (they write).
    d_key, assoc_heads, nu, correction, floor: the associative memory (`AssociativeMemory`).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_ff: int,
        dropout: float,
        attn_dropout: float,
        mem_tokens: int,
        d_key: int,
        assoc_heads: int,
        nu: int,
        correction: bool,
        floor: bool,
    ):
        super().__init__()
        self.mem_tokens = mem_tokens
        self.memory = AssociativeMemory(d_model, d_key, assoc_heads, nu, correction, floor)
        self.block = Block(d_model, n_head, d_ff, dropout, attn_dropout)

    def forward(self, h: torch.Tensor, A: torch.Tensor, z: torch.Tensor, write: bool = True, **attn_kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # h: [B, S, D] (memory tokens last); A: [B, H, d_phi, d_v]; z: [B, H, d_phi]
        # write: False when h holds no memory tokens (a stream's single token): (A, z) unchanged
        h = h + self.memory.read(h, A, z)  # [B, S, D]
        h = self.block(h, **attn_kwargs)  # [B, S, D]
        if write:
            A, z = self.memory.write(h[:, -self.mem_tokens :], A, z)
        return h, A, z


class ARMT(nn.Module):
    """ARMT language model. From `cfg`:

    d_model, n_layer, n_head, d_ff, dropout, emb_dropout, attn_dropout: the blocks.
    mem_tokens: k learned memory tokens after every segment.
    assoc_dim, assoc_heads, assoc_nu, assoc_correction, assoc_floor: each layer's associative memory.
    positions: learned | sinusoidal | rotary over [segment ; memory tokens].
    segment_len / eval_segment_len: the longest segment (sizes learned positions).
    tie_weights: share the LM head with the token embedding.
    """

    # Options: the positions it accepts (the first is `auto`), the ModelConfig fields only it reads
    # (field -> when it reads them), and its checks of them (called by ModelConfig.validate).
    POSITIONS = ("learned", "sinusoidal", "rotary")
    OPTIONS = dict.fromkeys(("mem_tokens", "assoc_dim", "assoc_heads", "assoc_nu", "assoc_correction", "assoc_floor"))

    @staticmethod
    def check_options(cfg: ModelConfig) -> list[tuple[bool, str]]:
        return [
            (cfg.mem_tokens >= 1, f"mem_tokens={cfg.mem_tokens}: armt needs at least one memory token (--mem-tokens)"),
            (cfg.assoc_dim >= 1 and cfg.assoc_nu >= 1 and cfg.assoc_heads >= 1, "assoc_dim, assoc_nu and assoc_heads must be >= 1"),
            (
                cfg.assoc_heads < 1 or (cfg.assoc_dim % cfg.assoc_heads == 0 and cfg.d_model % cfg.assoc_heads == 0),
                f"assoc_heads={cfg.assoc_heads} must divide assoc_dim={cfg.assoc_dim} and d_model={cfg.d_model}",
            ),
        ]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, k = cfg.d_model, cfg.mem_tokens
        self.tokens = TokenEmbedding(cfg.vocab_size, D, tie=cfg.tie_weights)
        self.drop = nn.Dropout(cfg.emb_dropout)
        self.layers = nn.ModuleList(
            ARMTLayer(
                D, cfg.n_head, cfg.d_ff, cfg.dropout, cfg.attn_dropout, k, cfg.assoc_dim, cfg.assoc_heads, cfg.assoc_nu, cfg.assoc_correction, cfg.assoc_floor
            )
            for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(D)
        self.positions = AbsolutePositions(cfg.position_encoding, max(cfg.segment_len, cfg.eval_segment_len) + k, D, cfg.n_head)
        self.apply(init_weights)
        self.memory_tokens = nn.Parameter(torch.randn(k, D) * 0.02)  # [k, D] the same in every segment
        for layer in self.layers:
            # W_v starts at zero (as the original): the first reads return 0 and the model
            # starts as a plain segment transformer, then learns what to store.
            nn.init.zeros_(layer.memory.value.weight)

    def init_state(self, batch_size: int, evaluation: bool = False) -> ARMTState:
        """The empty memory in every layer (all zeros; see `crt.layers.associative`)."""
        device, dtype = self.memory_tokens.device, self.memory_tokens.dtype
        A, z = zip(*(layer.memory.empty(batch_size, device, dtype) for layer in self.layers))
        return ARMTState(torch.stack(A, dim=1), torch.stack(z, dim=1))  # [B, L, H, d_phi, d_v], [B, L, H, d_phi]

    def embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """h^0 = [E[x] ; P] + positions, and the attention keyword arguments: [B, T+k, D]."""
        x = self.tokens(tokens)  # [B, T, D]
        u = torch.cat([x, self.memory_tokens.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)  # [B, T+k, D]
        u, attn_kwargs = self.positions(u)  # [B, T+k, D]
        return self.drop(u), attn_kwargs

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of the segment's tokens from the last layer's output h [B, T+k, D]: [B, T, V]."""
        return self.tokens.unembed(self.ln_f(h[:, : -self.cfg.mem_tokens]))  # [B, T, V]

    @staticmethod
    def flops(cfg: ModelConfig, T: int, evaluation: bool = False) -> dict[str, float]:
        """Forward FLOPs of one segment of T tokens beside the LM head: the blocks over the tokens
        and the k memory tokens, and every layer's associative reads and writes (crt.analysis.flops)."""
        D, N, k, H, d_key = cfg.d_model, cfg.n_layer, cfg.mem_tokens, cfg.assoc_heads, cfg.assoc_dim
        S = T + k
        parts = blocks_flops(N, S, D, cfg.d_ff)
        d_phi = 2 * cfg.assoc_nu * d_key // H  # feature width per head
        # per head the memory is A [d_phi, D/H]; a lookup is phi A (d_phi x D/H) and phi . z (d_phi)
        lookup = 2 * H * d_phi * (D // H + 1)
        read = S * (2 * D * d_key + lookup)  # W_q, then every position looks up
        write = k * (2 * D * d_key + 2 * D * D + 2 * D * H + lookup + 2 * H * d_phi * (D // H))  # W_k, W_v, gate, v_old, k (v - v_old)^T
        parts["associative memory"] = N * (read + write)
        return parts

    def run_layers(
        self, h: torch.Tensor, state: ARMTState, attn_kwargs: dict, write: bool = True, caches: list | None = None
    ) -> tuple[torch.Tensor, ARMTState]:
        """Every layer over h [B, S, D] -> its output [B, S, D] and the state the memory tokens
        wrote (write=False: h holds no memory tokens and the state comes back unchanged).
        caches: one KVCache per layer when streaming."""
        As, zs = [], []
        for l, layer in enumerate(self.layers):
            kwargs = attn_kwargs if caches is None else {**attn_kwargs, "cache": caches[l]}
            h, A, z = layer(h, state.A[:, l].to(h.dtype), state.z[:, l].to(h.dtype), write=write, **kwargs)  # [B, S, D]
            As.append(A.to(state.A.dtype))
            zs.append(z.to(state.z.dtype))
        return h, ARMTState(torch.stack(As, dim=1), torch.stack(zs, dim=1))

    def forward(self, tokens: torch.Tensor, state: ARMTState) -> tuple[torch.Tensor, ARMTState]:
        # tokens: [B, T]; state: ARMTState
        h, attn_kwargs = self.embed(tokens)  # [B, T+k, D]
        h, state = self.run_layers(h, state, attn_kwargs)  # [B, T+k, D]
        return self.head(h), state

    # --- streaming: each position reads every layer's memory of the previous segment and goes
    # through the block with the segment's keys and values cached; when the segment closes, the
    # k memory tokens are fed the same way and their outputs write each layer's memory.

    def _advance(self, segment: SegmentCache, u: torch.Tensor, write: bool = False) -> tuple[torch.Tensor, ARMTState]:
        u, attn_kwargs = self.positions(u, offset=segment.offset)  # [B, T, D]
        segment.offset += u.shape[1]
        return self.run_layers(self.drop(u), segment.state, attn_kwargs, write, segment.layers)

    def open_segment(self, state: ARMTState) -> SegmentCache:
        return SegmentCache(self.cfg.n_layer, state)

    def step(self, segment: SegmentCache, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] after the segment's earlier ones -> logits [B, V] for the next token."""
        h, _ = self._advance(segment, self.tokens(tokens.view(-1, 1)))  # [B, 1, D]
        return self.tokens.unembed(self.ln_f(h))[:, 0]  # [B, V]

    def close_segment(self, segment: SegmentCache) -> ARMTState:
        P = self.memory_tokens.expand(segment.state.A.shape[0], -1, -1)  # [B, k, D]
        return self._advance(segment, P.to(segment.state.A.dtype), write=True)[1]
