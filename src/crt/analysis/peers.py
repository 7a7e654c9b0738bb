"""The peers `crt bench --peers` times beside our models (optional extra `pip install -e ".[bench]"`).

x-transformers' decoder with XL-style memories and lucidrains' recurrent-memory-transformer-pytorch,
built at the same width, depth, heads, feed-forward, vocabulary, segment, batch and dropout rates
as our preset of the same architecture, on our state interface. Their dropout sits in slightly
different places (inside the feed-forward rather than on both residual branches), so they draw
somewhat fewer random numbers per step than our models.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from crt.config import ModelConfig

PEERS = {
    "x-transformers XL": "ptb-xl-35",  # peer name -> our preset of the same architecture
    "x-transformers": "ptb-transformer-70",
    # timed at CRT-35's size with one memory token (CRT's one memory vector); our own RMT is ptb-rmt-35
    "recurrent-memory-transformer-pytorch": "ptb-crt-35",
}


class PeerState(NamedTuple):
    memory: torch.Tensor  # [B, ...] the peer's memories, on our state interface (detach works on it)


class PeerXL(nn.Module):
    """x-transformers' decoder (XL-style memories when mem_len > 0) behind `logits, state = model(tokens, state)`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from x_transformers import Decoder, TransformerWrapper

        self.cfg, self.mem_len = cfg, cfg.mem_len if cfg.arch == "transformer_xl" else 0
        self.net = TransformerWrapper(
            num_tokens=cfg.vocab_size,
            max_seq_len=cfg.segment_len,
            max_mem_len=self.mem_len,
            attn_layers=Decoder(
                dim=cfg.d_model,
                depth=cfg.n_layer,
                heads=cfg.n_head,
                ff_mult=cfg.d_ff // cfg.d_model,
                rel_pos_bias=self.mem_len > 0,
                attn_dropout=cfg.attn_dropout,
                ff_dropout=cfg.dropout,
            ),
            use_abs_pos_emb=self.mem_len == 0,
            tie_embedding=cfg.tie_weights,
            emb_dropout=cfg.emb_dropout,
        )

    def init_state(self, batch_size: int, evaluation: bool = False) -> PeerState:
        device = self.net.token_emb.emb.weight.device
        return PeerState(torch.zeros(batch_size, self.cfg.n_layer, 0, self.cfg.d_model, device=device))  # no memories yet

    def forward(self, tokens: torch.Tensor, state: PeerState) -> tuple[torch.Tensor, PeerState]:
        if not self.mem_len:
            return self.net(tokens), state
        mems = list(state.memory.unbind(1)) if state.memory.shape[2] else None  # n_layer x [B, M, D]
        logits, mems = self.net(tokens, mems=mems, return_mems=True)
        return logits, PeerState(torch.stack(mems, dim=1))  # [B, n_layer, M, D]


class PeerRMT(nn.Module):
    """recurrent-memory-transformer-pytorch behind `logits, state = model(tokens, state)`.

    One memory token (CRT's one memory vector), no XL memories, so it is a recurrent-memory
    transformer of the same size and segment as CRT.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer

        self.cfg = cfg
        self.net = RecurrentMemoryTransformer(
            dim=cfg.d_model,
            num_tokens=cfg.vocab_size,
            depth=cfg.n_layer,
            num_memory_tokens=1,
            seq_len=cfg.segment_len,
            heads=cfg.n_head,
            dim_head=cfg.d_model // cfg.n_head,
            ff_mult=cfg.d_ff // cfg.d_model,
            use_xl_memories=False,
            num_residual_streams=1,
            attn_dropout=cfg.attn_dropout,
            ff_dropout=cfg.dropout,
        )

    def init_state(self, batch_size: int, evaluation: bool = False) -> PeerState:
        device = self.net.token_emb.weight.device
        return PeerState(torch.zeros(batch_size, 0, self.cfg.d_model, device=device))  # no memories yet

    def forward(self, tokens: torch.Tensor, state: PeerState) -> tuple[torch.Tensor, PeerState]:
        logits, memories = self.net(tokens, state.memory if state.memory.shape[1] else None)[:2]  # memories: [B, 1, D]
        return logits, PeerState(memories)
