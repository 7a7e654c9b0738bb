"""The explicit recurrent state every model shares (SPEC §2).

A state is a NamedTuple of tensors whose first dimension is the batch. It is never None and
its structure never changes between calls, which keeps `torch.onnx.export`, `torch.export`
and `torch.compile` simple. Models build it with `model.init_state(batch_size)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, TypeVar

import torch
import torch.nn as nn

S = TypeVar("S", bound=tuple)


def detach(state: S) -> S:
    """Stop gradients at this point of the recurrence (truncated BPTT)."""
    return type(state)(*(t.detach() for t in state))


def reset_rows(state: S, fresh: S, mask: torch.Tensor) -> S:
    """Start a new document in the rows where `mask` is True, leave the others untouched.

    state, fresh: states of the same structure (fresh usually `model.init_state(B)`).
    mask: bool [B].
    """
    out = []
    for old, new in zip(state, fresh):
        m = mask.to(old.device).view(-1, *([1] * (old.dim() - 1)))  # [B, 1, ...]
        out.append(torch.where(m, new.to(old.dtype), old))
    return type(state)(*out)


def iter_segments(
    model: nn.Module,
    tokens: torch.Tensor,
    state: tuple,
    segment_len: int,
    bptt_segments: int = 0,
) -> Iterator[tuple[int, torch.Tensor, tuple]]:
    """Yield (start, logits, state_after) for consecutive segments of `tokens`, the state carried
    from each segment to the next: the one loop that runs a model over a long input.

    tokens: [B, N]; the last segment may be shorter than segment_len.
    logits: [B, T, V] for tokens[:, start:start+T].
    bptt_segments: K >= 1 detaches the state before segments K, 2K, ...; 0 never detaches (inference,
        or a caller that detaches itself).
    """
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    for i, start in enumerate(range(0, tokens.shape[1], segment_len)):
        if bptt_segments and i and i % bptt_segments == 0:
            state = detach(state)
        logits, state = model(tokens[:, start : start + segment_len], state)  # [B, T, V]
        yield start, logits, state


class EmptyState(NamedTuple):
    """The state of a model that carries nothing between segments (the segment Transformer)."""
