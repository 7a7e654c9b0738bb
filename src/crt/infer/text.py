"""Text <-> token ids for inference, with the tokenisation the model was trained with.

Word corpora (PTB, WikiText, the synthetic corpus): whitespace-split words, `<eos>` at the end
of every line. Character corpora: every character is a token, newline included.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import BinaryIO

from crt.data.corpus import EOS, UNK, Vocab
from crt.errors import CRTError


def read_lines(binary: BinaryIO, chars: bool, source: str = "input") -> Iterator[str]:
    """Lines of a byte stream (a file or stdin, read alike), decoded as the training data was:
    strict UTF-8 (an error names the line), a leading byte-order mark dropped; for words, \r\n
    and a lone \r end a line as \n does (as the word loaders read); characters are kept as they
    are, \r included (as `load_chars` reads them)."""
    for n, raw in enumerate(binary, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CRTError(f"{source} is not UTF-8 text ({e.reason} at byte {e.start} of line {n}): re-encode it as UTF-8") from None
        if n == 1:
            line = line.removeprefix("\ufeff")
        if chars or "\r" not in line:
            yield line
            continue
        pieces = line.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        yield from (p + "\n" for p in pieces[:-1])
        if pieces[-1]:
            yield pieces[-1]


def text_ids(lines: Iterable[str], vocab: Vocab, chars: bool, map_unk: bool = False, source: str = "input") -> Iterator[int]:
    """Token ids of text given line by line (each line with its newline), lazily: any length.

    A token the vocabulary lacks is an error naming it and its line, unless map_unk and the
    vocabulary has <unk> (characters: no <unk>, always an error).
    """
    unk = vocab.stoi.get(UNK) if map_unk else None
    for n, line in enumerate(lines, 1):
        tokens = line if chars else line.split() + [EOS]
        for token in tokens:
            i = vocab.stoi.get(token)
            if i is None:
                if unk is not None:
                    i = unk
                else:
                    fix = "pass --map-unk to score it as <unk>" if UNK in vocab.stoi and not chars else "the model cannot score it; remove it"
                    raise CRTError(f"{source} line {n}: {token!r} is not in the model's vocabulary ({len(vocab)} tokens): {fix}")
            yield i


def prompt_ids(prompt: str, vocab: Vocab, chars: bool) -> list[int]:
    """A generation prompt -> ids (no <eos> appended). An empty prompt starts at the start of a
    line: after an <eos> (words) or a newline (characters; a prompt of spaces is text there)."""
    if not (prompt if chars else prompt.strip()):
        start = "\n" if chars else EOS
        if start not in vocab.stoi:
            raise CRTError(f"an empty prompt starts after {start!r} (the start of a line), which this model's vocabulary lacks: give --prompt some text")
        return [vocab.stoi[start]]
    tokens = list(prompt) if chars else prompt.split()
    unknown = next((t for t in tokens if t not in vocab.stoi), None)
    if unknown is not None:
        what = "character" if chars else "word"
        fix = f"replace it with {UNK}" if UNK in vocab.stoi and not chars else f"use only {what}s seen in the training data"
        raise CRTError(f"the prompt's {what} {unknown!r} is not in the model's vocabulary ({len(vocab)} tokens): {fix}")
    return vocab.encode(tokens)


def detokenize(ids: list[int], vocab: Vocab, chars: bool) -> str:
    """Ids -> text: characters joined; words joined by spaces, <eos> as a line break."""
    tokens = vocab.decode(ids)
    if chars:
        return "".join(tokens)
    return " ".join(tokens).replace(f" {EOS} ", "\n").replace(EOS, "\n")
