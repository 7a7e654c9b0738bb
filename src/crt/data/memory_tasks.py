"""Long-range memory tasks, generated locally and seeded: how much a memory holds, and for how long.

Three corpora of documents for the document protocol (SPEC §8). Each document is read on a
segment grid that starts at its first token, so where an answer lies relative to its evidence
is a property of the data, not of where a stream happens to cut it.

MQAR across segments (Zoology's multi-query associative recall, queries moved G segments away):

    <doc> k3 v9 k0 v4 ... k7 v1 | filler to the segment's end | G segments of filler | k0 v4 k7 v1 ... <eos>
          '---- P pairs ----'                                                          '- P queries -'

    Keys come from the first half of the key-value vocabulary, values from the second. Every key
    is asked once, in a random order; the value after it is the answer. The first query starts G
    whole segments after the segment that holds the last pair, so only a memory carried across
    at least G + 1 boundaries can answer. Chance: 1 / (vocab / 2).

Passkey retrieval (Mohtashami & Jaggi 2023, in tokens):

    <doc> <key> 4 0 7 1 | D filler tokens | <q> 4 0 7 1 <eos>

    The digits after <q> are the answers (chance 0.1 each); the number of digits sets how much
    must be kept, D how long.

BABILong-style facts (bAbI QA1's single supporting fact, hidden in real text):

    ... text ... mary went to the kitchen . ... text ... mary moved to the office . ... text (>= one segment) ...
    where is mary ? office <eos>

    Facts go in at sentence boundaries of PTB or WikiText text, never in the last segment of text
    before the question. The answer is the asked person's last location, one of six: chance 1/6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from crt.data.corpus import EOS, SPLITS, UNK, Corpus, Documents, Vocab
from crt.data.synthetic import doc_count_checks, require, split_generator
from crt.errors import CRTError

DOC, QUERY, KEY = "<doc>", "<q>", "<key>"
DIGITS = tuple(str(d) for d in range(10))
PEOPLE = ("mary", "john", "daniel", "sandra")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
VERBS = ("went", "moved", "journeyed", "travelled")
FACT_LEN, QUESTION_LEN = 6, 6  # "mary went to the kitchen ." and "where is mary ? kitchen <eos>"


@dataclass
class MemoryTaskOptions:
    """The long-range memory tasks' fields of TrainConfig (data = mqar | passkey | facts)."""

    task_segment: int = 0  # the segment grid mqar and facts are laid on (their distances count these segments); 0: the model's segment_len
    mqar_pairs: int = 4  # P key-value pairs per document
    mqar_gap: int = 1  # G: whole segments of filler between the pairs' segment and the first query; -1: none (queries follow the pairs)
    mqar_vocab: int = 32  # key-value vocabulary: keys are its first half, values its second (chance 2 / mqar_vocab)
    passkey_digits: int = 4  # digits to keep (chance 0.1 a digit)
    passkey_distance: int = 32  # D: filler tokens between the passkey and its query
    facts_count: int = 4  # facts per document (bAbI QA1: the answer is the asked person's last location, chance 1/6)
    facts_length: int = 256  # tokens of real text per document that the facts are hidden in
    facts_words: int = 0  # keep the text's N most frequent training words, the rest become <unk> (a smaller softmax); 0: all of them

    RANGES: ClassVar[dict[str, str]] = {
        "task_segment": "[0,", "mqar_pairs": "[1,", "mqar_gap": "[-1,", "mqar_vocab": "[2,", "passkey_digits": "[1,", "passkey_distance": "[0,",
        "facts_count": "[1,", "facts_length": "[1,", "facts_words": "[0,",
    }  # fmt: skip
    USED_BY: ClassVar[dict] = {
        "task_segment": ("data = mqar or facts", lambda m, t: t.data in ("mqar", "facts")),
        **dict.fromkeys(("mqar_pairs", "mqar_gap", "mqar_vocab"), ("data = mqar", lambda m, t: t.data == "mqar")),
        **dict.fromkeys(("passkey_digits", "passkey_distance"), ("data = passkey", lambda m, t: t.data == "passkey")),
        **dict.fromkeys(("facts_count", "facts_length", "facts_words"), ("data = facts", lambda m, t: t.data == "facts")),
    }


def _doc_counts(train_docs: int, valid_docs: int, test_docs: int) -> dict[str, int]:
    require(doc_count_checks(train_docs, valid_docs, test_docs))
    return dict(zip(SPLITS, (train_docs, valid_docs, test_docs)))


# ---------------------------------------------------------------------------------------------
# MQAR across segments


def mqar_vocab(vocab: int, filler_vocab: int) -> Vocab:
    """<eos> <doc>, then keys k0.., values v0.. (vocab / 2 each), then filler f0.."""
    half = vocab // 2
    return Vocab([EOS, DOC, *(f"k{i}" for i in range(half)), *(f"v{i}" for i in range(half)), *(f"f{i}" for i in range(filler_vocab))])


def mqar_query_start(pairs: int, gap: int, segment: int) -> int:
    """Position of the first query key: G whole segments after the segment of the last pair
    (G = -1: right after the pairs, in their segment where it has room: a warm-up stage)."""
    if gap < 0:
        return 1 + 2 * pairs
    return (math.ceil((1 + 2 * pairs) / segment) + gap) * segment


def mqar_length(pairs: int, gap: int, segment: int) -> int:
    """Tokens per MQAR document."""
    return mqar_query_start(pairs, gap, segment) + 2 * pairs + 1


def make_mqar(
    pairs: int = 4,
    gap: int = 1,
    vocab: int = 32,
    segment: int = 16,
    filler_vocab: int = 32,
    train_docs: int = 4000,
    valid_docs: int = 200,
    test_docs: int = 200,
    seed: int = 0,
) -> Corpus:
    """Multi-query associative recall with the queries G segments after the pairs (deterministic in all arguments).

    pairs: P key-value pairs per document (distinct keys; values drawn with replacement).
    gap: G >= 0 whole segments of filler between the last pair's segment and the first query;
        -1: the queries follow the pairs at once (in-segment where they fit: the format without
        the memory, the first stage of a curriculum).
    vocab: size of the key-value vocabulary; keys are its first half, values its second.
    segment: the segment length the grid is laid on (the model's segment_len).
    filler_vocab: size of the filler alphabet (disjoint from keys and values).
    """
    half = vocab // 2
    require(
        [
            (pairs >= 1, f"mqar pairs must be >= 1, got {pairs}: set --mqar-pairs"),
            (gap >= -1, f"mqar gap must be >= 0 segments (or -1: no gap), got {gap}: set --mqar-gap"),
            (vocab >= 2 and vocab % 2 == 0, f"mqar vocab must be an even number >= 2 (keys and values take half each), got {vocab}: set --mqar-vocab"),
            (
                half >= pairs,
                f"mqar vocab={vocab} gives {half} keys, fewer than pairs={pairs}, and keys are distinct within a document: raise --mqar-vocab to >= {2 * pairs}",
            ),
            (segment >= 1, f"mqar segment must be >= 1, got {segment}: set --task-segment"),
            (filler_vocab >= 1, f"filler_vocab must be >= 1, got {filler_vocab}: set --synth-filler-vocab"),
        ]
    )
    P, q0 = pairs, mqar_query_start(pairs, gap, segment)
    L = q0 + 2 * P + 1
    k0, v0, f0 = 2, 2 + half, 2 + vocab  # first key, value and filler ids
    documents = {}
    for split, D in _doc_counts(train_docs, valid_docs, test_docs).items():
        g = split_generator(seed, split, "mqar")
        key = torch.rand(D, half, generator=g).argsort(dim=1)[:, :P]  # [D, P] distinct keys
        val = torch.randint(half, (D, P), generator=g)  # [D, P]
        order = torch.rand(D, P, generator=g).argsort(dim=1)  # [D, P] the order of the queries
        tokens = f0 + torch.randint(filler_vocab, (D, L), generator=g)  # [D, L] filler everywhere, then the structure on top
        tokens[:, 0] = 1  # <doc>
        tokens[:, 1 : 1 + 2 * P : 2], tokens[:, 2 : 2 + 2 * P : 2] = key + k0, val + v0
        tokens[:, q0 : q0 + 2 * P : 2], tokens[:, q0 + 1 : q0 + 1 + 2 * P : 2] = key.gather(1, order) + k0, val.gather(1, order) + v0
        tokens[:, -1] = 0  # <eos>
        answers = torch.zeros(D, L, dtype=torch.bool)  # [D, L]
        answers[:, q0 + 1 : q0 + 1 + 2 * P : 2] = True  # the value after each query key
        documents[split] = Documents(tokens, torch.full((D,), L), answers)
    return Corpus.from_documents("mqar", mqar_vocab(vocab, filler_vocab), documents)


# ---------------------------------------------------------------------------------------------
# passkey retrieval


def passkey_vocab(filler_vocab: int) -> Vocab:
    """<eos> <doc> <key> <q>, the digits 0-9, then filler f0.."""
    return Vocab([EOS, DOC, KEY, QUERY, *DIGITS, *(f"f{i}" for i in range(filler_vocab))])


def passkey_length(digits: int, distance: int) -> int:
    """Tokens per passkey document: <doc> <key> digits, D filler, <q> digits <eos>."""
    return 2 * digits + distance + 4


def make_passkey(
    digits: int = 4,
    distance: int = 32,
    filler_vocab: int = 32,
    train_docs: int = 4000,
    valid_docs: int = 200,
    test_docs: int = 200,
    seed: int = 0,
) -> Corpus:
    """Passkey retrieval (deterministic in all arguments).

    digits: length of the passkey (each digit uniform in 0-9, so chance is 0.1 a digit).
    distance: D filler tokens between the passkey's last digit and the query <q>.
    filler_vocab: size of the i.i.d. filler alphabet.
    """
    require(
        [
            (digits >= 1, f"passkey digits must be >= 1, got {digits}: set --passkey-digits"),
            (distance >= 0, f"passkey distance must be >= 0 tokens, got {distance}: set --passkey-distance"),
            (filler_vocab >= 1, f"filler_vocab must be >= 1, got {filler_vocab}: set --synth-filler-vocab"),
        ]
    )
    n, L = digits, passkey_length(digits, distance)
    d0, f0 = 4, 4 + len(DIGITS)  # first digit and filler ids
    q = 2 + n + distance  # position of <q>
    documents = {}
    for split, D in _doc_counts(train_docs, valid_docs, test_docs).items():
        g = split_generator(seed, split, "passkey")
        key = torch.randint(10, (D, n), generator=g)  # [D, n]
        tokens = f0 + torch.randint(filler_vocab, (D, L), generator=g)  # [D, L]
        tokens[:, 0], tokens[:, 1], tokens[:, q], tokens[:, -1] = 1, 2, 3, 0  # <doc> <key> ... <q> ... <eos>
        tokens[:, 2 : 2 + n], tokens[:, q + 1 : q + 1 + n] = key + d0, key + d0
        answers = torch.zeros(D, L, dtype=torch.bool)  # [D, L]
        answers[:, q + 1 : q + 1 + n] = True
        documents[split] = Documents(tokens, torch.full((D,), L), answers)
    return Corpus.from_documents("passkey", passkey_vocab(filler_vocab), documents)


# ---------------------------------------------------------------------------------------------
# BABILong-style facts in real text


def facts_vocab(text: Vocab) -> Vocab:
    """The text's vocabulary (ids unchanged) with the fact and question words it lacks appended."""
    vocab = Vocab(text.itos)
    for word in (*PEOPLE, *LOCATIONS, *VERBS, "to", "the", ".", "where", "is", "?", EOS):
        vocab.add(word)
    return vocab


def facts_length_of(count: int, length: int) -> int:
    """Tokens per fact document: the text, its facts and the question with its answer."""
    return length + FACT_LEN * count + QUESTION_LEN


def most_frequent_words(text: Corpus, words: int) -> Corpus:
    """The text with only its `words` most frequent training words kept and every other word
    mapped to <unk> (appended if the text lacks it); ids in order of frequency. The text's
    <eos> is always kept, so sentence boundaries survive. A text with at most `words` words
    comes back unchanged."""
    if words >= len(text.vocab):
        return text
    counts = torch.bincount(text.split("train"), minlength=len(text.vocab))  # [V]
    if EOS in text.vocab:
        counts[text.vocab.stoi[EOS]] = counts.max() + 1
    keep = counts.argsort(descending=True, stable=True)[:words]  # [words] old ids, most frequent first
    itos = [text.vocab.itos[i] for i in keep.tolist()]
    unk = itos.index(UNK) if UNK in itos else len(itos)
    if unk == len(itos):
        itos.append(UNK)
    remap = torch.full((len(text.vocab),), unk, dtype=torch.long)  # [V] old id -> new id
    remap[keep] = torch.arange(len(keep))
    return Corpus(text.name, Vocab(itos), **{split: remap[text.split(split)] for split in SPLITS})


def make_facts(
    text: Corpus,
    count: int = 4,
    length: int = 256,
    segment: int = 16,
    train_docs: int = 4000,
    valid_docs: int = 200,
    test_docs: int = 200,
    seed: int = 0,
) -> Corpus:
    """Single-supporting-fact questions over facts hidden in real text (deterministic in all arguments).

    text: a running-text corpus (PTB, WikiText); each split's documents take their text from
        the same split, at random offsets.
    count: facts per document: a random person goes to a random location. The question asks
        for one of the people mentioned; the answer is where that person went last.
    length: tokens of text per document, the facts go in at sentence boundaries (after an
        <eos>; anywhere when the window has too few) among its first length - segment tokens,
        so the question is at least one segment after every fact.
    segment: the segment length the grid is laid on (the model's segment_len).
    """
    require(
        [
            (count >= 1, f"facts count must be >= 1, got {count}: set --facts-count"),
            (segment >= 1, f"facts segment must be >= 1, got {segment}: set --task-segment"),
            (
                length >= segment + count,
                f"facts length={length} leaves no room for {count} facts at least one segment ({segment}) before the question: raise --facts-length to >= {segment + count}",
            ),
        ]
    )
    vocab = facts_vocab(text.vocab)
    ids = {w: vocab.stoi[w] for w in (*PEOPLE, *LOCATIONS, *VERBS, "to", "the", ".", "where", "is", "?", EOS)}
    eos = ids[EOS]
    L = facts_length_of(count, length)
    documents = {}
    for split, D in _doc_counts(train_docs, valid_docs, test_docs).items():
        stream = text.split(split)
        if len(stream) < length:
            raise CRTError(f"the {split} text has {len(stream):,} tokens, fewer than facts_length={length:,}: lower --facts-length or use a larger corpus")
        g = split_generator(seed, split, "facts")
        tokens = torch.empty(D, L, dtype=torch.long)  # [D, L]
        answers = torch.zeros(D, L, dtype=torch.bool)  # [D, L]
        starts = torch.randint(len(stream) - length + 1, (D,), generator=g)  # [D]
        who = torch.randint(len(PEOPLE), (D, count), generator=g)  # [D, count]
        where = torch.randint(len(LOCATIONS), (D, count), generator=g)  # [D, count]
        how = torch.randint(len(VERBS), (D, count), generator=g)  # [D, count]
        asked = torch.rand(D, count, generator=g)  # [D, count] the person asked: the mentioned one with the largest draw
        spots = torch.rand(D, length - segment + 1, generator=g)  # [D, room] random priorities of the insertion points
        for d in range(D):
            window = stream[int(starts[d]) : int(starts[d]) + length]  # [length]
            room = length - segment + 1  # insertion points 0 .. length - segment (before text token i)
            boundary = torch.zeros(room, dtype=torch.bool)
            boundary[0] = True
            boundary[1:] = window[: room - 1] == eos
            priority = spots[d] + boundary.float() * (2.0 if int(boundary.sum()) >= count else 0.0)  # boundaries first when there are enough
            points = priority.topk(count).indices.sort().values.tolist()  # facts in text order
            pieces, last = [], 0
            for i, p in enumerate(points):
                pieces += [
                    window[last:p],
                    torch.tensor([ids[PEOPLE[who[d, i]]], ids[VERBS[how[d, i]]], ids["to"], ids["the"], ids[LOCATIONS[where[d, i]]], ids["."]]),
                ]
                last = p
            person = int(who[d, int(asked[d].argmax())])
            answer = LOCATIONS[int(where[d][(who[d] == person).nonzero()[-1]])]  # the person's last location
            pieces += [window[last:], torch.tensor([ids["where"], ids["is"], ids[PEOPLE[person]], ids["?"], ids[answer], eos])]
            tokens[d] = torch.cat(pieces)
        answers[:, L - 2] = True  # the location after "?"
        documents[split] = Documents(tokens, torch.full((D,), L), answers)
    return Corpus.from_documents(f"facts-{text.name}", vocab, documents)
