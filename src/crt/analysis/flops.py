"""FLOP counts for every language-model config (SPEC §6): each model counts its own parts in its
`flops` (beside its maths, from `crt.layers.blocks_flops` and `gru_flops`); this module adds the
LM head, sums them and prints the table.

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


def count_flops(cfg: ModelConfig, evaluation: bool = False) -> FlopCount:
    """FLOPs of one full segment (training or evaluation lengths) of the model `cfg` describes:
    the model's own count (its `flops`, beside its maths) and the LM head over the T tokens."""
    from crt.models import MODELS

    model = MODELS[cfg.validate().arch]
    if not hasattr(model, "flops"):
        raise CRTError(f"{cfg.arch} has no FLOP count: FLOP counts cover the language models only")
    T = cfg.eval_segment if evaluation else cfg.segment_len
    parts = dict.fromkeys(PARTS, 0.0)
    parts.update(model.flops(cfg, T, evaluation))
    parts["LM head"] = 2 * T * cfg.d_model * cfg.vocab_size
    return FlopCount(parts, T)


KNOWN_VOCAB = {"ptb": 10_000, "wikitext-2": 33_278, "wikitext-103": 267_735}


def with_vocab(mcfg: ModelConfig, tcfg: TrainConfig, name: str) -> ModelConfig:
    """mcfg with vocab_size set from the data its preset names (synthetic or a known corpus), without loading it."""
    from crt.data.memory_tasks import mqar_vocab, passkey_vocab
    from crt.data.synthetic import synthetic_vocab
    from crt.models import VIDEO_ARCHS

    if mcfg.arch in VIDEO_ARCHS:
        raise CRTError(
            f"preset {name} is a frame-sequence classifier ({mcfg.arch}): FLOP counts and speed benchmarks cover the language models only; pick an LM preset"
        )
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
