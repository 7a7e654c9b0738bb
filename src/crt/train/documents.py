"""The document protocol (SPEC §8): memory tasks trained and scored one sample per batch row.

Each row holds one document. Its state starts from `init_state`, its segment grid starts at its
first token, and BPTT runs through the whole document (or K segments). Padding sits after a
row's last token, so under the causal mask and the aligned grid it reaches no scored position:
every segment a document touches before its end is fully its own. This is how RMT, ARMT,
Zoology's MQAR and BABILong train and score memory; the stream protocol (`segments.py`) cuts a
corpus into B endless streams instead, which suits running text.

    loss = "all":      mean next-token cross-entropy over every position of every document
    loss = "answers":  mean over the positions that predict an answer token only
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from crt.data.corpus import Documents
from crt.runtime import autocast
from crt.state import iter_segments
from crt.train.distributed import row_share, world
from crt.train.evaluate import IGNORE, Tally
from crt.train.segments import window_loss


def document_batch(docs: Documents, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and answer marks of the documents `rows` (a LongTensor of indices).

    -> inputs [B, n], targets [B, n] (IGNORE past a document's end), is_answer [B, n] bool,
    with n = the longest chosen document - 1. Position i predicts token i + 1.
    """
    lengths = docs.lengths[rows]  # [B]
    n = int(lengths.max()) - 1
    tokens = docs.tokens[rows, : n + 1]  # [B, n+1]
    inside = torch.arange(1, n + 1).unsqueeze(0) < lengths.unsqueeze(1)  # [B, n] target inside its document
    targets = torch.where(inside, tokens[:, 1:], IGNORE)  # [B, n]
    return tokens[:, :n], targets, docs.answers[rows, 1 : n + 1] & inside


def run_documents(
    model: nn.Module, inputs: torch.Tensor, segment_len: int, bptt_segments: int = 0, evaluation: bool = False
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, logits [B, T, V]) segment by segment for a batch of documents, every row
    from `init_state` and its grid at position 0. bptt_segments: K >= 1 stops gradients every K
    segments; 0 never (the whole document)."""
    state = model.init_state(inputs.shape[0], evaluation=evaluation)
    for start, logits, _ in iter_segments(model, inputs, state, segment_len, bptt_segments):
        yield start, logits


def document_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    is_answer: torch.Tensor,
    segment_len: int,
    bptt_segments: int,
    loss: str,
    total: int = 0,
) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of one batch of documents, each from a fresh state, and the count it averages over.

    inputs, targets, is_answer: [B, n] from `document_batch`. bptt_segments: K >= 1 stops
    gradients every K segments; 0 back-propagates through the whole document. loss: all | answers.
    total: what the summed loss is divided by (`window_loss`); 0: the count here.
    """
    if loss == "answers":
        targets = torch.where(is_answer, targets, IGNORE)  # [B, n] only the answers count
        scored = targets.ne(IGNORE).any(dim=0).nonzero()
        n = int(scored[-1]) + 1 if len(scored) else 1
        inputs, targets = inputs[:, :n], targets[:, :n]  # nothing after the last answer reaches the loss
    loss, _ = window_loss(model, inputs, targets, model.init_state(inputs.shape[0]), segment_len, bptt_segments, total=total)
    return loss, int(targets.ne(IGNORE).sum())


@torch.no_grad()
def evaluate_documents(model: nn.Module, docs: Documents, batch_size: int = 100, segment_len: int | None = None, precision: str = "fp32") -> dict[str, float]:
    """Score every document from a fresh state; the scores of `Tally.result`. Under torchrun each
    process scores a contiguous share of the documents and the sums are reduced.

    segment_len: tokens per call; default the model's evaluation segment length.
    """
    cfg = model.cfg
    segment_len = segment_len or cfg.eval_segment
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tally = Tally()
    w = world()
    mine = row_share(len(docs), w.size, w.rank)  # this process's documents
    with autocast(device, precision):
        for lo in range(mine.start, mine.stop, batch_size):
            inputs, targets, is_answer = (t.to(device) for t in document_batch(docs, torch.arange(lo, min(lo + batch_size, mine.stop))))
            for start, logits in run_documents(model, inputs, segment_len, evaluation=True):
                T = logits.shape[1]
                tally.add(logits, targets[:, start : start + T], is_answer[:, start : start + T])
    model.train(was_training)
    return tally.reduced().result()
