"""Text -> token ids for `crt score`, read line by line with the model's own tokenizer
(`crt.data.tokenizer`: prompts and decoding are the tokenizer's `prompt` and `decode`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import BinaryIO

from crt.data.corpus import utf8_error
from crt.data.tokenizer import Tokenizer
from crt.errors import CRTError


def read_lines(binary: BinaryIO, source: str = "input") -> Iterator[str]:
    """Lines of a byte stream (a file or stdin, read alike), each with its newline, decoded as the
    training data was: strict UTF-8 (an error names the line and byte), a leading byte-order mark
    dropped, everything else as it is (the word tokenizer treats \\r as a line end itself)."""
    for n, raw in enumerate(binary, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise utf8_error(source, raw, e, offset=None, line=n) from None
        yield line.removeprefix("\ufeff") if n == 1 else line


def text_ids(lines: Iterable[str], tokenizer: Tokenizer, map_unk: bool = False, source: str = "input") -> Iterator[int]:
    """Token ids of text given line by line (each line with its newline), lazily: any length.
    Every tokenizer encodes line by line as it encodes a whole split. A token the vocabulary lacks
    is an error naming it and its line, unless map_unk and the (word) vocabulary has <unk>."""
    for n, line in enumerate(lines, 1):
        try:
            yield from tokenizer.encode(line, map_unk).tolist()
        except CRTError as e:
            raise CRTError(f"{source} line {n}: {e}") from None
