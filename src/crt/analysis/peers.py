"""The peers `crt bench --peers` times beside our models (optional extra `pip install -e ".[bench]"`).

Same architecture as one of our presets, at its width, depth, heads, feed-forward, vocabulary,
segment, batch and dropout rates, on our state interface:

- x-transformers' decoder with XL-style memories (beside ptb-xl-35) and without (ptb-transformer-70);
- lucidrains' recurrent-memory-transformer-pytorch (at CRT-35's size with one memory token).

Their dropout sits in slightly different places (inside the feed-forward rather than on both
residual branches), so they draw somewhat fewer random numbers per step than our models.

What users pick instead: constant-memory streaming models, built at the width of the preset
they stand beside (CRT-35) with the depth whose total parameter count, embedding and tied head
included, is nearest that preset's (`matched_depth`; within PARAM_TOLERANCE, tests/test_bench.py):

- minGRU (Feng et al. 2024, "Were RNNs All We Needed?"), lucidrains' minGRU-pytorch: its minLM
  blocks (RMSNorm, minGRU with expansion 1.5, RMSNorm, feed-forward x4, no conv) and its minGRU
  layer, which takes a previous hidden state and runs the segment as one log-space parallel scan.
  minLM.forward itself cannot carry a state across segments (given hidden states it keeps only
  the last token, for decoding), so `PeerMinGRU.forward` runs minLM's own modules in minLM's
  order with each layer's hidden state carried; per token it calls minLM.forward's decoding path.
- Mamba (Gu and Dao 2023), alxndrTL's mamba.py (`mambapy`): its Mamba stack of ResidualBlocks
  (d_state 16, expand 2, d_conv 4). Its forward starts every sequence from a zero state, so
  `PeerMamba.forward` runs each block's own weights over the segment from the carried state
  (the conv sees the previous segment's last d_conv - 1 inputs, the selective scan starts from
  the carried h through mambapy's pscan); per token it calls the package's own `Mamba.step`.
  The CUDA kernels (mamba-ssm) are not used: this is the pure-PyTorch scan a CPU user gets.

Both tie the LM head to the embedding, as our presets do (`cfg.tie_weights`; the packages' LMs
do not), initialised N(0, 1/D) like CRT's tied embedding. minLM applies `cfg.dropout` after each
block; mamba.py has no dropout. Neither has an embedding dropout.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from crt.config import ModelConfig

PEERS = {
    "x-transformers XL": "ptb-xl-35",  # peer name -> our preset of the same architecture, or the preset it is matched to
    "x-transformers": "ptb-transformer-70",
    # timed at CRT-35's size with one memory token (CRT's one memory vector); our own RMT is ptb-rmt-35
    "recurrent-memory-transformer-pytorch": "ptb-crt-35",
    # constant-memory streaming models at CRT-35's width, batch, segment and BPTT depth, depth matched to its parameter count
    "minGRU-pytorch": "ptb-crt-35",
    "mambapy": "ptb-crt-35",
}
MATCHED = ("minGRU-pytorch", "mambapy")  # built at their preset's width, depth matched to its parameter count
PACKAGES = {  # peer name -> the module it imports (the `bench` extra)
    "x-transformers XL": "x_transformers",
    "x-transformers": "x_transformers",
    "recurrent-memory-transformer-pytorch": "recurrent_memory_transformer_pytorch",
    "minGRU-pytorch": "minGRU_pytorch",
    "mambapy": "mambapy",
}
PARAM_TOLERANCE = 0.03  # a matched peer's parameter count is within 3% of its preset's


def missing_packages() -> list[str]:
    """The peers' modules that are not installed."""
    return sorted({m for m in PACKAGES.values() if importlib.util.find_spec(m) is None})


def param_count(make: Callable[[], nn.Module]) -> int:
    """Parameters of the module `make` builds, counted on the meta device (no memory, no RNG drawn); shared weights once."""
    with torch.device("meta"):
        return sum(p.numel() for p in make().parameters())


def matched_depth(make: Callable[[int], nn.Module], target: int) -> int:
    """The depth at which `make(depth)` has the parameter count nearest `target`.

    At a fixed width the count is affine in the depth, count(d) = fixed + d * per_layer (embedding,
    final norm and head in `fixed`), so two counts give it.
    """
    one, two = param_count(lambda: make(1)), param_count(lambda: make(2))
    per_layer = two - one
    return max(1, round((target - (one - per_layer)) / per_layer))


def build_peer(name: str, cfg: ModelConfig, match_params: int | None = None) -> nn.Module:
    """The peer `name` at the size of `cfg`; a matched peer at the depth nearest `match_params` parameters (cfg.n_layer if None)."""
    if name.startswith("x-transformers"):
        return PeerXL(cfg)
    if name == "recurrent-memory-transformer-pytorch":
        return PeerRMT(cfg)
    cls = {"minGRU-pytorch": PeerMinGRU, "mambapy": PeerMamba}[name]
    return cls(cfg, cfg.n_layer if match_params is None else matched_depth(lambda d: cls(cfg, d), match_params))


def _linear_flops(model: nn.Module) -> int:
    """Forward FLOPs per token of every nn.Linear and nn.Conv1d (the head included): 2 per weight (one multiply-add)."""
    return sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d)))


def _tie(embedding: nn.Embedding, head: nn.Linear, cfg: ModelConfig) -> None:
    if cfg.tie_weights:
        head.weight = embedding.weight
        nn.init.normal_(embedding.weight, 0.0, cfg.d_model**-0.5)  # N(0, 1) suits an untied head, not logits = h . e_v


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


class MinGRUState(NamedTuple):
    hidden: torch.Tensor  # [B, depth, 1, D_h] each layer's last hidden state h_t (positive: minGRU's g keeps it > 0; h_0 = 0)


class PeerMinGRU(nn.Module):
    """minGRU-pytorch's minLM (depth blocks at width cfg.d_model) behind `logits, state = model(tokens, state)`.

    Per layer, minGRU:  z_t = sigmoid(W_z x_t),  h~_t = g(W_h x_t),  h_t = (1 - z_t) h_{t-1} + z_t h~_t,
    the gates depending on the input only, so the segment is one scan (log space, Heinsen's
    logcumsumexp, from the carried h_{t-1}). Per token: the package's sequential branch (a lerp).
    """

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        from minGRU_pytorch.minLM import minLM

        self.cfg, self.depth = cfg, depth
        self.net = minLM(num_tokens=cfg.vocab_size, dim=cfg.d_model, depth=depth, dropout=cfg.dropout)  # package defaults: ff_mult 4, expansion 1.5, no conv
        _tie(self.net.token_emb, self.net.to_logits, cfg)
        self.hidden_dim = self.net.layers[0][2].to_hidden_and_gate.out_features // 2  # D_h = 1.5 D

    def init_state(self, batch_size: int, evaluation: bool = False) -> MinGRUState:
        device = self.net.token_emb.weight.device
        return MinGRUState(torch.zeros(batch_size, self.depth, 1, self.hidden_dim, device=device))  # h_0 = 0: the same as minGRU's no-previous-hidden start

    def forward(self, tokens: torch.Tensor, state: MinGRUState) -> tuple[torch.Tensor, MinGRUState]:
        """tokens [B, T] -> logits [B, T, V]: minLM.forward's block order, with each layer's hidden state carried in."""
        x = self.net.token_emb(tokens)  # [B, T, D]
        hidden = []
        for i, (_, norm, mingru, ff_norm, ff, dropout) in enumerate(self.net.layers):  # the conv slot is None (minLM's enable_conv=False)
            out, h = mingru(norm(x), state.hidden[:, i], return_next_prev_hidden=True)  # out [B, T, D], h [B, 1, D_h]
            x = out + x
            x = ff(ff_norm(x)) + x
            x = dropout(x) if dropout is not None else x
            hidden.append(h)
        return self.net.to_logits(self.net.norm(x)), MinGRUState(torch.stack(hidden, dim=1))  # [B, T, V], [B, depth, 1, D_h]

    def stream(self, batch_size: int = 1) -> PeerStream:
        """Token by token through minLM.forward's own decoding path (prev_hiddens: one position, each layer's minGRU a lerp)."""
        hiddens = None  # minLM's start: no previous hidden states

        def feed(tokens: torch.Tensor) -> torch.Tensor:
            nonlocal hiddens
            logits, hiddens = self.net(tokens.view(-1, 1), return_prev_hiddens=True, prev_hiddens=hiddens)  # [B, 1, V], depth x [B, 1, D_h]
            return logits[:, 0]

        return PeerStream(self.eval(), feed)

    def train_flops_per_token(self) -> float:
        """3 x forward; forward: every Linear, the tied head included (the scan, gates and norms are not matrix products)."""
        return 3.0 * _linear_flops(self)


class MambaState(NamedTuple):
    ssm: torch.Tensor  # [B, depth, ED, N] each layer's selective-scan state h_t (fp32, as mambapy keeps it)
    conv: torch.Tensor  # [B, depth, ED, d_conv - 1] each layer's last d_conv - 1 inputs to its causal depthwise conv


class PeerMamba(nn.Module):
    """mambapy's Mamba (depth ResidualBlocks at width cfg.d_model) with an embedding and a tied head, behind
    `logits, state = model(tokens, state)`.

    Per block, on u = SiLU(conv(W_in x)) and gate z:  Δ_t = softplus(W_Δ u_t + b),  Ā_t = exp(Δ_t A),
    h_t = Ā_t h_{t-1} + Δ_t B_t u_t,  y_t = C_t h_t + D u_t,  out = W_out (y_t * SiLU(z_t)) + x_t,
    with B_t, C_t and Δ_t's input from x_proj(u_t) (selective). Segment: mambapy's pscan from the
    carried h; per token: `Mamba.step` (the package's sequential recurrence, one position per call).
    """

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        from mambapy.mamba import Mamba, MambaConfig, RMSNorm

        self.cfg, self.depth = cfg, depth
        self.mcfg = MambaConfig(d_model=cfg.d_model, n_layers=depth)  # package defaults: d_state 16, expand 2, d_conv 4, dt_rank D / 16
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.mamba = Mamba(self.mcfg)
        self.norm_f = RMSNorm(cfg.d_model, self.mcfg.rms_norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        _tie(self.embedding, self.head, cfg)

    def init_state(self, batch_size: int, evaluation: bool = False) -> MambaState:
        c, device = self.mcfg, self.embedding.weight.device
        return MambaState(
            torch.zeros(batch_size, self.depth, c.d_inner, c.d_state, device=device),  # h_0 = 0
            torch.zeros(batch_size, self.depth, c.d_inner, c.d_conv - 1, device=device),  # zeros: the package's left padding
        )

    def forward(self, tokens: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """tokens [B, T] -> logits [B, T, V]."""
        x = self.embedding(tokens)  # [B, T, D]
        ssm, conv = [], []
        for i, block in enumerate(self.mamba.layers):
            x, h, c = self._block(block, x, state.ssm[:, i], state.conv[:, i])
            ssm.append(h)
            conv.append(c)
        return self.head(self.norm_f(x)), MambaState(torch.stack(ssm, dim=1), torch.stack(conv, dim=1))

    def _block(self, block: nn.Module, x: torch.Tensor, h: torch.Tensor, conv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One mambapy ResidualBlock over a segment from its carried state: x [B, T, D], h [B, ED, N], conv [B, ED, k-1]."""
        from mambapy.pscan import pscan

        m, c = block.mixer, self.mcfg
        u, z = m.in_proj(block.norm(x)).chunk(2, dim=-1)  # [B, T, ED] each
        u = torch.cat([conv, u.transpose(1, 2)], dim=2)  # [B, ED, k-1+T]: the conv sees the previous segment's last inputs, not zeros
        conv = u[:, :, -(c.d_conv - 1) :]  # [B, ED, k-1]
        u = F.silu(F.conv1d(u, m.conv1d.weight, m.conv1d.bias, groups=c.d_inner)).transpose(1, 2)  # [B, T, ED], the valid part of the causal conv
        delta, Bt, Ct = m._apply_layernorms(*torch.split(m.x_proj(u), [c.dt_rank, c.d_state, c.d_state], dim=-1))  # [B, T, R], [B, T, N], [B, T, N]
        delta = F.softplus(m.dt_proj(delta))  # [B, T, ED]
        dA = torch.exp(delta.unsqueeze(-1) * -torch.exp(m.A_log.float()))  # [B, T, ED, N]  Ā_t = exp(Δ_t A), A = -exp(A_log) < 0
        BX = (delta.unsqueeze(-1) * Bt.unsqueeze(2) * u.unsqueeze(-1)).float()  # [B, T, ED, N]  Δ_t B_t u_t, fp32 like the state
        # pscan starts from h = 0; fold the carried state into the first input: h_1 = Ā_1 h_0 + Δ_1 B_1 u_1
        hs = pscan(dA, torch.cat([dA[:, :1] * h.unsqueeze(1) + BX[:, :1], BX[:, 1:]], dim=1))  # [B, T, ED, N]
        y = (hs @ Ct.unsqueeze(-1).to(hs.dtype)).squeeze(-1) + m.D.float() * u  # [B, T, ED]
        return m.out_proj(y * F.silu(z)) + x, hs[:, -1], conv

    def stream(self, batch_size: int = 1) -> PeerStream:
        """Token by token through mambapy's own `Mamba.step` (per layer: the conv's last inputs and h, one position per call)."""
        c = self.mcfg
        caches = [
            (None, torch.zeros(batch_size, c.d_inner, c.d_conv - 1, device=self.embedding.weight.device)) for _ in range(self.depth)
        ]  # the package's start

        def feed(tokens: torch.Tensor) -> torch.Tensor:
            x, _ = self.mamba.step(self.embedding(tokens.view(-1)), caches)  # [B, D]; step updates caches in place
            return self.head(self.norm_f(x))  # [B, V]

        return PeerStream(self.eval(), feed)

    def train_flops_per_token(self) -> float:
        """3 x forward; forward: every Linear (tied head included) and the depthwise conv, and per layer the state
        read-out C_t h_t (2 ED N). Not counted: the scan's elementwise update, gates, norms."""
        c = self.mcfg
        return 3.0 * (_linear_flops(self) + self.depth * 2 * c.d_inner * c.d_state)


class PeerStream:
    """A peer fed one token at a time, like crt.infer.Stream: `feed(tokens [B]) -> logits [B, V]`, state carried inside."""

    def __init__(self, model: nn.Module, feed: Callable[[torch.Tensor], torch.Tensor]):
        self.model, self._feed = model, feed

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._feed(tokens)
