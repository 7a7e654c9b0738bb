"""Synthetic long-range recall corpus: the embedded default task, no files needed.

Each document stores a few key -> value pairs, buries them under i.i.d. filler, then asks for
every value back:

    <doc> k3 v7 k12 v0 <sep> f5 f19 ... f2 <q> k3 v7 <q> k12 v0 <eos>
          '--- pairs ---'     '-- filler --'   '---- queries ----'

The first round of queries asks the pairs in the order they were given: the memory then has
to carry a short sequence of values one step ahead, a much denser and easier-to-learn signal
than random access by key (shuffled queries stayed at chance within the demo's budget). With
query_rounds=R every pair is asked R times, later rounds each in a fresh random order; only
the first round is marked in `answers`, since later rounds can be copied from the first one
inside a segment and would not measure memory.

Apart from the values (the answers) everything after <sep> is either fixed structure or
uniform filler, so the only way to predict an answer better than chance (1 / values) is to
remember the pair from before the filler. With filler longer than a model's segment, a
segment-limited Transformer sits at chance while a model that carries memory across
segments can reach 100% recall. `Corpus.answers` marks the answer tokens for scoring.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from crt.data.corpus import EOS, Corpus, Documents, Vocab
from crt.errors import CRTError

DOC, QUERY, SEP = "<doc>", "<q>", "<sep>"
_SPECIALS = (EOS, DOC, QUERY, SEP)  # ids 0..3; keys, values and filler follow in that order


GENERATED_DATA = ("synthetic", "mqar", "passkey", "facts")  # corpora built from a seed (facts: from a seed and real text)


@dataclass
class SyntheticOptions:
    """The synthetic recall corpus's fields of TrainConfig (data = synthetic), and the document
    counts every generated task shares."""

    synth_pairs: int = 2  # key->value pairs that open each document
    synth_keys: int = 16  # distinct keys
    synth_values: int = 16  # distinct values
    synth_filler: int = 32  # filler tokens between the pairs and the queries
    synth_filler_vocab: int = 32  # distinct filler tokens
    synth_query_rounds: int = 1  # each round queries every pair once
    synth_train_docs: int = 4000  # documents per split, for every generated task (synthetic, mqar, passkey, facts)
    synth_valid_docs: int = 200
    synth_test_docs: int = 200

    RANGES: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("synth_pairs", "synth_keys", "synth_values", "synth_filler_vocab", "synth_query_rounds"), "[1,"),
        "synth_filler": "[0,",
        **dict.fromkeys(("synth_train_docs", "synth_valid_docs", "synth_test_docs"), "[1,"),
    }
    # field -> (who reads it, test on (ModelConfig, TrainConfig)): for the "--flag does nothing here" warning
    USED_BY: ClassVar[dict] = {
        **dict.fromkeys(
            ("synth_pairs", "synth_keys", "synth_values", "synth_filler", "synth_query_rounds"), ("data = synthetic", lambda m, t: t.data == "synthetic")
        ),
        "synth_filler_vocab": ("data = synthetic, mqar or passkey", lambda m, t: t.data in ("synthetic", "mqar", "passkey")),
        **dict.fromkeys(
            ("synth_train_docs", "synth_valid_docs", "synth_test_docs"),
            ("the generated tasks (synthetic, mqar, passkey, facts)", lambda m, t: t.data in GENERATED_DATA),
        ),
    }


def doc_length(pairs: int, filler: int, query_rounds: int = 1) -> int:
    """Tokens per document: <doc> + 2*pairs + <sep> + filler + 3*pairs*rounds (<q> k v) + <eos>."""
    return 2 * pairs + 3 * pairs * query_rounds + filler + 3


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise a CRTError with the message of the first failed (condition, message) check."""
    for ok, msg in checks:
        if not ok:
            raise CRTError(msg)


def doc_count_checks(train_docs: int, valid_docs: int, test_docs: int) -> list[tuple[bool, str]]:
    return [(n >= 1, f"{s}_docs must be >= 1, got {n}: set --synth-{s}-docs") for s, n in (("train", train_docs), ("valid", valid_docs), ("test", test_docs))]


def synthetic_vocab(keys: int, values: int, filler_vocab: int) -> Vocab:
    """<eos> <doc> <q> <sep>, then k0.., v0.., f0.. (fixed order, so ids depend only on the sizes)."""
    return Vocab([*_SPECIALS, *(f"k{i}" for i in range(keys)), *(f"v{i}" for i in range(values)), *(f"f{i}" for i in range(filler_vocab))])


def split_generator(seed: int, split: str, task: str = "synthetic") -> torch.Generator:
    """One independent random stream per (task, seed, split): hashing all three gives unrelated
    seeds, so valid/test never replay train's documents and seed 1's train is not seed 0's valid."""
    digest = hashlib.sha256(f"crt.{task}:{seed}:{split}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _make_split(
    docs: int, pairs: int, keys: int, values: int, filler: int, filler_vocab: int, query_rounds: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`docs` documents and their answer marks, both [docs, doc_length]."""
    D, P, F, R = docs, pairs, filler, query_rounds
    k0 = len(_SPECIALS)  # first key id
    v0 = k0 + keys  # first value id
    f0 = v0 + values  # first filler id
    key = torch.rand(D, keys, generator=g).argsort(dim=1)[:, :P]  # [D, P] distinct keys per doc
    val = torch.randint(values, (D, P), generator=g)  # [D, P] values may repeat across keys
    fill = torch.randint(filler_vocab, (D, F), generator=g) if F else torch.zeros(D, 0, dtype=torch.long)  # [D, F]
    order = torch.rand(D, R, P, generator=g).argsort(dim=2)  # [D, R, P] a permutation per round
    order[:, 0] = torch.arange(P)  # the first round asks in the order the pairs were given
    order = order.reshape(D, R * P)  # [D, R*P]
    qkey, qval = key.gather(1, order), val.gather(1, order)  # [D, R*P] each

    def col(token_id: int) -> torch.Tensor:
        return torch.full((D, 1), token_id, dtype=torch.long)  # [D, 1]

    pairs_part = torch.stack([key + k0, val + v0], dim=2).view(D, 2 * P)  # [D, 2P] k v k v ...
    query_part = torch.stack([torch.full_like(qkey, _SPECIALS.index(QUERY)), qkey + k0, qval + v0], dim=2).view(D, 3 * R * P)  # [D, 3RP]
    doc = torch.cat([col(_SPECIALS.index(DOC)), pairs_part, col(_SPECIALS.index(SEP)), fill + f0, query_part, col(_SPECIALS.index(EOS))], dim=1)  # [D, L]
    L = doc.shape[1]
    answers = torch.zeros(D, L, dtype=torch.bool)  # [D, L]
    first_query = 2 + 2 * P + F  # position of the first <q>
    answers[:, first_query + 2 : first_query + 3 * P : 3] = True  # the value after each first-round query key
    return doc, answers  # [D, L], [D, L]


def make_synthetic(
    pairs: int = 2,
    keys: int = 16,
    values: int = 16,
    filler: int = 32,
    filler_vocab: int = 32,
    query_rounds: int = 1,
    train_docs: int = 4000,
    valid_docs: int = 200,
    test_docs: int = 200,
    seed: int = 0,
) -> Corpus:
    """The long-range recall corpus (deterministic in all arguments; uses no global RNG state).

    pairs: key -> value pairs per document (distinct keys within a document).
    keys, values: sizes of the key and value alphabets; chance recall is 1 / values.
    filler: i.i.d. filler tokens between the pairs and the queries (the distance to bridge).
    filler_vocab: size of the filler alphabet.
    query_rounds: each round asks for every pair once: the first in pair order, later ones in a
        fresh random order (not scored: they can be copied from the first round in-segment).
        An answer comes 2*pairs + filler + 2 + i tokens after its value (i: its rank) and is
        predicted from the token before it, so with segment_len <= 2*pairs + filler + 1 every
        scored answer's value lies in an earlier segment than the position that predicts it:
        only a model with memory across segments can beat chance (1 / values).
    *_docs: documents per split; every document is doc_length(pairs, filler) tokens.
    """
    checks = [
        (pairs >= 1, f"synthetic pairs must be >= 1, got {pairs}: set --synth-pairs"),
        (keys >= pairs, f"synthetic keys={keys} < pairs={pairs}, but keys must be distinct within a document: raise --synth-keys or lower --synth-pairs"),
        (values >= 1, f"synthetic values must be >= 1, got {values}: set --synth-values"),
        (filler >= 0, f"synthetic filler must be >= 0, got {filler}: set --synth-filler"),
        (query_rounds >= 1, f"synthetic query_rounds must be >= 1, got {query_rounds}: set --synth-query-rounds"),
        (filler_vocab >= 1, f"synthetic filler_vocab must be >= 1, got {filler_vocab}: set --synth-filler-vocab"),
    ]
    require(checks + doc_count_checks(train_docs, valid_docs, test_docs))

    documents = {}
    for split, docs in (("train", train_docs), ("valid", valid_docs), ("test", test_docs)):
        tokens, marks = _make_split(docs, pairs, keys, values, filler, filler_vocab, query_rounds, split_generator(seed, split))
        documents[split] = Documents(tokens, torch.full((docs,), tokens.shape[1]), marks)
    return Corpus.from_documents("synthetic", synthetic_vocab(keys, values, filler_vocab), documents)
