"""One training window: K segments of each row's stream, the state carried through them and
gradients stopped every K segments (`crt.state.iter_segments`, SPEC §2). The state passed in is
used as given: the training loop detaches it between windows of exactly K segments (so every
update covers the last K segments), except after `init_state`, whose learned m_0 must receive
gradients.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from crt.state import iter_segments

IGNORE = -100  # target id that counts for nothing (padding, or a token the loss leaves out)


def training_window(stream: torch.Tensor, w: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of training window w of a batchified stream [B, n]: each [B, window],
    targets shifted by one token. Window w + 1 starts where window w ends, so the carried state
    of each row always continues its own text."""
    return stream[:, w * window : (w + 1) * window], stream[:, w * window + 1 : (w + 1) * window + 1]


def window_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    state: tuple,
    segment_len: int,
    bptt_segments: int,
    scored: torch.Tensor | None = None,
    total: int = 0,
) -> tuple[torch.Tensor, tuple]:
    """Mean next-token cross-entropy over one training window, and the state after it.

    inputs, targets: [B, N] (targets are inputs shifted by one; IGNORE counts for nothing). scored: optional bool [B, N],
    the targets that count (`--loss answers`); default all. total: what the summed loss is
    divided by; 0: the targets that count here (the trainer passes the count of the whole
    global batch, whose rows other micro-batches and processes hold). Logits are scored in fp32 even
    under autocast. The one training step that `crt train`, `crt bench` and the profiler share.
    """
    if scored is not None:
        targets = torch.where(scored, targets, IGNORE)  # [B, N]
    loss_sum = torch.zeros((), device=inputs.device)
    # rebinding `state` keeps the state after the last segment, carried to the next window
    for start, logits, state in iter_segments(model, inputs, state, segment_len, bptt_segments):
        T = logits.shape[1]
        loss_sum = loss_sum + F.cross_entropy(logits.float().flatten(0, 1), targets[:, start : start + T].flatten(), ignore_index=IGNORE, reduction="sum")
    return loss_sum / max(total or int(targets.ne(IGNORE).sum()), 1), state  # the mean over the targets that count
