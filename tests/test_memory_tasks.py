"""crt.data.memory_tasks: MQAR across segments, passkey retrieval, facts in real text; and a short
run where CRT's memory solves passkey two segments away while the segment Transformer cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crt.config import ModelConfig, Stage, TrainConfig
from crt.data import Corpus, load_words
from crt.data.memory_tasks import LOCATIONS, PEOPLE, VERBS, make_facts, make_mqar, make_passkey, most_frequent_words, mqar_length, passkey_length
from crt.errors import CRTError
from tests.cli_helpers import cli, refused


def docs_of(corpus: Corpus, split: str = "train"):
    d = corpus.documents[split]
    return [(d.tokens[i, : d.lengths[i]], d.answers[i, : d.lengths[i]]) for i in range(len(d))]


# ---------------------------------------------------------------------------------------------
# MQAR


@pytest.mark.parametrize("pairs, gap, segment, vocab", [(1, 0, 8, 8), (3, 1, 8, 32), (8, 2, 4, 16), (16, 3, 16, 32), (5, 0, 11, 64)])
def test_mqar_answers_lie_g_whole_segments_after_their_keys(pairs, gap, segment, vocab):
    c = make_mqar(pairs=pairs, gap=gap, vocab=vocab, segment=segment, train_docs=30, valid_docs=3, test_docs=3, seed=5)
    half, itos = vocab // 2, c.vocab.itos
    key_ids, value_ids = set(range(2, 2 + half)), set(range(2 + half, 2 + vocab))
    assert all(itos[i].startswith("k") for i in key_ids) and all(itos[i].startswith("v") for i in value_ids)
    for tokens, answers in docs_of(c):
        assert len(tokens) == mqar_length(pairs, gap, segment)
        pair_keys = tokens[1 : 1 + 2 * pairs : 2].tolist()
        pair_values = tokens[2 : 2 + 2 * pairs : 2].tolist()
        assert set(pair_keys) <= key_ids and set(pair_values) <= value_ids and len(set(pair_keys)) == pairs
        where = {k: 1 + 2 * i for i, k in enumerate(pair_keys)}
        marked = answers.nonzero().flatten().tolist()
        assert len(marked) == pairs  # labels at the answers only: one per pair
        asked = []
        for a in marked:
            key = int(tokens[a - 1])  # the query key that predicts the answer
            asked.append(key)
            assert int(tokens[a]) == pair_values[pair_keys.index(key)]  # the answer is the key's value
            assert (a - 1) // segment - where[key] // segment - 1 >= gap  # G whole segments between key and query
        assert sorted(asked) == sorted(pair_keys)  # every key asked once
        outside = [int(t) for i, t in enumerate(tokens) if not answers[i] and 1 + 2 * pairs <= i < marked[0] - 1]
        assert not set(outside) & (key_ids | value_ids)  # between pairs and queries: filler only


def test_mqar_is_seeded_and_splits_differ():
    a, b = make_mqar(seed=3, train_docs=20, valid_docs=20, test_docs=20), make_mqar(seed=3, train_docs=20, valid_docs=20, test_docs=20)
    assert torch.equal(a.documents["train"].tokens, b.documents["train"].tokens) and torch.equal(a.train, b.train)
    assert not torch.equal(a.documents["train"].tokens, a.documents["valid"].tokens)
    assert not torch.equal(a.documents["train"].tokens, make_mqar(seed=4, train_docs=20, valid_docs=20, test_docs=20).documents["train"].tokens)


def test_mqar_warm_up_gap_puts_the_queries_right_after_the_pairs():
    c = make_mqar(pairs=2, gap=-1, segment=16, train_docs=4, valid_docs=1, test_docs=1)
    tokens, answers = docs_of(c)[0]
    assert len(tokens) == 1 + 4 + 4 + 1 and answers.nonzero().flatten().tolist() == [6, 8]


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(vocab=7), "even number"),
        (dict(pairs=9, vocab=16), "raise --mqar-vocab to >= 18"),
        (dict(gap=-2), "--mqar-gap"),
        (dict(segment=0), "--task-segment"),
        (dict(train_docs=0), "--synth-train-docs"),
    ],
)
def test_mqar_bad_arguments_name_the_flag(kw, needle):
    with pytest.raises(CRTError, match=needle.replace("-", r"\-").replace("+", r"\+")):
        make_mqar(**kw)


# ---------------------------------------------------------------------------------------------
# passkey


@pytest.mark.parametrize("digits, distance", [(1, 0), (4, 32), (7, 100)])
def test_passkey_answers_repeat_the_key_distance_tokens_later(digits, distance):
    c = make_passkey(digits=digits, distance=distance, train_docs=50, valid_docs=2, test_docs=2, seed=1)
    itos = c.vocab.itos
    seen = set()
    for tokens, answers in docs_of(c):
        words = [itos[t] for t in tokens]
        assert len(words) == passkey_length(digits, distance) and words[1] == "<key>"
        q = words.index("<q>")
        assert q - (2 + digits) == distance  # D filler tokens between the key's last digit and the query
        assert words[2 : 2 + digits] == words[q + 1 : q + 1 + digits] and all(w.isdigit() for w in words[2 : 2 + digits])
        assert answers.nonzero().flatten().tolist() == list(range(q + 1, q + 1 + digits))
        assert all(w.startswith("f") for w in words[2 + digits : q])
        seen.add("".join(words[2 : 2 + digits]))
    assert len(seen) > 1
    again = make_passkey(digits=digits, distance=distance, train_docs=50, valid_docs=2, test_docs=2, seed=1)
    assert torch.equal(again.documents["train"].tokens, c.documents["train"].tokens)


# ---------------------------------------------------------------------------------------------
# facts in real text


def _text(tmp_path: Path) -> Corpus:
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(40)] + ["the", "to", "."]

    def lines(n):
        return "".join(
            " ".join(words[i] for i in torch.randint(len(words), (int(torch.randint(3, 15, (1,), generator=g)),), generator=g).tolist()) + "\n"
            for _ in range(n)
        )

    d = tmp_path / "text"
    d.mkdir()
    for split, n in (("train", 400), ("valid", 60), ("test", 60)):
        (d / f"ptb.{split}.txt").write_text(lines(n))
    return load_words(d)


@pytest.mark.parametrize("count, length, segment", [(1, 40, 16), (4, 120, 16), (6, 64, 8)])
def test_facts_answers_follow_from_the_facts(tmp_path, count, length, segment):
    text = _text(tmp_path)
    c = make_facts(text, count=count, length=length, segment=segment, train_docs=60, valid_docs=5, test_docs=5, seed=2)
    itos = c.vocab.itos
    answers_seen = set()
    for tokens, answers in docs_of(c):
        words = [itos[t] for t in tokens]
        assert words[-6:-3] == ["where", "is", words[-4]] and words[-3] == "?" and words[-1] == "<eos>"
        person, answer = words[-4], words[-2]
        facts = [
            (i, words[i], words[i + 4]) for i in range(len(words) - 6) if words[i] in PEOPLE and words[i + 1] in VERBS and words[i + 2 : i + 4] == ["to", "the"]
        ]
        assert len(facts) == count
        assert answer == [loc for _, who, loc in facts if who == person][-1]  # the asked person's last location
        assert answer in LOCATIONS
        assert len(words) - 6 - (facts[-1][0] + 6) >= segment  # at least one segment of text before the question
        assert answers.nonzero().flatten().tolist() == [len(words) - 2]
        answers_seen.add(answer)
    assert len(answers_seen) > 1
    assert c.vocab.itos[: len(text.vocab)] == text.vocab.itos  # the text's ids are unchanged


def test_most_frequent_words_keeps_the_commonest_and_maps_the_rest_to_unk(tmp_path):
    text = _text(tmp_path)
    kept = most_frequent_words(text, 10)
    counts = torch.bincount(text.train, minlength=len(text.vocab))
    assert len(kept.vocab) == 11 and kept.vocab.itos[-1] == "<unk>" and "<eos>" in kept.vocab  # <eos> kept however rare
    kept_ids = [text.vocab.stoi[w] for w in kept.vocab.itos if w not in ("<eos>", "<unk>")]
    dropped = [i for i in range(len(text.vocab)) if text.vocab.itos[i] not in kept.vocab]
    assert len(kept_ids) == 9 and min(counts[kept_ids]) >= max(counts[dropped])  # the commonest 9 words besides <eos>
    for split in ("train", "valid", "test"):
        old, new = text.split(split), kept.split(split)
        assert len(old) == len(new)
        same = [text.vocab.itos[o] == kept.vocab.itos[n] for o, n in zip(old.tolist(), new.tolist())]
        assert all(s or kept.vocab.itos[n] == "<unk>" for s, n in zip(same, new.tolist()))  # every word kept or <unk>
        if split == "train":
            assert sum(same) == int(counts[kept_ids].sum() + counts[text.vocab.stoi["<eos>"]])  # exactly the kept words' occurrences
    assert most_frequent_words(text, len(text.vocab)) is text  # nothing to drop
    c = make_facts(kept, count=2, length=40, segment=8, train_docs=5, valid_docs=2, test_docs=2)
    assert c.vocab.itos[:11] == kept.vocab.itos and set(c.vocab.itos) == {*kept.vocab.itos, *PEOPLE, *LOCATIONS, *VERBS, "to", "the", ".", "where", "is", "?"}


def test_facts_refuses_text_too_short_and_no_room(tmp_path):
    text = _text(tmp_path)
    with pytest.raises(CRTError, match="--facts-length"):
        make_facts(text, count=4, length=10**6, segment=16, train_docs=2, valid_docs=1, test_docs=1)
    with pytest.raises(CRTError, match="raise --facts-length to >= 20"):
        make_facts(text, count=4, length=19, segment=16)


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_memory_tasks_train_eval_and_refuse_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = [
        "--preset",
        "synthetic-crt",
        "--no-stages",
        "--d-model",
        "16",
        "--n-layer",
        "1",
        "--d-ff",
        "32",
        "--segment-len",
        "8",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--synth-train-docs",
        "8",
        "--synth-valid-docs",
        "2",
        "--synth-test-docs",
        "2",
        "--no-progress",
    ]
    rc, out, err = cli(capsys, "train", *tiny, "--data", "mqar", "--mqar-pairs", "2", "--out-dir", "m")
    assert rc == 0, err
    assert "test recall" in out
    rc, out, err = cli(capsys, "eval", "--checkpoint", "m", "--mqar-gap", "5")  # the same model at another distance
    assert rc == 0 and "of 4 answers" in out, err
    rc, out, err = cli(capsys, "train", *tiny, "--data", "passkey", "--passkey-digits", "3", "--mqar-pairs", "3", "--out-dir", "p")
    assert rc == 0 and "--mqar-pairs" in err and "data = mqar" in err  # a flag this task does not read is named
    refused(cli(capsys, "train", *tiny, "--data", "facts", "--out-dir", "f"), "--data-dir")
    refused(cli(capsys, "train", *tiny, "--data", "mqar", "--mqar-pairs", "20", "--out-dir", "x"), "--mqar-vocab")
    refused(cli(capsys, "train", *tiny, "--data", "mqar", "--mqar-gap", "-2", "--out-dir", "x"), "mqar_gap")
    assert not Path("f").exists() and not Path("x").exists()


# ---------------------------------------------------------------------------------------------
# the memory works: passkey two segments away


def _passkey_run(tmp_path: Path, arch: str, curriculum: bool = True) -> dict:
    from crt.train.loop import train

    m = ModelConfig(arch=arch, d_model=64, n_layer=2, n_head=4, d_ff=256, segment_len=16, dropout=0.0, emb_dropout=0.0, d_memory=256)
    t = TrainConfig(
        data="passkey",
        passkey_digits=2,
        passkey_distance=32,
        protocol="document",
        loss="answers",
        batch_size=32,
        bptt_segments=0,
        max_steps=700,
        lr=3e-3,
        min_lr=3e-3,
        warmup_steps=50,
        weight_decay=0.0,
        eval_every=0,
        eval_batch_size=100,
        seed=0,
        synth_train_docs=2000,
        synth_valid_docs=100,
        synth_test_docs=200,
        out_dir=str(tmp_path / arch),
    )
    stages = [Stage({"passkey_distance": 4}, 200), Stage({"passkey_distance": 16}, 200), Stage({"passkey_distance": 32}, 300)]
    return train(m, t, stages if curriculum else stages[-1:], progress=False)


def test_crt_solves_passkey_two_segments_away_and_the_segment_transformer_cannot(tmp_path):
    # 32 filler tokens between key and query with 16-token segments: the query's segment is two
    # boundaries past the key's, so only carried state can answer (chance 0.1 a digit)
    crt = _passkey_run(tmp_path, "crt")
    assert crt["test_recall"] >= 0.9, crt
    # the segment Transformer has no path across segments at all, so its floor needs no curriculum:
    # the last stage's 300 steps at distance 32 (what both are tested on)
    floor = _passkey_run(tmp_path, "transformer", curriculum=False)
    assert floor["test_recall"] <= 0.2, floor
