"""Any text: --data text, the byte / char / bpe tokenizers, their checkpoints, and bits per byte."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest
import torch
from cli_helpers import cli, refused

from crt.data.corpus import text_splits
from crt.data.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, from_meta
from crt.train.evaluate import Tally

# emoji (with a skin-tone modifier and a ZWJ sequence), CJK, combining marks, control characters, CRLF
UNICODE = "naïve café 👍🏽 👩‍👩‍👧 日本語の文章 e\u0301 a\u0308\u0301 \x00\x01\x1b\t\r\nnext\rline\u2028end  \n\n"


def corpus_text(n_lines: int = 400, seed: int = 0) -> str:
    """Seeded word salad with some Unicode: enough distinct pairs for a few hundred BPE merges."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyzéü") for _ in range(rng.randint(1, 7))) for _ in range(300)]
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "\n" for _ in range(n_lines)) + UNICODE


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(corpus_text(), 400)


def test_byte_and_bpe_round_trip_any_unicode(bpe):
    for tok in (ByteTokenizer(), bpe):
        for text in (UNICODE, UNICODE * 3, "", "\n", "🙂", corpus_text(5, seed=1)):
            ids = tok.encode(text)
            assert ids.dtype == torch.int64 and (ids.numel() == 0 or 0 <= int(ids.min()) and int(ids.max()) < len(tok))
            assert tok.decode(ids) == text
            # bytes per token add up to the text's UTF-8 bytes: what bits per byte divides by
            assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
    assert ByteTokenizer().encode("é").tolist() == [0xC3, 0xA9]


def test_char_round_trips_the_text_it_was_built_from_and_refuses_others():
    tok = CharTokenizer.build([UNICODE])
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    assert int(tok.token_bytes()[tok.encode(UNICODE)].sum()) == len(UNICODE.encode())
    with pytest.raises(Exception, match="'z' is not in the model's vocabulary"):
        tok.encode("z")


def test_bpe_encodes_line_by_line_as_a_whole(bpe):
    """No token spans a newline, so `crt score` (line by line) sees the ids a split gets."""
    import io

    from crt.infer.text import read_lines, text_ids

    text = corpus_text(50, seed=2) + UNICODE + "  \n\n \t\nend"  # blank lines, spaces before a newline, no final newline
    whole = bpe.encode(text).tolist()
    assert list(text_ids(read_lines(io.BytesIO(text.encode())), bpe)) == whole  # exactly what `crt score` reads
    assert len(whole) < len(text.encode())  # merges happened


def test_decoding_broken_bytes_replaces_them_and_never_crashes(bpe):
    byte = ByteTokenizer()
    assert byte.decode([0xF0, 0x9F]) == "\ufffd"  # the first half of an emoji
    assert byte.decode([0x61, 0xFF, 0x62]) == "a\ufffdb"
    cut = bpe.encode("🙂").tolist()
    assert len(cut) > 1 and bpe.decode(cut[:1]) == "\ufffd"  # a rare emoji stays in byte pieces; its first alone is no UTF-8
    with pytest.raises(Exception, match="outside the vocabulary"):
        byte.decode([256])
    with pytest.raises(Exception, match="outside the vocabulary"):
        bpe.decode([len(bpe)])


def test_bpe_training_is_deterministic_and_uses_the_train_split_only(tmp_path):
    a, b = BPETokenizer.train(corpus_text(), 350), BPETokenizer.train(corpus_text(), 350)
    assert a.to_meta() == b.to_meta() and len(a) == 350
    path = tmp_path / "t.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    splits = text_splits(path)
    assert BPETokenizer.train(splits["train"], 350) != BPETokenizer.train(splits["train"] + splits["valid"], 350)


def test_saved_tokenizers_reload_equal_with_the_same_ids(bpe):
    text = corpus_text(20, seed=3)
    for tok in (ByteTokenizer(), CharTokenizer.build([text]), bpe):
        meta = json.loads(json.dumps({"vocab": tok.labels(), "tokenizer": tok.to_meta(), "train": {"data": "text"}}))
        again = from_meta(meta)
        assert type(again) is type(tok) and again == tok and torch.equal(again.encode(text), tok.encode(text))
    meta = {"vocab": bpe.labels()[::-1], "tokenizer": bpe.to_meta()}
    with pytest.raises(Exception, match="does not match its vocab"):
        from_meta(meta)
    assert from_meta({"vocab": ["a", "\n"], "train": {"data": "chars"}}).kind == "char"  # a checkpoint from before tokenizers were saved
    assert from_meta({"vocab": ["a", "<eos>"], "train": {"data": "ptb"}}).kind == "word"


def test_tally_bits_per_byte():
    token_bytes = torch.tensor([1, 2, 3])
    logits = torch.zeros(1, 4, 3)  # uniform: ln 3 nats per token
    targets = torch.tensor([[0, 1, 2, -100]])
    tally = Tally(token_bytes)
    tally.add(logits, targets, torch.zeros_like(targets, dtype=torch.bool))
    r = tally.result()
    assert r["bytes"] == 6 and r["bpb"] == pytest.approx(3 * math.log(3) / math.log(2) / 6, rel=1e-6)
    words = Tally()
    words.add(logits, targets, torch.zeros_like(targets, dtype=torch.bool))
    assert math.isnan(words.result()["bpb"]) and words.result()["bytes"] == 0


TINY = ["--preset", "text-crt-bpe", "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--d-ff", "64", "--segment-len", "16"]
TINY += ["--batch-size", "2", "--max-steps", "3", "--warmup-steps", "1", "--eval-every", "0", "--no-progress"]


def test_cli_trains_bpe_on_a_text_file_then_eval_generate_score_use_its_tokenizer(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text(corpus_text(), encoding="utf-8")
    rc, out, err = cli(capsys, "train", *TINY, "--data-dir", "t.txt", "--vocab-size", "300", "--out-dir", "run")
    assert rc == 0 and "tokenizer: bpe, 300 tokens" in out and "bpb" in out, err
    config = next((tmp_path / "run" / "checkpoints").glob("step-*/config.json"))
    meta = json.loads(config.read_text())
    assert meta["tokenizer"]["kind"] == "bpe" and meta["model"]["vocab_size"] == 300 and len(meta["vocab"]) == 300
    saved = from_meta(meta)
    assert saved == BPETokenizer.train(text_splits(tmp_path / "t.txt")["train"], 300)  # trained on the train split

    (tmp_path / "t.txt").write_text(corpus_text(seed=9), encoding="utf-8")  # other text: eval encodes it with the saved BPE, trains none
    rc, out, err = cli(capsys, "eval", "--checkpoint", "run", "--split", "test")
    assert rc == 0 and "bpb " in out and "bytes" in out, err
    scored = int(out.split(" over ")[1].split(" bytes")[0].replace(",", ""))
    assert scored == len(text_splits(tmp_path / "t.txt")["test"].encode()) - len(
        saved.decode(saved.encode(text_splits(tmp_path / "t.txt")["test"])[:1]).encode()
    )

    rc, out, err = cli(capsys, "generate", "--checkpoint", "run", "--prompt", "café ", "--max-new-tokens", "12", "--temperature", "0", "--runtime", "torch")
    assert rc == 0 and out.startswith("café "), err
    (tmp_path / "s.txt").write_text(UNICODE * 4, encoding="utf-8")
    rc, out, err = cli(capsys, "score", "--checkpoint", "run", "s.txt", "--report-every", "0", "--runtime", "torch")
    assert rc == 0 and "bpb" in out, err
    n = len(saved.encode(UNICODE * 4))
    assert f"tokens {n - 1:,} " in out  # the score's ids are the saved tokenizer's

    refused(cli(capsys, "train", "--resume", "run", "--tokenizer", "byte", "--no-progress"), "tokenizer")


@pytest.mark.parametrize("tokenizer", ["byte", "char"])
def test_cli_byte_and_char_on_text_with_bits_per_byte(tmp_path, monkeypatch, capsys, tokenizer):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text(corpus_text(100), encoding="utf-8")
    rc, out, err = cli(capsys, "train", *TINY, "--data-dir", "t.txt", "--tokenizer", tokenizer, "--out-dir", "run")
    assert rc == 0 and f"tokenizer: {tokenizer}" in out, err
    rc, out, err = cli(capsys, "eval", "--checkpoint", "run")
    assert rc == 0 and "bpb" in out, err
    rc, out, err = cli(capsys, "generate", "--checkpoint", "run", "--max-new-tokens", "8", "--runtime", "torch")
    assert rc == 0, err


def test_a_folder_of_splits(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text(f"{split} text\r\n", encoding="utf-8")
    assert text_splits(tmp_path) == {"train": "train text\r\n", "valid": "valid text\r\n", "test": "test text\r\n"}  # \r kept


def test_bad_text_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.txt").write_bytes(b"good line\nsecond \xff line\n" + b"more\n" * 100)
    refused(cli(capsys, "train", *TINY, "--data-dir", "bad.txt", "--tokenizer", "byte"), "bad.txt is not UTF-8", "line 2, byte 8", "offset 17")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.txt").write_text("x\n" * 50)
    refused(cli(capsys, "train", *TINY, "--data-dir", "folder"), "lacks valid.txt, test.txt", "train.txt, valid.txt, test.txt")
    (tmp_path / "empty.txt").write_text("")
    refused(cli(capsys, "train", *TINY, "--data-dir", "empty.txt"), "empty.txt is empty")
    refused(cli(capsys, "train", *TINY, "--data-dir", "nope.txt"), "nope.txt does not exist")
    (tmp_path / "t.txt").write_text(corpus_text(60), encoding="utf-8")
    refused(cli(capsys, "train", *TINY, "--data-dir", "t.txt", "--vocab-size", "100"), "--vocab-size 100 is too small", "at least 257")
    refused(cli(capsys, "train", *TINY, "--data-dir", "t.txt", "--vocab-size", "100000000"), "more than", "bytes of training text")
    refused(cli(capsys, "train", *TINY, "--data-dir", "t.txt", "--vocab-size", "2000"), "yields only", "give --vocab-size")
    refused(cli(capsys, "train", *TINY, "--data-dir", "t.txt", "--tokenizer", "word"), "--data words")
    refused(cli(capsys, "train", *TINY, "--data", "chars", "--data-dir", "t.txt"), "--data text")
    refused(cli(capsys, "train", *TINY, "--data", "synthetic"), "memory tasks")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    refused(cli(capsys, "train", *TINY, "--data-dir", "t.txt", "--vocab-size", "300"), "pip install 'crt[bpe]'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "empty.txt", "folder", "t.txt"]  # no run folder left


def test_vocab_size_warns_only_where_it_does_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text(corpus_text(60), encoding="utf-8")
    rc, _, err = cli(capsys, "train", *TINY, "--data-dir", "t.txt", "--tokenizer", "byte", "--vocab-size", "300", "--max-steps", "1", "--out-dir", "a")
    assert rc == 0 and "--vocab-size does nothing here: it is read by --tokenizer bpe" in err, err
    rc, _, err = cli(capsys, "train", *TINY, "--data-dir", "t.txt", "--vocab-size", "300", "--max-steps", "1", "--out-dir", "b")
    assert rc == 0 and "--vocab-size" not in err, err


def test_the_exported_tokenizer_file_tokenizes_as_the_model_does(bpe):
    """What `crt export` writes beside the program: for bpe the HF JSON an app loads as it is."""
    from tokenizers import Tokenizer

    from crt.infer.export import tokenizer_json

    assert Tokenizer.from_str(tokenizer_json(bpe)).encode(UNICODE).ids == bpe.encode(UNICODE).tolist()
    assert json.loads(tokenizer_json(ByteTokenizer())) == {"kind": "byte", "vocab": ByteTokenizer().labels()}
