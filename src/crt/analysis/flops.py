"""Analytic FLOP counts for every model config (SPEC §6).

One multiply-add is 2 FLOPs. Counted: every matrix product (attention projections, attention
scores Q K^T and the weighted sum A V, feed-forward, the LM head, CRT's memory projection,
the recurrent cells' input and hidden products, Transformer-XL's W_R R and its positional
scores, ARMT's associative reads and writes). Memory tokens (CRT's one, RMT's read and write
copies, ARMT's k) go through every block like segment tokens and are counted there; the
LM head only sees the segment's tokens. Not counted: norms, activations, softmax, gate nonlinearities, embedding lookups,
the NCGRU's Cayley solve (once per segment, O(d_m^3), independent of tokens) and Transformer-
XL's gather of positional scores. Attention is counted as computed: the full T x T score
matrix of causal attention, not the lower half the mask keeps (this is also what
`torch.utils.flop_counter.FlopCounterMode` counts), so causal savings are not claimed.

Training is taken as 3x forward (backward computes two products per forward product).
"""

from __future__ import annotations

from dataclasses import dataclass

from crt.config import ModelConfig, TrainConfig
from crt.errors import CRTError

PARTS = (
    "attention projections",
    "attention scores and sums",
    "feed-forward",
    "memory RNN",
    "positional RNN",
    "memory projection",
    "associative memory",
    "LM head",
)


@dataclass
class FlopCount:
    """Forward FLOPs of one segment of `tokens` tokens for one sequence, by part."""

    parts: dict[str, float]
    tokens: int  # predicted tokens in the segment

    @property
    def forward_per_segment(self) -> float:
        return sum(self.parts.values())

    @property
    def forward_per_token(self) -> float:
        return self.forward_per_segment / self.tokens

    @property
    def train_per_token(self) -> float:
        return 3 * self.forward_per_token


def _gru(input_size: int, hidden: int, steps: int) -> float:
    """GRU or NCGRU: three gates, each W x (input) and U h (hidden), per step."""
    return 2 * steps * 3 * (input_size * hidden + hidden * hidden)


def count_flops(cfg: ModelConfig, evaluation: bool = False) -> FlopCount:
    """FLOPs of one full segment (training or evaluation lengths) of the model `cfg` describes."""
    cfg.validate()
    D, F, V, N = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layer
    T = (cfg.eval_segment_len or cfg.segment_len) if evaluation else cfg.segment_len
    parts = dict.fromkeys(PARTS, 0.0)
    parts["LM head"] = 2 * T * D * V
    if cfg.arch == "transformer_xl":
        M = (cfg.eval_mem_len or cfg.mem_len or cfg.segment_len) if evaluation else (cfg.mem_len or cfg.segment_len)
        K = M + T  # keys: memory then segment
        P = K if cfg.clamp_len < 0 else min(K, cfg.clamp_len + 1)  # distinct relative encodings
        # W_q on T, W_k and W_v on M + T, W_R on P encodings, W_o on T
        parts["attention projections"] = N * 2 * D * D * (T + 2 * K + P + T)
        # (q+u) k^T: T x K, (q+v) (W_R R)^T: T x P, A V: T x K
        parts["attention scores and sums"] = N * 2 * T * D * (2 * K + P)
        parts["feed-forward"] = N * 2 * T * 2 * D * F
        return FlopCount(parts, T)
    extra = {  # memory positions beside the T tokens
        "crt": 1 if cfg.memory_position != "none" else 0,
        "rmt": cfg.mem_tokens * (1 if cfg.rmt_placement == "write" else 2),  # read and write copies
        "armt": cfg.mem_tokens,
    }
    S = T + extra.get(cfg.arch, 0)
    parts["attention projections"] = N * 2 * S * 4 * D * D  # W_qkv (3 D^2) and W_o (D^2)
    parts["attention scores and sums"] = N * 2 * 2 * S * S * D  # Q K^T and A V, S x S each
    parts["feed-forward"] = N * 2 * S * 2 * D * F
    if cfg.arch == "crt":
        d_m = cfg.memory_dim
        parts["memory projection"] = 2 * d_m * D if cfg.memory_position != "none" else 0.0
        reads = T if cfg.memory_reads == "tokens" else 1
        parts["memory RNN"] = _gru(D, d_m, reads)
        if cfg.position_encoding == "recurrent":
            parts["positional RNN"] = _gru(D, D, S)
    if cfg.arch == "armt":
        k, H, d_key = cfg.mem_tokens, cfg.assoc_heads, cfg.assoc_dim
        d_phi = 2 * cfg.assoc_nu * d_key // H  # feature width per head
        # per head the memory is A [d_phi, D/H]; a lookup is phi A (d_phi x D/H) and phi . z (d_phi)
        lookup = 2 * H * d_phi * (D // H + 1)
        read = S * (2 * D * d_key + lookup)  # W_q, then every position looks up
        write = k * (2 * D * d_key + 2 * D * D + 2 * D * H + lookup + 2 * H * d_phi * (D // H))  # W_k, W_v, gate, v_old, k (v - v_old)^T
        parts["associative memory"] = N * (read + write)
    return FlopCount(parts, T)


KNOWN_VOCAB = {"ptb": 10_000, "wikitext-2": 33_278, "wikitext-103": 267_735}


def with_vocab(mcfg: ModelConfig, tcfg: TrainConfig, name: str) -> ModelConfig:
    """mcfg with vocab_size set from the data its preset names (synthetic or a known corpus), without loading it."""
    from crt.config import VIDEO_ARCHS
    from crt.data.memory_tasks import mqar_vocab, passkey_vocab
    from crt.data.synthetic import synthetic_vocab

    if mcfg.arch in VIDEO_ARCHS:
        raise CRTError(f"preset {name} is a frame-sequence classifier ({mcfg.arch}): FLOP counts and speed benchmarks cover the language models only; pick an LM preset")
    if not mcfg.vocab_size:
        if tcfg.data == "synthetic":
            mcfg.vocab_size = len(synthetic_vocab(tcfg.synth_keys, tcfg.synth_values, tcfg.synth_filler_vocab))
        elif tcfg.data == "mqar":
            mcfg.vocab_size = len(mqar_vocab(tcfg.mqar_vocab, tcfg.synth_filler_vocab))
        elif tcfg.data == "passkey":
            mcfg.vocab_size = len(passkey_vocab(tcfg.synth_filler_vocab))
        elif tcfg.data in KNOWN_VOCAB:
            mcfg.vocab_size = KNOWN_VOCAB[tcfg.data]
        else:
            raise CRTError(f"preset {name} reads {tcfg.data} data, whose vocabulary size is unknown: pass --vocab-size")
    return mcfg


def flops_table(rows: list[tuple[str, ModelConfig]], evaluation: bool = False) -> str:
    """A text table: one row per (name, config), FLOPs per token by part, in MFLOP."""
    header = ["preset", "arch", "seg", "fwd/token", "train/token", "fwd/segment"] + list(PARTS)
    lines = []
    for name, cfg in rows:
        f = count_flops(cfg, evaluation)
        seg = f.tokens
        lines.append(
            [name, cfg.arch, str(seg), f"{f.forward_per_token / 1e6:.2f}", f"{f.train_per_token / 1e6:.2f}", f"{f.forward_per_segment / 1e6:.1f}"]
            + [f"{f.parts[p] / f.tokens / 1e6:.2f}" for p in PARTS]
        )
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [fmt(header), "-" * len(fmt(header))] + [fmt(r) for r in lines]
    return "\n".join(out)
