"""How `crt eval` scores one split of a language model's corpus: by documents, each from a fresh
state, or as one stream with the state carried (optionally a sliding window), as the run's
protocol says."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch.nn as nn

from crt.config import ModelConfig, TrainConfig
from crt.data import Corpus
from crt.errors import CRTError
from crt.train.documents import evaluate_documents
from crt.train.evaluate import evaluate
from crt.train.loop import resolve_protocol


def split_scorer(corpus: Corpus, split: str, mcfg: ModelConfig, tcfg: TrainConfig, cap_given: bool) -> tuple[Callable[[nn.Module, str], dict], str]:
    """(score(model, precision) -> `Tally.result` scores, a one-line account of how it scores).

    cap_given: the user asked for --eval-max-tokens; otherwise a run's cap on its periodic
    validation is dropped and the whole split is scored.
    """
    seg = mcfg.eval_segment
    if resolve_protocol(tcfg, corpus) == "document":
        if not corpus.documents:
            raise CRTError(f"--protocol document needs a corpus of separate documents, and {corpus.name} is running text: use --protocol stream")
        if mcfg.eval_stride:
            raise CRTError("--eval-stride is for the stream protocol: documents are scored segment by segment from a fresh state")
        if cap_given:
            raise CRTError("--eval-max-tokens caps a stream, and this split is scored as documents, each whole: drop it (or give --protocol stream)")
        docs = corpus.documents[split]

        def score(model: nn.Module, precision: str) -> dict:
            return evaluate_documents(model, docs, tcfg.eval_batch_size, precision=precision)

        return score, f"{len(docs):,} documents, each from a fresh state, segments of {seg} from its first token"
    data = getattr(corpus, split)
    cap = tcfg.eval_max_tokens if cap_given or not (tcfg.eval_max_tokens and tcfg.eval_max_tokens + 1 < len(data)) else 0
    tcfg = dataclasses.replace(tcfg, eval_max_tokens=cap)

    def score(model: nn.Module, precision: str) -> dict:
        return evaluate(
            model,
            data,
            tcfg.eval_batch_size,
            stride=mcfg.eval_stride,
            answers=corpus.answers.get(split),
            precision=precision,
            max_tokens=tcfg.eval_max_tokens,
            token_bytes=corpus.token_bytes,
        )

    mode = f"sliding window {seg}, stride {mcfg.eval_stride}" if mcfg.eval_stride else f"segments of {seg}, state carried"
    if tcfg.eval_max_tokens and tcfg.eval_max_tokens + 1 < len(data):
        mode += f"; only the first {tcfg.eval_max_tokens:,} of {len(data) - 1:,} tokens (--eval-max-tokens)"
    return score, mode
