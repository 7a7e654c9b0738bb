"""Perplexity over a whole split with the state carried across every segment (SPEC §3.6).

Under torchrun each process scores its contiguous share of the split's rows and the sums are
reduced (`Tally.reduced`): the split is scored once, and its scores do not depend on the world size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from crt.data.tokenizer import bits_per_byte
from crt.runtime import autocast
from crt.state import iter_segments
from crt.train.distributed import all_reduce_sum, row_share, world
from crt.train.segments import IGNORE


def streams(data: torch.Tensor, batch_size: int, answers: torch.Tensor | None = None):
    """Cut a split into `batch_size` contiguous streams of (input, target) pairs.

    Unlike the usual batchify nothing is dropped: inputs = data[:-1], targets = data[1:],
    split into B rows of ceil((N-1)/B) and the tail of the last row padded with targets that
    are ignored. Every one of the N - 1 predictable tokens is scored exactly once.

    data: [N]  ->  inputs [B, n], targets [B, n], is_answer [B, n] bool
    """
    inputs, targets = data[:-1], data[1:].clone()  # [N-1]
    is_answer = answers[1:] if answers is not None else torch.zeros_like(targets, dtype=torch.bool)  # [N-1]
    n = math.ceil(len(inputs) / batch_size)
    pad = n * batch_size - len(inputs)
    inputs = F.pad(inputs, (0, pad), value=0).view(batch_size, n)  # [B, n]
    targets = F.pad(targets, (0, pad), value=IGNORE).view(batch_size, n)  # [B, n]
    is_answer = F.pad(is_answer, (0, pad), value=False).view(batch_size, n)  # [B, n]
    return inputs, targets, is_answer


class Tally:
    """Running sums of next-token scores over the segments of a split.

    token_bytes: [V] UTF-8 bytes of each token id (`Corpus.token_bytes`), to sum the bytes of
    the scored text for bits per byte; None (words) leaves `bytes` at 0 and bpb undefined.
    """

    def __init__(self, token_bytes: torch.Tensor | None = None):
        self.nll, self.count, self.answer_nll, self.hits, self.answers, self.bytes = 0.0, 0, 0.0, 0, 0, 0
        self.token_bytes = token_bytes

    def add(self, logits: torch.Tensor, targets: torch.Tensor, is_answer: torch.Tensor) -> None:
        """logits [B, T, V], targets [B, T] (IGNORE counts for nothing), is_answer [B, T] bool."""
        logits = logits.float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none").view_as(targets)  # [B, T]
        self.nll += nll.sum().item()
        scored = targets.ne(IGNORE)  # [B, T]
        self.count += int(scored.sum())
        if self.token_bytes is not None:
            self.bytes += int(self.token_bytes[targets[scored]].sum())
        self.answer_nll += nll[is_answer].sum().item()
        self.hits += int(((logits.argmax(-1) == targets) & is_answer).sum())
        self.answers += int(is_answer.sum())

    def reduced(self) -> Tally:
        """The sums of every process's tally (in one process: this tally)."""
        names = [n for n, v in vars(self).items() if isinstance(v, (int, float))]  # the running sums, not token_bytes
        for name, total in zip(names, all_reduce_sum([float(getattr(self, n)) for n in names])):
            setattr(self, name, type(getattr(self, name))(total))
        return self

    def result(self) -> dict[str, float]:
        """loss (mean NLL over every scored token, nats), ppl, tokens, recall (share of answers
        predicted by argmax; nan without answers), answers (their count), answer_loss (their mean
        NLL), bytes (UTF-8 bytes of the scored tokens; 0 for words) and bpb (bits per byte: total
        NLL / ln 2 / bytes, comparable across tokenizers; nan without bytes)."""
        loss = self.nll / max(self.count, 1)
        nan = float("nan")
        return {
            "loss": loss,
            "ppl": math.exp(min(loss, 700.0)),
            "tokens": self.count,
            "recall": self.hits / self.answers if self.answers else nan,
            "answers": self.answers,
            "answer_loss": self.answer_nll / self.answers if self.answers else nan,
            "bytes": self.bytes,
            "bpb": bits_per_byte(self.nll, self.bytes),
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: torch.Tensor,
    batch_size: int = 10,
    segment_len: int | None = None,
    stride: int = 0,
    answers: torch.Tensor | None = None,
    precision: str = "fp32",
    max_tokens: int = 0,
    token_bytes: torch.Tensor | None = None,
) -> dict[str, float]:
    """Score every token of `data`; the scores of `Tally.result`.

    segment_len: tokens per call; default the model's evaluation segment length.
    stride: 0 streams non-overlapping segments with the state carried from one to the next.
        s > 0 uses a sliding window (for models without memory): each call sees up to
        segment_len tokens and scores only its last s, so every token has at least
        segment_len - s tokens of context (except at the start of a stream).
    answers: bool [N] marking answer tokens; recall = share of them predicted by argmax.
    max_tokens: score only the first max_tokens + 1 tokens of data (0: all).
    token_bytes: [V] UTF-8 bytes of each id, for bits per byte (`Tally`).
    """
    cfg = model.cfg
    segment_len = segment_len or cfg.eval_segment
    if max_tokens:
        data = data[: max_tokens + 1]
        answers = answers[: max_tokens + 1] if answers is not None else None
    batch_size = max(1, min(batch_size, len(data) - 1))
    device = next(model.parameters()).device
    w = world()
    mine = row_share(batch_size, w.size, w.rank)  # this process's rows (all of them in one process)
    inputs, targets, is_answer = (t[mine].to(device) for t in streams(data, batch_size, answers))
    rows = inputs.shape[0]  # 0 on a process left without rows (fewer rows than processes)
    was_training = model.training
    model.eval()
    tally = Tally(token_bytes.to(device) if token_bytes is not None else None)
    with autocast(device, precision):
        if not rows:
            pass
        elif stride:
            n = inputs.shape[1]
            for c in range(0, n, stride):
                lo = max(0, c + stride - segment_len)  # window [lo, c + stride) of at most segment_len tokens
                logits, _ = model(inputs[:, lo : c + stride], model.init_state(rows, evaluation=True))
                tally.add(logits[:, c - lo :], targets[:, c : c + stride], is_answer[:, c : c + stride])
        else:
            state = model.init_state(rows, evaluation=True)
            for start, logits, _ in iter_segments(model, inputs, state, segment_len):
                T = logits.shape[1]
                tally.add(logits, targets[:, start : start + T], is_answer[:, start : start + T])
    model.train(was_training)
    return tally.reduced().result()
