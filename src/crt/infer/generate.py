"""Sampling text from a language model one token at a time, and scoring an unbounded stream."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from crt.data.tokenizer import bits_per_byte
from crt.infer.stream import open_segments, open_stream


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens from logits [B, V] -> [B].

    temperature 0: argmax (greedy). Else softmax(logits / temperature) restricted to the top_k
    most likely tokens (0: all) and to the smallest set whose probability reaches top_p
    (nucleus sampling; 1: all), renormalised.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.double()  # float64: a tiny temperature or top_p stays representable
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature  # [B, V]; the top logit is 0, so dividing cannot overflow it
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)  # [B, V]
        beyond = probs.cumsum(dim=-1) - probs >= top_p  # the more likely tokens already reach top_p (never the top one)
        drop = torch.zeros_like(beyond).scatter(-1, order, beyond)  # back to vocabulary order
        logits = logits.masked_fill(drop, -math.inf)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)  # [B]


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    latencies: list[float] | None = None,
    stream=None,
) -> list[int]:
    """Feed `prompt` (>= 1 token ids), then sample `max_new_tokens` tokens, each fed back in.

    Seeded: the same seed gives the same tokens. latencies: if given, receives the seconds each
    generated token took (sampling plus feeding it back in). stream: a fresh batch-1 stream of
    `model` to feed (`open_stream(model, 1, runtime)`; default: the eager one).
    """
    if not prompt:
        raise ValueError("the prompt needs at least one token")
    device = next(model.parameters()).device
    stream = stream if stream is not None else open_stream(model, batch_size=1)
    generator = torch.Generator(device=device).manual_seed(seed)
    for token in prompt:
        logits = stream.feed(torch.tensor([token], device=device))  # [1, V]
    out = []
    for _ in range(max_new_tokens):
        start = time.perf_counter()
        token = sample(logits, temperature, top_k, top_p, generator)  # [1]
        logits = stream.feed(token)
        if latencies is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the kernels run asynchronously: time them, not their launch
            latencies.append(time.perf_counter() - start)
        out.append(int(token))
    return out


@torch.no_grad()
def score_stream(
    model: nn.Module, tokens: Iterable[int], report_every: int = 0, segments=None, token_bytes: torch.Tensor | None = None
) -> Iterator[dict[str, float]]:
    """Running perplexity of a token stream of any length, one segment in memory at a time.

    Every token after the first is scored from everything before it (the state carried over
    segment boundaries): `crt eval` with --eval-batch-size 1 scores the same tokens the same way
    (its default of several parallel streams restarts the state at each stream's start). Yields {tokens, loss, ppl} after every
    `report_every` scored tokens (0: only at the end), and always once at the end; with
    token_bytes ([V] UTF-8 bytes of each id) also bpb, bits per byte of the scored tokens (else nan).
    segments: a fresh batch-1 `open_segments(model, 1, runtime)` to run (default: PyTorch's).
    """
    device = next(model.parameters()).device
    model.eval()
    L = model.cfg.eval_segment
    segments = segments if segments is not None else open_segments(model, 1)
    previous = None  # [V] logits after the last token of the previous segment
    nll, count, n_bytes, next_report = 0.0, 0, 0, report_every
    segment: list[int] = []

    def run(segment: list[int]) -> None:
        nonlocal previous, nll, count, n_bytes
        x = torch.tensor([segment], device=device)  # [1, T]
        logits = segments(x)[0].float()  # [T, V]
        scored = logits[:-1] if previous is None else torch.cat([previous.unsqueeze(0), logits[:-1]])  # predictions of x[1:] (and x[0])
        targets = x[0, 1:] if previous is None else x[0]
        nll += F.cross_entropy(scored, targets, reduction="sum").item()
        count += len(targets)
        n_bytes += int(token_bytes[targets.cpu()].sum()) if token_bytes is not None else 0
        previous = logits[-1]

    def report() -> dict[str, float]:
        loss = nll / max(count, 1)
        return {"tokens": count, "loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": bits_per_byte(nll, n_bytes)}  # exp overflows beyond ~709

    for token in tokens:
        segment.append(token)
        if len(segment) == L:
            run(segment)
            segment = []
            if report_every and count >= next_report:
                next_report += report_every
                yield report()
    if segment:
        run(segment)
    yield report()
