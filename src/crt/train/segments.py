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
import torch.nn.functional as F

from crt.state import detach

IGNORE = -100  # target id that counts for nothing (padding, or a token the loss leaves out)


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


def training_window(stream: torch.Tensor, w: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of training window w of a batchified stream [B, n]: each [B, window],
    targets shifted by one token. Window w + 1 starts where window w ends, so the carried state
    of each row always continues its own text."""
    return stream[:, w * window : (w + 1) * window], stream[:, w * window + 1 : (w + 1) * window + 1]


def window_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, state: tuple, segment_len: int, bptt_segments: int, scored: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple]:
    """Mean next-token cross-entropy over one training window, and the state after it.

    inputs, targets: [B, N] (targets are inputs shifted by one; IGNORE counts for nothing). scored: optional bool [B, N],
    the targets that count (`--loss answers`); default all. Logits are scored in fp32 even
    under autocast. The one training step that `crt train`, `crt bench` and the profiler share.
    """
    if scored is not None:
        targets = torch.where(scored, targets, IGNORE)  # [B, N]
    loss_sum = torch.zeros((), device=inputs.device)
    # rebinding `state` keeps the state after the last segment, carried to the next window
    for start, logits, state in iter_segments(model, inputs, state, segment_len, bptt_segments):
        T = logits.shape[1]
        loss_sum = loss_sum + F.cross_entropy(logits.float().flatten(0, 1), targets[:, start : start + T].flatten(), ignore_index=IGNORE, reduction="sum")
    return loss_sum / max(int(targets.ne(IGNORE).sum()), 1), state  # the mean over the targets that count
