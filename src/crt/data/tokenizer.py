"""Tokenizers: text <-> token ids, one small class per kind, saved in a checkpoint.

    word  whitespace-split words, <eos> ending every line (PTB, WikiText, the memory tasks)
    char  every character is a token, newline and \\r included (the corpus's alphabet, sorted)
    byte  the 256 byte values of the UTF-8 text: any text, nothing to build, no special tokens
    bpe   byte-level BPE trained on the train split only, with HF `tokenizers` (pip install 'crt[bpe]')

Every kind has the same methods: `encode` (text as a corpus reads it -> ids [N]), `prompt` (a
generation prompt -> ids, nothing appended), `decode` (ids -> text), `labels` (the id -> string
list a checkpoint stores as meta["vocab"]), `token_bytes` (UTF-8 bytes of each id, for bits per
byte) and `to_meta` / `from_meta` (meta["tokenizer"]: the kind and, for bpe, the HF JSON).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from crt.data.corpus import EOS, UNK, Vocab, _tokens
from crt.errors import CRTError

KINDS = ("word", "char", "byte", "bpe")
BYTE_TOKENS = 256
_BPE_PIECE = 1 << 20  # characters per HF encode call: bounds its per-call memory (offsets of every token)


def bits_per_byte(nll: float, n_bytes: int) -> float:
    """Total NLL (nats) over the UTF-8 bytes it scored, in bits: comparable across tokenizers; nan without bytes."""
    return nll / math.log(2) / n_bytes if n_bytes else math.nan


class Tokenizer:
    """What every kind shares: a Vocab of its labels (id -> string)."""

    kind = ""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.vocab)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_meta() == other.to_meta() and self.labels() == other.labels()

    def labels(self) -> list[str]:
        return self.vocab.to_list()

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def token_bytes(self) -> torch.Tensor | None:
        """[V] int64: the UTF-8 bytes of the text each id stands for; None where that is undefined."""
        return torch.tensor([len(s.encode("utf-8")) for s in self.labels()], dtype=torch.int64)

    def describe(self) -> str:
        return f"{self.kind}, {len(self):,} tokens"

    def encode(self, text: str, map_unk: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        raise NotImplementedError

    def prompt(self, text: str) -> list[int]:
        """A generation prompt -> ids, nothing appended. An empty prompt starts at the start of a
        line: after a newline (characters, bytes, bpe; a prompt of spaces is text there)."""
        return self.encode(text or "\n").tolist()

    def _check_ids(self, ids: Iterable[int] | torch.Tensor) -> list[int]:
        ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = next((i for i in ids if not 0 <= i < len(self)), None)
        if bad is not None:
            raise CRTError(f"token id {bad} is outside the vocabulary (0..{len(self) - 1}): the ids come from a model with a different vocabulary")
        return ids


class WordTokenizer(Tokenizer):
    """Whitespace-split words, <eos> at the end of every line (\\r\\n and a lone \\r end a line as
    \\n does, as the word loaders read); a last line without a newline still ends with <eos>."""

    kind = "word"

    def encode(self, text: str, map_unk: bool = False) -> torch.Tensor:
        words = _tokens(text.replace("\r\n", "\n").replace("\r", "\n"), last_piece=True)
        unk = self.vocab.stoi.get(UNK) if map_unk else None
        ids = []
        for w in words:
            i = self.vocab.stoi.get(w, unk)
            if i is None:
                fix = "pass --map-unk to score it as <unk>" if UNK in self.vocab else "the model cannot score it; remove it"
                raise CRTError(f"{w!r} is not in the model's vocabulary ({len(self)} tokens): {fix}")
            ids.append(i)
        return torch.tensor(ids, dtype=torch.int64)  # [N]

    def prompt(self, text: str) -> list[int]:
        """Words without <eos> (a prompt is a line still going); an empty one starts after <eos>."""
        words = text.split()
        if not words:
            if EOS not in self.vocab:
                raise CRTError(f"an empty prompt starts after {EOS!r} (the start of a line), which this model's vocabulary lacks: give --prompt some text")
            return [self.vocab.stoi[EOS]]
        unknown = next((w for w in words if w not in self.vocab), None)
        if unknown is not None:
            fix = f"replace it with {UNK}" if UNK in self.vocab else "use only words seen in the training data"
            raise CRTError(f"the prompt's word {unknown!r} is not in the model's vocabulary ({len(self)} tokens): {fix}")
        return self.vocab.encode(words)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Words joined by spaces, <eos> as a line break."""
        return " ".join(self.vocab.decode(ids)).replace(f" {EOS} ", "\n").replace(EOS, "\n")

    def token_bytes(self) -> None:
        """Undefined: the loaders normalise whitespace, and <unk> stands for words of any length."""
        return None


class CharTokenizer(Tokenizer):
    """Every character is a token; the vocabulary is the corpus's alphabet sorted by code point
    (ids do not depend on where a character first appears). No <unk>: an unseen character is an error."""

    kind = "char"

    @classmethod
    def build(cls, texts: Iterable[str]) -> CharTokenizer:
        cps = [np.unique(_code_points(t)) for t in texts]
        return cls(Vocab(chr(c) for c in np.unique(np.concatenate(cps)).tolist()))

    def encode(self, text: str, map_unk: bool = False) -> torch.Tensor:
        # numpy, not a loop over characters: a 100 MB file costs no per-character Python work
        alphabet = np.array([ord(c) for c in self.vocab.itos], dtype=np.uint32)  # [V] sorted
        cps = _code_points(text)  # [n]
        pos = np.minimum(np.searchsorted(alphabet, cps), len(alphabet) - 1)  # [n]
        unseen = np.flatnonzero(alphabet[pos] != cps)
        if unseen.size:
            raise CRTError(f"{chr(cps[unseen[0]])!r} is not in the model's vocabulary ({len(self)} characters): the model cannot score it; remove it")
        return torch.from_numpy(pos.astype(np.int64))  # [n]

    def prompt(self, text: str) -> list[int]:
        unknown = next((c for c in text if c not in self.vocab), None)
        if unknown is not None:
            raise CRTError(
                f"the prompt's character {unknown!r} is not in the model's vocabulary ({len(self)} tokens): use only characters seen in the training data"
            )
        if not text and "\n" not in self.vocab:
            raise CRTError("an empty prompt starts after '\\n' (the start of a line), which this model's vocabulary lacks: give --prompt some text")
        return self.vocab.encode(list(text or "\n"))

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        return "".join(self.vocab.decode(ids))


class ByteTokenizer(Tokenizer):
    """The UTF-8 bytes of the text, id = byte value. No special tokens: a newline (byte 10)
    starts a line, and decoding replaces an invalid or cut-off sequence with U+FFFD."""

    kind = "byte"

    def __init__(self):
        super().__init__(Vocab(f"<0x{b:02X}>" for b in range(BYTE_TOKENS)))

    def encode(self, text: str, map_unk: bool = False) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long() if text else torch.zeros(0, dtype=torch.int64)  # [N]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        return bytes(self._check_ids(ids)).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        return torch.ones(BYTE_TOKENS, dtype=torch.int64)


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2's byte alphabet, so any text encodes), trained with HF `tokenizers`.

    The text is first cut after every newline, so no token spans a line end: encoding is the
    same line by line (`crt score`) as for a whole split. No normaliser and no special tokens:
    decode(encode(text)) == text for any text.
    """

    kind = "bpe"

    def __init__(self, hf: Any):
        self.hf = hf
        super().__init__(Vocab(hf.id_to_token(i) for i in range(hf.get_vocab_size())))

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Deterministic: the same text and size give the same tokenizer (tests/test_text.py)."""
        hf = _hf()
        if vocab_size <= BYTE_TOKENS:
            raise CRTError(
                f"--vocab-size {vocab_size} is too small for --tokenizer bpe: its {BYTE_TOKENS} byte tokens come first, so give at least {BYTE_TOKENS + 1} (or use --tokenizer byte)"
            )
        n_bytes = len(text.encode("utf-8"))
        if vocab_size > BYTE_TOKENS + n_bytes:  # each merge needs a pair of adjacent tokens in the text
            raise CRTError(
                f"--vocab-size {vocab_size:,} is more than {n_bytes:,} bytes of training text can yield: give a --vocab-size well below {BYTE_TOKENS + n_bytes:,}"
            )
        tok = hf.Tokenizer(hf.models.BPE())
        tok.pre_tokenizer = hf.pre_tokenizers.Sequence(
            [hf.pre_tokenizers.Split("\n", behavior="merged_with_previous"), hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
        tok.decoder = hf.decoders.ByteLevel()
        trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(), special_tokens=[], show_progress=False)
        tok.train_from_iterator(_pieces(text), trainer=trainer)
        if tok.get_vocab_size() < vocab_size:
            raise CRTError(
                f"--vocab-size {vocab_size:,}: the train split ({n_bytes:,} bytes) yields only {tok.get_vocab_size():,} BPE tokens (no pair is left to merge): "
                f"give --vocab-size {tok.get_vocab_size():,} or less, or more text"
            )
        return cls(tok)

    @classmethod
    def from_json(cls, text: Any) -> BPETokenizer:
        hf = _hf()
        try:
            return cls(hf.Tokenizer.from_str(text))
        except Exception:  # tokenizers raises its own exception types for a bad JSON
            raise CRTError("the checkpoint's BPE tokenizer (meta tokenizer.hf) is not a tokenizers JSON: the checkpoint is damaged") from None

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "hf": self.hf.to_str()}

    def token_bytes(self) -> torch.Tensor:
        # GPT-2's byte-level alphabet writes each byte as one character, so a label's length is its byte count
        return torch.tensor([len(s) for s in self.labels()], dtype=torch.int64)

    def describe(self) -> str:
        return f"bpe, {len(self):,} tokens (byte-level, trained on the train split)"

    def encode(self, text: str, map_unk: bool = False) -> torch.Tensor:
        ids = [i for piece in _pieces(text) for i in self.hf.encode(piece).ids]
        return torch.tensor(ids, dtype=torch.int64)  # [N]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        return self.hf.decode(self._check_ids(ids))  # bytes that are no UTF-8 (a cut-off character) become U+FFFD


def _hf():
    try:
        import tokenizers
    except ImportError:
        raise CRTError("--tokenizer bpe needs the HF tokenizers package: pip install 'crt[bpe]'") from None
    return tokenizers


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # [n]


def _pieces(text: str) -> Iterable[str]:
    """`text` in pieces of about _BPE_PIECE characters that end after a newline (the BPE never
    spans one, so the pieces encode as the whole does)."""
    start = 0
    while start < len(text):
        cut = text.find("\n", start + _BPE_PIECE) + 1 or len(text)
        yield text[start:cut]
        start = cut


def make_tokenizer(kind: str, splits: dict[str, str], vocab_size: int = 0) -> Tokenizer:
    """A new tokenizer of `kind` for a corpus of split -> text: char takes the alphabet of every
    split, bpe is trained on the train split only, byte needs nothing."""
    if kind == "char":
        return CharTokenizer.build(splits.values())
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if not vocab_size:
            raise CRTError("--tokenizer bpe needs --vocab-size N, the size of the BPE vocabulary to train (e.g. 2048)")
        return BPETokenizer.train(splits["train"], vocab_size)
    raise CRTError(f"a {kind} tokenizer is not built from running text here: use char, byte or bpe")


def from_meta(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a checkpoint's config.json saved: meta["tokenizer"] (its kind; for bpe the
    HF JSON) and meta["vocab"]. Checkpoints written before tokenizers were saved are word models,
    or char models for data=chars."""
    spec = meta.get("tokenizer") or {"kind": "char" if meta.get("train", {}).get("data") == "chars" else "word"}
    vocab = Vocab.from_list(meta["vocab"])
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "word":
        return WordTokenizer(vocab)
    if kind == "char":
        return CharTokenizer(vocab)
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "bpe":
        tok = BPETokenizer.from_json(spec.get("hf"))
    else:
        raise CRTError(f"the checkpoint's tokenizer {spec!r} is not one of {', '.join(KINDS)}: the checkpoint is damaged or from a newer crt")
    if tok.labels() != vocab.itos:
        raise CRTError(
            f"the checkpoint's {kind} tokenizer ({len(tok)} tokens) does not match its vocab ({len(vocab)} tokens): the checkpoint is damaged or was edited"
        )
    return tok
