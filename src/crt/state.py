"""The explicit recurrent state every model shares (SPEC §2).

A state is a NamedTuple of tensors whose first dimension is the batch. It is never None and
its structure never changes between calls, which keeps `torch.onnx.export`, `torch.export`
and `torch.compile` simple. Models build it with `model.init_state(batch_size)`.
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import torch

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


class EmptyState(NamedTuple):
    """The state of a model that carries nothing between segments (the segment Transformer)."""
