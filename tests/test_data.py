"""crt.data: word/char corpora, batchify, the synthetic recall corpus, download (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import zipfile
from pathlib import Path

import pytest
import torch

from crt.data import Corpus, Vocab, batchify, doc_length, download, load_chars, load_words, make_synthetic
from crt.data.download import SOURCES
from crt.data.synthetic import synthetic_vocab
from crt.errors import CRTError

# The module itself: the attribute crt.data.download is the function of the same name.
download_mod = importlib.import_module("crt.data.download")


def raises_one_line(match: str, fn, *args, **kwargs) -> str:
    """Call fn, expect a CRTError whose one-line message matches `match`; return the message."""
    with pytest.raises(CRTError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def write_corpus(directory: Path, train: str, valid: str, test: str, kind: str = "ptb") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pattern = "ptb.{}.txt" if kind == "ptb" else "wiki.{}.tokens"
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (directory / pattern.format(split)).write_text(text, encoding="utf-8")
    return directory


# ---------------------------------------------------------------------------------------------
# real benchmark files


def test_ptb_real_counts(ptb_dir):
    c = load_words(ptb_dir)
    assert c.name == "ptb"
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == (929_589, 73_760, 82_430)
    assert len(c.vocab) == 10_000
    assert c.train.dtype == c.valid.dtype == c.test.dtype == torch.int64
    assert c.unk_mapped == {} and c.answers == {}
    first = (ptb_dir / "ptb.valid.txt").read_text().split("\n")[0].split() + ["<eos>"]
    assert c.vocab.decode(c.valid[: len(first)]) == first


def test_wikitext2_real_counts(wikitext2_dir):
    c = load_words(wikitext2_dir)  # auto-detects WikiText from wiki.*.tokens
    assert c.name == "wikitext-2"
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == (2_088_628, 217_646, 245_569)
    assert len(c.vocab) == 33_278
    assert c.unk_mapped == {}


# ---------------------------------------------------------------------------------------------
# word corpora on small files


def test_words_tokenisation_and_first_occurrence_vocab(tmp_path):
    # blank and whitespace-only lines still give an <eos>; CRLF is a newline; a last line
    # without a newline still ends with <eos>.
    d = write_corpus(tmp_path / "c", "b a\n\n  \r\na c b", "a b\n", "c\n")
    c = load_words(d)
    assert c.vocab.itos == ["b", "a", "<eos>", "c"]
    assert c.vocab.decode(c.train) == ["b", "a", "<eos>", "<eos>", "<eos>", "a", "c", "b", "<eos>"]
    assert c.vocab.decode(c.valid) == ["a", "b", "<eos>"]
    assert c.test.tolist() == [3, 2]


def test_words_chunked_reading_matches_line_by_line(tmp_path, monkeypatch):
    # Tiny read blocks force pieces to end mid-line, mid-character and inside a line longer
    # than a block; the tokens must equal the plain line-by-line reading.
    corpus_mod = importlib.import_module("crt.data.corpus")
    train = "naïve café\r\n" + "long " * 40 + "\n\n" + "x y z\n" * 20 + "ünï côdé"
    d = write_corpus(tmp_path / "c", train, "x\n", "y\n")
    expected = [w for line in io.StringIO(train, newline=None) for w in line.split() + ["<eos>"]]
    for block in (1, 3, 7, 64, 1 << 24):
        monkeypatch.setattr(corpus_mod, "_CHUNK_BYTES", block)
        c = load_words(d)
        assert c.vocab.decode(c.train) == expected, block
    (d / "ptb.valid.txt").write_bytes(b"x\n" * 50 + b"y \xc3(\n")  # invalid UTF-8 late in the file
    monkeypatch.setattr(corpus_mod, "_CHUNK_BYTES", 16)
    raises_one_line(r"ptb\.valid\.txt is not UTF-8 text \(invalid continuation byte at line 51, byte 3; offset 102 in the file\)", load_words, d)


def test_words_kind_detection_and_explicit_kind(tmp_path):
    d = write_corpus(tmp_path / "wikitext-103", "x y\n", "y\n", "x\n", kind="wiki")
    assert load_words(d).name == "wikitext-103"
    assert load_words(d, kind="wikitext").train.numel() == 3
    raises_one_line(r"lacks ptb\.train\.txt", load_words, d, kind="ptb")
    write_corpus(d, "x\n", "x\n", "x\n", kind="ptb")
    raises_one_line(r"both PTB and WikiText.*kind=", load_words, d)
    raises_one_line(r"unknown word corpus kind 'penn'", load_words, d, kind="penn")


def test_oov_error_names_word_file_and_line(tmp_path):
    d = write_corpus(tmp_path / "c", "a b\n", "a\nb a\na zebra b\n", "a\n")
    msg = raises_one_line(r"'zebra'", load_words, d)
    assert f"{d / 'ptb.valid.txt'}:3" in msg
    assert "--map-unk" in msg


def test_map_unk_appends_unk_and_counts(tmp_path):
    d = write_corpus(tmp_path / "c", "a b\n", "a zebra zebra\nyak\n", "b\n")
    c = load_words(d, map_unk=True)
    assert c.vocab.itos == ["a", "b", "<eos>", "<unk>"]  # train lacked <unk>: appended last
    assert c.unk_mapped == {"valid": 3}  # test had no unseen word: no entry
    assert c.vocab.decode(c.valid) == ["a", "<unk>", "<unk>", "<eos>", "<unk>", "<eos>"]


def test_map_unk_reuses_the_training_unk(tmp_path):
    d = write_corpus(tmp_path / "c", "a <unk>\n", "b\n", "a c c\n")
    c = load_words(d, map_unk=True)
    assert len(c.vocab) == 3 and c.vocab.stoi["<unk>"] == 1
    assert c.unk_mapped == {"valid": 1, "test": 2}
    assert c.test.tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: None, r"does not exist.*--data-dir"),
        (lambda d: d.mkdir(), r"no word-level corpus files \(expected ptb\.train\.txt.*wiki\.train\.tokens"),
        (lambda d: write_corpus(d / "wikitext-2", "a\n", "a\n", "a\n", kind="wiki"), r"found them in .*wikitext-2, pass that as --data-dir"),
        (lambda d: (write_corpus(d, "a\n", "a\n", "a\n"), (d / "ptb.test.txt").unlink()), r"lacks ptb\.test\.txt \(the test split\)"),
        (lambda d: write_corpus(d, "", "a\n", "a\n"), r"ptb\.train\.txt has no words \(it is empty or only whitespace\)"),
        (lambda d: write_corpus(d, "a\n", " \n\t\n\n", "a\n"), r"ptb\.valid\.txt has no words"),
        (
            lambda d: (write_corpus(d, "a\n", "a\n", "a\n"), (d / "ptb.test.txt").write_bytes(b"a\nb\xff\n")),
            r"ptb\.test\.txt is not UTF-8 text \(invalid start byte at line 2, byte 2; offset 3 in the file\)",
        ),
    ],
    ids=["missing-dir", "no-corpus-files", "nested-folder", "missing-split", "empty-file", "whitespace-file", "not-utf8"],
)
def test_word_corpus_errors(tmp_path, setup, match):
    d = tmp_path / "data"
    setup(d)
    raises_one_line(match, load_words, d)


# ---------------------------------------------------------------------------------------------
# character corpora


def test_chars_split_sizes_vocab_and_round_trip(tmp_path):
    text = "héllo wörld\nthe quick brown fox\n" * 10  # non-ASCII included
    assert len(text) == 320 and len(text.encode()) == 340
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8")
    c = load_chars(path, valid_fraction=0.1, test_fraction=0.05)
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == (320 - 32 - 16, 32, 16)  # counted in characters
    assert c.vocab.itos == sorted(set(text))  # sorted characters, newline included
    assert "".join(c.vocab.decode(torch.cat([c.train, c.valid, c.test]))) == text  # contiguous splits
    assert c.train.dtype == torch.int64 and c.name == "input"


def test_chars_errors(tmp_path):
    raises_one_line(r"does not exist", load_chars, tmp_path / "nope.txt")
    raises_one_line(r"is not a file", load_chars, tmp_path)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("abc caf\xe9 x".encode("latin-1"))
    raises_one_line(r"not UTF-8 text \(invalid continuation byte at line 1, byte 8; offset 7 in the file\)", load_chars, bad)
    short = tmp_path / "short.txt"
    short.write_text("x" * 30)
    raises_one_line(r"30 characters, too few to split.*each split needs >= 2", load_chars, short)  # 5% of 30 = 1
    raises_one_line(r"must be in \(0, 1\)", load_chars, short, valid_fraction=0.6, test_fraction=0.5)


# ---------------------------------------------------------------------------------------------
# batchify and Vocab


def test_batchify_shape_and_contiguous_streams():
    data = torch.arange(103)
    b = batchify(data, 4)
    assert b.shape == (4, 25) and b.is_contiguous()  # remainder of 3 dropped
    for row in range(4):  # each row is one unbroken stretch of the stream
        assert torch.equal(b[row], torch.arange(row * 25, (row + 1) * 25))
    raises_one_line(r"cannot feed 60 streams", batchify, data, 60)
    raises_one_line(r"batch size must be >= 1", batchify, data, 0)


def test_vocab_round_trip_and_errors():
    v = Vocab(["<eos>", "a", "b"])
    assert v.encode(["b", "a"]) == [2, 1] and v.decode(torch.tensor([[2, 0]])) == ["b", "<eos>"]
    assert Vocab.from_list(v.to_list()) == v
    raises_one_line(r"token 'zz' is not in the vocabulary", v.encode, ["a", "zz"])
    raises_one_line(r"token id 7 is outside the vocabulary", v.decode, [7])
    raises_one_line(r"has the token 'a' twice", Vocab.from_list, ["a", "b", "a"])


# ---------------------------------------------------------------------------------------------
# synthetic recall corpus

SMALL = dict(pairs=3, keys=8, values=5, filler=20, filler_vocab=7, train_docs=50, valid_docs=10, test_docs=12)


def test_synthetic_is_deterministic_and_seeded():
    a, b, c = make_synthetic(**SMALL, seed=1), make_synthetic(**SMALL, seed=1), make_synthetic(**SMALL, seed=2)
    for split in ("train", "valid", "test"):
        assert torch.equal(a.split(split), b.split(split)) and torch.equal(a.answers[split], b.answers[split])
        assert not torch.equal(a.split(split), c.split(split))
    L = doc_length(3, 20)
    assert not torch.equal(a.train[: 10 * L], a.valid)  # valid is a different stream, not train's start
    torch.manual_seed(123)  # global RNG state must not matter
    assert torch.equal(make_synthetic(**SMALL, seed=1).train, a.train)


def test_synthetic_document_structure_and_answers():
    P, F = SMALL["pairs"], SMALL["filler"]
    c = make_synthetic(**SMALL, seed=0)
    v = c.vocab
    assert v == synthetic_vocab(8, 5, 7) and len(v) == 4 + 8 + 5 + 7
    L = doc_length(P, F)
    assert L == 5 * P + F + 3
    for split, docs in (("train", 50), ("valid", 10), ("test", 12)):
        tokens, answers = c.split(split), c.answers[split]
        assert tokens.numel() == docs * L and answers.shape == tokens.shape and answers.dtype == torch.bool
        assert int(answers.sum()) == P * docs  # exactly one answer per pair per document
        words = v.decode(tokens)
        for doc, ans in zip((words[i : i + L] for i in range(0, docs * L, L)), answers.view(docs, L)):
            assert doc[0] == "<doc>" and doc[1 + 2 * P] == "<sep>" and doc[-1] == "<eos>"
            keys, vals = doc[1 : 1 + 2 * P : 2], doc[2 : 2 + 2 * P : 2]
            assert all(k.startswith("k") for k in keys) and len(set(keys)) == P  # distinct keys
            assert all(x.startswith("v") for x in vals)
            assert all(t.startswith("f") for t in doc[2 + 2 * P : 2 + 2 * P + F])
            queries = doc[2 + 2 * P + F : -1]
            assert queries[0::3] == ["<q>"] * P and sorted(queries[1::3]) == sorted(keys)  # every pair asked once
            pair = dict(zip(keys, vals))
            for i in ans.nonzero().flatten().tolist():  # each answer is the value stored for the queried key
                assert doc[i - 2] == "<q>" and doc[i] == pair[doc[i - 1]]
    assert c.unk_mapped == {} and isinstance(c, Corpus)


def test_synthetic_argument_errors():
    raises_one_line(r"keys=2 < pairs=3.*--synth-keys", make_synthetic, pairs=3, keys=2)
    raises_one_line(r"pairs must be >= 1", make_synthetic, pairs=0)
    raises_one_line(r"valid_docs must be >= 1.*--synth-valid-docs", make_synthetic, valid_docs=0)


# ---------------------------------------------------------------------------------------------
# download (never touches the network)


def unreachable(name: str) -> tuple:
    return tuple(dataclasses.replace(r, url=f"http://127.0.0.1:9/{r.filename}") for r in SOURCES[name])


def test_download_offline_error_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(SOURCES, "ptb", unreachable("ptb"))
    d = tmp_path / "ptb"
    msg = raises_one_line(r"could not download ptb from http://127\.0\.0\.1:9/ptb\.train\.txt", download, "ptb", d)
    assert "ptb.train.txt, ptb.valid.txt, ptb.test.txt" in msg and f"--data-dir {d}" in msg and "by hand" in msg
    assert not d.exists()  # no partial or temp file, and not the folder the call made


def test_download_checksum_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(download_mod, "_fetch", lambda url, timeout: iter([b"not the ", b"corpus"]))
    d = tmp_path / "wt2"
    msg = raises_one_line(r"could not download wikitext-2: .* md5 .* expected 542ccefacc6c27f945fb54453812b3cd", download, "wikitext-2", d)
    assert "wiki.train.tokens" in msg and "--data-dir" in msg
    assert not d.exists()


def test_download_all_or_nothing_and_success(tmp_path, monkeypatch):
    files = {"ptb.train.txt": b"a b\n", "ptb.valid.txt": b"a\n", "ptb.test.txt": b"b\n"}
    fake = tuple(dataclasses.replace(r, md5=hashlib.md5(files[r.filename]).hexdigest()) for r in SOURCES["ptb"])
    monkeypatch.setitem(SOURCES, "ptb", fake)
    served = dict(files)

    def fetch(url, timeout):
        body = served[url.rsplit("/", 1)[1]]
        if body is None:
            raise OSError("connection reset")
        yield body

    monkeypatch.setattr(download_mod, "_fetch", fetch)
    d = tmp_path / "ptb"
    served["ptb.test.txt"] = None  # third file fails: the two good ones must not be moved in either
    raises_one_line(r"could not download ptb .*connection reset", download, "ptb", d)
    assert not d.exists()
    served["ptb.test.txt"] = files["ptb.test.txt"]
    assert download("ptb", d) == d
    assert sorted(p.name for p in d.iterdir()) == sorted(files)  # no temp files left
    assert load_words(d).train.numel() == 3
    served.clear()  # already present: nothing is fetched
    assert download("ptb", d) == d


def test_download_zip_extracts_members(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for split in ("train", "valid", "test"):
            z.writestr(f"wikitext-2/wiki.{split}.tokens", " = x = \n y \n")
    blob = buf.getvalue()
    monkeypatch.setitem(SOURCES, "wikitext-2", tuple(dataclasses.replace(r, md5=hashlib.md5(blob).hexdigest()) for r in SOURCES["wikitext-2"]))
    monkeypatch.setattr(download_mod, "_fetch", lambda url, timeout: iter([blob]))
    d = download("wikitext-2", tmp_path / "wt2")
    assert sorted(p.name for p in d.iterdir()) == ["wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]  # zip not kept
    assert load_words(d).train.numel() == 6


def test_download_unknown_name(tmp_path):
    raises_one_line(r"unknown corpus 'ptb2'.*ptb, wikitext-2, wikitext-103", download, "ptb2", tmp_path)


def test_download_into_unwritable_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(download_mod, "_fetch", lambda url, timeout: iter([b"x"]))
    target = tmp_path / "file"
    target.write_text("not a directory")
    raises_one_line(r"cannot (create|write)", download, "ptb", target / "ptb")
