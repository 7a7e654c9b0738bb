"""Token corpora: vocabulary, word-level LM corpora (PTB, WikiText), character corpora, batchify.

A `Corpus` is three flat int64 token streams (train/valid/test) plus the vocabulary that maps
them to strings. Models read it through `batchify`, which cuts a stream into B parallel
contiguous streams, the standard layout for segment-recurrent training (each batch row is one
long document-order stream, so state carried from segment t to t+1 sees the true continuation).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from crt.errors import CRTError

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
TEXT_FILES = {s: f"{s}.txt" for s in SPLITS}  # a folder of running text (--data text)

# File names of the word-level corpora, split -> file name. WikiText-2 and -103 share one layout.
WORD_FILES = {
    "ptb": {s: f"ptb.{s}.txt" for s in SPLITS},
    "wikitext": {s: f"wiki.{s}.tokens" for s in SPLITS},
}

# Bytes read per step when tokenising: large enough that str.split and the dict lookups run at
# C speed on big pieces, small enough that WikiText-103 (~540 MB) never sits in memory as
# Python strings (a 4 MB piece is ~0.8M token strings; 16 MB pieces cost ~350 MB more peak RSS).
_CHUNK_BYTES = 1 << 22


class Vocab:
    """Bidirectional token <-> id map. `itos[i]` is the string of id i; `stoi` is its inverse."""

    def __init__(self, itos: Iterable[str] = ()):
        self.itos: list[str] = list(itos)
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            dup = next(s for i, s in enumerate(self.itos) if self.stoi[s] != i)
            raise CRTError(f"vocabulary has the token {dup!r} twice: the vocabulary list (e.g. in a checkpoint) is corrupt, rebuild it from the data")

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens: {self.itos[:5]}{'...' if len(self) > 5 else ''})"

    def add(self, token: str) -> int:
        """Id of `token`, appending it first if new (ids of existing tokens never change)."""
        i = self.stoi.get(token)
        if i is None:
            i = self.stoi[token] = len(self.itos)
            self.itos.append(token)
        return i

    def encode(self, words: Sequence[str]) -> list[int]:
        """Token strings -> ids. An unknown token is a user error (e.g. a generation prompt)."""
        try:
            return [self.stoi[w] for w in words]
        except KeyError as e:
            hint = f"replace it with {UNK}" if UNK in self.stoi else "use only words seen in the training data"
            raise CRTError(f"token {e.args[0]!r} is not in the vocabulary ({len(self)} tokens): {hint}") from None

    def decode(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Ids (list or tensor of any shape, flattened) -> token strings."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out = []
        for i in ids:
            if not 0 <= i < len(self.itos):
                raise CRTError(f"token id {i} is outside the vocabulary (0..{len(self.itos) - 1}): the ids come from a model with a different vocabulary")
            out.append(self.itos[i])
        return out

    def to_list(self) -> list[str]:
        """JSON-friendly form for checkpoints: the list index is the id."""
        return list(self.itos)

    @classmethod
    def from_list(cls, itos: Sequence[str]) -> "Vocab":
        if not isinstance(itos, (list, tuple)) or not all(isinstance(s, str) for s in itos):
            raise CRTError("vocabulary in the checkpoint is not a list of strings: the checkpoint is corrupt or from another tool")
        return cls(itos)


@dataclass(eq=False)
class Documents:
    """One split of a document corpus: one sample per row, padded on the right.

    tokens: [D, L_max] int64, row d holds document d in its first lengths[d] positions (pad 0 after).
    lengths: [D] int64, every length >= 2 (a document must predict at least one token).
    answers: [D, L_max] bool; answers[d, i] marks token i of document d as an answer (its
        prediction from position i - 1 is what recall scores, and what `--loss answers` trains).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    answers: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def stream(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The documents concatenated in order, and their answer marks: [N] int64, [N] bool."""
        keep = torch.arange(self.tokens.shape[1]).unsqueeze(0) < self.lengths.unsqueeze(1)  # [D, L_max]
        return self.tokens[keep], self.answers[keep]


@dataclass(eq=False)  # tensors have no single truth value, so no field-wise __eq__
class Corpus:
    """Three token streams and their vocabulary.

    unk_mapped: split -> number of valid/test tokens that were mapped to <unk> (only with
        map_unk=True; empty when nothing was mapped).
    answers: split -> bool [N]; answers[s][i] is True when token i of split s is an answer
        (its prediction from position i-1 counts for recall accuracy). Synthetic corpora only.
    documents: split -> Documents, for corpora made of separate samples (the memory tasks):
        what the document protocol trains and scores. The streams are the same documents
        concatenated, for the stream protocol. Empty for running text (PTB, WikiText, chars).
    tokenizer: what maps text to these ids (`crt.data.tokenizer`), saved in the checkpoint;
        None: words over `vocab` (the word corpora and the memory tasks).
    """

    name: str
    vocab: Vocab
    train: torch.Tensor  # [N_train] int64
    valid: torch.Tensor  # [N_valid] int64
    test: torch.Tensor  # [N_test] int64
    unk_mapped: dict[str, int] = field(default_factory=dict)
    answers: dict[str, torch.Tensor] = field(default_factory=dict)
    documents: dict[str, Documents] = field(default_factory=dict)
    tokenizer: Any = None

    def __post_init__(self):
        if self.tokenizer is None:
            from crt.data.tokenizer import WordTokenizer  # tokenizer.py builds on this module

            self.tokenizer = WordTokenizer(self.vocab)

    @property
    def token_bytes(self) -> torch.Tensor | None:
        """[V] UTF-8 bytes of each id (for bits per byte); None for words, whose bytes are undefined."""
        return self.tokenizer.token_bytes()

    @classmethod
    def from_documents(cls, name: str, vocab: Vocab, documents: dict[str, Documents]) -> "Corpus":
        """A corpus of documents (split -> Documents): its streams are the documents concatenated."""
        streams = {split: docs.stream() for split, docs in documents.items()}
        return cls(name=name, vocab=vocab, answers={s: a for s, (_, a) in streams.items()}, documents=documents, **{s: t for s, (t, _) in streams.items()})

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise CRTError(f"unknown split {name!r}: use one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.split(s).numel():,}" for s in SPLITS)
        return f"Corpus({self.name!r}, vocab={len(self.vocab):,}, {sizes})"


# ---------------------------------------------------------------------------------------------
# word-level corpora


def _detect_kind(directory: Path) -> str:
    found = {k: [f for f in files.values() if (directory / f).is_file()] for k, files in WORD_FILES.items()}
    kinds = [k for k, f in found.items() if f]
    if len(kinds) == 1:
        return kinds[0]
    expected = " or ".join(", ".join(files.values()) for files in WORD_FILES.values())
    if not kinds:
        # A common slip: pointing at the parent of the unzipped folder (wikitext-2/wiki.*.tokens).
        nested = sorted(p.parent for files in WORD_FILES.values() for p in directory.glob(f"*/{files['train']}"))
        hint = f"; found them in {nested[0]}, pass that as --data-dir" if nested else "; point --data-dir at the folder that holds them"
        raise CRTError(f"{directory} has no word-level corpus files (expected {expected}){hint}")
    raise CRTError(f"{directory} holds both PTB and WikiText files: say which with --data ptb or --data wikitext-2 (load_words: kind='ptb' or 'wikitext')")


def utf8_error(source: object, data: bytes, e: UnicodeDecodeError, offset: int | None = 0, line: int = 1) -> CRTError:
    """The one-line error for text that is not UTF-8: its reason, line and byte (both 1-based)
    and its offset in the file. data: the bytes decoded, starting on line `line` at file offset
    `offset` (None: a stream, no offset to give); e: the error decoding them raised."""
    line += data.count(b"\n", 0, e.start)
    byte = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    where = f"; offset {offset + e.start} in the file" if offset is not None else ""
    return CRTError(f"{source} is not UTF-8 text ({e.reason} at line {line}, byte {byte}{where}): re-encode it as UTF-8")


def _read_lines_chunked(path: Path, newlines: bool = True) -> Iterator[str]:
    """Yield the decoded text of `path` in pieces that end on a line boundary.

    Reads bytes and decodes each piece strictly, so a decoding error can name its line and
    byte. Cutting at b"\\n" is safe: in UTF-8 that byte never occurs inside a multi-byte
    character. newlines: \\r\\n and lone \\r become \\n, as in Python's text mode (universal
    newlines); False keeps the text as it is (what the byte and BPE tokenizers read).
    """
    offset, line = 0, 1
    carry = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK_BYTES)
            data = carry + block
            if block:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one very long line: keep reading until it ends
                    carry = data
                    continue
                data, carry = data[:cut], data[cut:]
            else:
                carry = b""
            if data:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise utf8_error(path, data, e, offset, line) from None
                if offset == 0 and text.startswith("\ufeff"):
                    text = text[1:]  # a byte-order mark is an encoding artefact, not text
                if newlines and "\r" in text:
                    text = text.replace("\r\n", "\n").replace("\r", "\n")
                yield text
                offset += len(data)
                line += data.count(b"\n")
            if not block:
                return


def _tokens(text: str, last_piece: bool) -> list[str]:
    """Whitespace-split words with <eos> at the end of every line (word_language_model's rule).

    Every line counts, blank ones included (they become a lone <eos>): this is what gives the
    published WikiText-2 counts (2,088,628 train tokens). A final line without a trailing
    newline still ends with <eos>.
    """
    toks = text.replace("\n", f" {EOS} ").split()
    if last_piece and text and not text.endswith("\n"):
        toks.append(EOS)
    return toks


def _find_line(path: Path, word: str) -> int:
    """1-based line number of the first line of `path` that contains `word` (error path only)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if word in line.split():
                return n
    return 0


def _encode_file(path: Path, vocab: Vocab, grow: bool, split: str, map_unk: bool, unk_counts: dict[str, int]) -> torch.Tensor:
    """Token ids of one file. grow=True (train) adds new words to `vocab` in first-occurrence order."""
    ids = array("q")  # int64 on every platform (array('l') is 32-bit on Windows)
    has_words = False
    pieces = _read_lines_chunked(path)
    piece = next(pieces, None)
    while piece is not None:
        nxt = next(pieces, None)
        toks = _tokens(piece, last_piece=nxt is None)
        has_words = has_words or len(toks) > toks.count(EOS)
        stoi = vocab.stoi
        if grow:
            # dict.fromkeys keeps first-occurrence order and runs in C; only new words loop here.
            for w in dict.fromkeys(toks):
                if w not in stoi:
                    vocab.add(w)
        else:
            unseen = set(toks).difference(stoi)
            if unseen:
                first = next(w for w in toks if w in unseen)
                if not map_unk:
                    raise CRTError(
                        f"{split} word {first!r} at {path}:{_find_line(path, first)} never occurs in the training file, "
                        f"so it has no id: pass --map-unk (map_unk=True) to map unseen {split} words to {UNK}"
                    )
                unk = vocab.add(UNK)
                unk_counts[split] = unk_counts.get(split, 0) + sum(1 for w in toks if w in unseen)
                ids.extend([stoi.get(w, unk) for w in toks])
                piece = nxt
                continue
        ids.extend(map(stoi.__getitem__, toks))
        piece = nxt
    if not has_words:
        raise CRTError(f"{path} has no words (it is empty or only whitespace): put the {split} text there")
    # frombuffer shares the array's memory (and keeps it alive), so no second copy of the stream.
    return torch.frombuffer(ids, dtype=torch.int64)  # [N]


def word_files(directory: str | Path, kind: str = "auto") -> tuple[Path, str, dict[str, Path]]:
    """(folder, kind, split -> file) of a word-level corpus folder, every file checked to exist.
    kind: "auto" (detect from the file names), "ptb" or "wikitext"."""
    directory = Path(directory).expanduser()
    if kind not in ("auto", *WORD_FILES):
        raise CRTError(f"unknown word corpus kind {kind!r}: use auto, {', '.join(WORD_FILES)}")
    if not directory.exists():
        raise CRTError(f"data directory {directory} does not exist: pass --data-dir with the folder that holds the corpus files")
    if not directory.is_dir():
        raise CRTError(f"{directory} is not a directory: pass --data-dir with the folder that holds the corpus files")
    if kind == "auto":
        kind = _detect_kind(directory)
    files = WORD_FILES[kind]
    for split, fname in files.items():
        if not (directory / fname).is_file():
            raise CRTError(f"{directory} lacks {fname} (the {split} split): put all of {', '.join(files.values())} in that folder")
    return directory, kind, {split: directory / fname for split, fname in files.items()}


def load_words(directory: str | Path, kind: str = "auto", map_unk: bool = False) -> Corpus:
    """Load a word-level corpus: PTB (ptb.{train,valid,test}.txt) or WikiText-2/103 (wiki.*.tokens).

    Tokens are the whitespace-split words of each line followed by <eos> (PyTorch's
    word_language_model convention): PTB gives 929,589 / 73,760 / 82,430 tokens, vocab 10,000.
    The vocabulary is built from the training file only, in first-occurrence order (so ids are
    reproducible from the file alone). A valid/test word never seen in train is an error unless
    map_unk=True, which maps it to <unk> (appended to the vocab if train lacks it) and counts
    the mapped tokens in `unk_mapped`.

    kind: "auto" (detect from the file names), "ptb" or "wikitext".
    """
    directory, kind, files = word_files(directory, kind)
    vocab = Vocab()
    unk_counts: dict[str, int] = {}
    streams = {split: _encode_file(files[split], vocab, grow=(split == "train"), split=split, map_unk=map_unk, unk_counts=unk_counts) for split in SPLITS}
    if kind == "ptb":
        name = "ptb"
    else:
        name = directory.name.lower() if directory.name.lower().startswith("wikitext") else "wikitext"
    return Corpus(name=name, vocab=vocab, unk_mapped=unk_counts, **streams)


# ---------------------------------------------------------------------------------------------
# character corpora and running text


def read_text(path: Path, split: str = "") -> str:
    """The whole of a UTF-8 text file as it is (\\r kept), decoded strictly (an error names the
    line and byte), a byte-order mark dropped. An empty file is an error."""
    text = "".join(_read_lines_chunked(path, newlines=False))
    if not text:
        what = f"the {split} split" if split else "text"
        raise CRTError(f"{path} is empty: put {what} there (UTF-8)")
    return text


def text_splits(path: str | Path, valid_fraction: float = 0.05, test_fraction: float = 0.05) -> dict[str, str]:
    """split -> text of running text: one UTF-8 file split contiguously (the first 1 - valid -
    test of its characters is train, then valid, then test: held-out text is unseen
    continuation), or a folder of train.txt, valid.txt and test.txt."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CRTError(f"text file {path} does not exist: pass --data-dir with the path of a UTF-8 text file (or a folder of {', '.join(TEXT_FILES.values())})")
    if path.is_dir():
        missing = [f for f in TEXT_FILES.values() if not (path / f).is_file()]
        if missing:
            raise CRTError(
                f"{path} lacks {', '.join(missing)}: a text folder holds {', '.join(TEXT_FILES.values())}; or pass --data-dir one text file to split"
            )
        return {split: read_text(path / f, split) for split, f in TEXT_FILES.items()}
    if not (0 < valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise CRTError(f"valid_fraction={valid_fraction} and test_fraction={test_fraction} must be in (0, 1) with a sum below 1")
    text = read_text(path)
    n = len(text)
    n_valid, n_test = int(n * valid_fraction), int(n * test_fraction)
    n_train = n - n_valid - n_test
    if min(n_train, n_valid, n_test) < 2:
        raise CRTError(
            f"{path} has {n} characters, too few to split with valid_fraction={valid_fraction} and test_fraction={test_fraction} "
            f"(each split needs >= 2 characters): use a longer file or larger fractions"
        )
    return {"train": text[:n_train], "valid": text[n_train : n_train + n_valid], "test": text[n_train + n_valid :]}


def load_text(splits: dict[str, str], name: str, tokenizer: Any) -> Corpus:
    """A corpus of running text (split -> text) with the ids of `tokenizer` (`crt.data.tokenizer`)."""
    streams = {}
    for split in SPLITS:
        try:
            streams[split] = tokenizer.encode(splits[split])
        except CRTError as e:
            raise CRTError(f"{name} {split} split: {e}") from None
    return Corpus(name=name, vocab=tokenizer.vocab, tokenizer=tokenizer, **streams)


def load_chars(path: str | Path, valid_fraction: float = 0.05, test_fraction: float = 0.05) -> Corpus:
    """Character-level corpus from one UTF-8 text file (characters are tokens, newline included).

    The file is split contiguously as `text_splits` does. The vocabulary is every character of
    the whole file, sorted by code point (`CharTokenizer`): with a few hundred symbols at most
    there is no OOV problem worth failing on, and sorted order makes ids independent of where a
    character first appears.
    """
    from crt.data.tokenizer import CharTokenizer

    path = Path(path).expanduser()
    if path.is_dir():
        raise CRTError(f"{path} is not a file: for character data pass --data-dir with the path of one UTF-8 text file")
    splits = text_splits(path, valid_fraction, test_fraction)
    return load_text(splits, path.stem, CharTokenizer.build(splits.values()))


# ---------------------------------------------------------------------------------------------
# batching


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a stream [N] into batch_size contiguous streams [B, N // B], dropping the remainder.

    Row b is data[b * L : (b + 1) * L] with L = N // B (as in PyTorch's word_language_model,
    but batch-first), so consecutive segments of one row are consecutive text.
    """
    if data.dim() != 1:
        raise ValueError(f"batchify expects a 1-D token stream, got shape {tuple(data.shape)}")
    if batch_size < 1:
        raise CRTError(f"batch size must be >= 1, got {batch_size}: set --batch-size to a positive number")
    length = data.numel() // batch_size
    if length < 2:
        # One token per stream gives no (input, target) pair at all.
        raise CRTError(
            f"a split of {data.numel()} tokens cannot feed {batch_size} streams of >= 2 tokens: lower the batch size (--batch-size / --eval-batch-size) or use more data"
        )
    return data[: batch_size * length].view(batch_size, length)  # [B, L]
