"""Token-by-token inference over an unbounded stream: the state a model carries, one token at a time.

`open_stream(model)` returns a `Stream` with `feed(tokens [B]) -> logits [B, V]`: the logits
after each token, equal to those of running `model(tokens, state)` over whole segments with the
state carried (tests/test_stream.py), whatever the number of tokens fed so far.

The driver knows no model. Each language model owns its incremental maths beside its
`forward`, in its own file:

    segment = model.open_segment(state)       # caches, and what opens a segment (CRT's memory token, RMT's read copy)
    logits  = model.step(segment, tokens)     # one position through the layers, never a re-run of the segment
    state   = model.close_segment(segment)    # after L tokens: what the segment wrote (m_n, M_n, A_n, XL's memory)

Segments are cfg.eval_segment_len (or segment_len) tokens long, as in `crt eval`. Memory use is
one segment's keys and values (XL: its memory plus one segment) and the state: independent of
the stream's length.

`open_stream(model, runtime=...)` picks who runs those methods: "torch" (this eager `Stream`),
"onnxruntime" (`crt.infer.token_runtime.TokenRuntime`: the same methods exported with
fixed-size caches, checked against PyTorch, several times faster per token) or "auto"
(onnxruntime where it is installed and the model supported, else this `Stream`, saying why).
Either says what it is in `.runtime`. `open_segments` makes the same choice for whole segments
(`crt score`): `Segments` in PyTorch or `crt.infer.token_runtime.SegmentRuntime`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from crt.errors import CRTError

STEP_METHODS = ("open_segment", "step", "close_segment")
RUNTIMES = ("auto", "onnxruntime", "torch")


class Stream:
    """A model fed one token at a time.

    model: a crt language model (put in eval mode: dropout would make the stream differ from the
    segment path). batch_size: parallel streams B.
    """

    def __init__(self, model: nn.Module, batch_size: int = 1):
        if not all(callable(getattr(model, m, None)) for m in STEP_METHODS):
            raise CRTError(f"{type(model).__name__} has no token-by-token stream; stream a language model (crt, transformer, transformer_xl, rmt, armt)")
        self.model, self.cfg = model.eval(), model.cfg
        self.runtime = "PyTorch eager stream"  # what runs the steps, for the user
        self.segment_len = self.cfg.eval_segment
        self.state = model.init_state(batch_size, evaluation=True)
        self._open()

    @torch.no_grad()
    def _open(self) -> None:
        self.segment, self.fed = self.model.open_segment(self.state), 0

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> logits [B, V] for the next token."""
        logits = self.model.step(self.segment, tokens.view(-1))  # [B, V]
        self.fed += 1
        if self.fed == self.segment_len:
            self.state = self.model.close_segment(self.segment)
            self._open()
        return logits


def open_stream(model: nn.Module, batch_size: int = 1, runtime: str = "torch"):
    """The incremental stream of a crt language model (CRT, Transformer, Transformer-XL, RMT, ARMT):
    a `Stream` or a `TokenRuntime`, both with feed(tokens [B]) -> logits [B, V] and `.runtime`.

    runtime: torch | onnxruntime (CRTError when it cannot run this model) | auto (onnxruntime,
    else the eager Stream with the reason in its `.runtime`).
    """
    return _open(Stream, "TokenRuntime", model, batch_size, runtime)


class Segments:
    """A model over consecutive segments with its state carried: __call__(tokens [B, T]) ->
    logits [B, T, V], T <= the segment length (what `crt score` runs)."""

    def __init__(self, model: nn.Module, batch_size: int = 1):
        self.model, self.runtime = model.eval(), "PyTorch eager, whole segments"
        self.state = model.init_state(batch_size, evaluation=True)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, self.state = self.model(tokens, self.state)  # [B, T, V]
        return logits


def open_segments(model: nn.Module, batch_size: int = 1, runtime: str = "torch"):
    """`Segments` of `model`, or their onnxruntime form (`SegmentRuntime`); runtime as in `open_stream`."""
    return _open(Segments, "SegmentRuntime", model, batch_size, runtime)


def _open(eager, fast: str, model: nn.Module, batch_size: int, runtime: str):
    """eager(model, batch_size), or token_runtime.<fast> for runtime onnxruntime, or the latter
    falling back to the former (which then says why) for auto."""
    if runtime not in RUNTIMES:
        raise CRTError(f"unknown runtime {runtime!r}: use {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return eager(model, batch_size)
    from crt.infer import token_runtime

    try:
        return getattr(token_runtime, fast)(model, batch_size)
    except CRTError as e:
        if runtime == "onnxruntime":
            raise
        fallback = eager(model, batch_size)
        fallback.runtime += f" (onnxruntime cannot run it: {e})"
        return fallback
