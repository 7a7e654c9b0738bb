"""The one helper that runs a model over a long input segment by segment (SPEC §2).

It splits the input, carries the state from segment to segment and decides where gradients
stop: with `bptt_segments=K` the state is detached before segments K, 2K, ..., so the loss of
a segment back-propagates through itself and at most K - 1 earlier segments. The state passed
in is used as given: the training loop detaches it between windows of exactly K segments (so
every update covers the last K segments), except after `init_state`, whose learned m_0 must
receive gradients.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from crt.state import detach


def iter_segments(
    model: nn.Module,
    tokens: torch.Tensor,
    state: tuple,
    segment_len: int,
    bptt_segments: int = 0,
) -> Iterator[tuple[int, torch.Tensor, tuple]]:
    """Yield (start, logits, state_after) for consecutive segments of `tokens`.

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
