"""Which data a run reads: the source fields of TrainConfig, and every data option group.

TrainConfig inherits them all, so each is one flat --flag and TOML key, while each group is
declared beside its data: `SyntheticOptions` (crt.data.synthetic), `MemoryTaskOptions`
(crt.data.memory_tasks), `VideoOptions` (crt.data.clips). A group declares its fields, their
RANGES (and CHOICES), and USED_BY: who reads each field, for the "--flag does nothing here" warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from crt.data.clips import VideoOptions
from crt.data.memory_tasks import MemoryTaskOptions
from crt.data.synthetic import SyntheticOptions
from crt.errors import CRTError

DATA = {
    "lm": ("synthetic", "mqar", "passkey", "facts", "ptb", "wikitext-2", "wikitext-103", "words", "chars", "text"),
    "video": ("msr-action3d", "smarthome", "synthetic-video"),
}

TOKENIZERS = ("word", "char", "byte", "bpe")
WORD_DATA = ("ptb", "wikitext-2", "wikitext-103", "words")  # word corpora: also running text for char, byte and bpe
MEMORY_TASKS = ("synthetic", "mqar", "passkey", "facts")


@dataclass
class DataSource:
    """What is read, and from where."""

    task: str = "lm"  # lm (language modelling) | video (frame-sequence classification)
    data: str = "synthetic"  # lm: synthetic | mqar | passkey | facts | ptb | wikitext-2 | wikitext-103 | words | chars | text (any UTF-8 text); video: msr-action3d | smarthome | synthetic-video
    data_dir: str = ""  # directory of the corpus files (a text file for chars; for text a file, split 90/5/5, or a folder of train.txt, valid.txt and test.txt; for facts the PTB or WikiText folder whose text hides the facts; for msr-action3d the folder holding the archive, the archive, or its unpacked folder)
    map_unk: bool = False  # map valid/test words unseen in train to <unk> instead of failing
    tokenizer: str = "auto"  # auto | word | char | byte | bpe: how text becomes tokens; auto: word for ptb, wikitext, words and the memory tasks, char for chars, byte for text. byte, char and bpe (byte-level BPE of --vocab-size tokens trained on the train split; pip install 'crt[bpe]') read ptb, wikitext, words and text as running text

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"task": ("lm", "video"), "tokenizer": ("auto", *TOKENIZERS)}
    RANGES: ClassVar[dict[str, str]] = {}
    USED_BY: ClassVar[dict] = {
        "map_unk": ("word corpora", lambda m, t: t.data in WORD_DATA + ("facts",) and tokenizer_kind(t) == "word"),
        "tokenizer": ("language models", lambda m, t: t.task == "lm"),
    }


def tokenizer_kind(t: DataSource) -> str:
    """t.tokenizer with auto resolved, or a CRTError for a pairing that makes no sense: the memory
    tasks are made of word ids, chars is the char tokenizer on a file (other kinds: --data text),
    and word-level text is --data words."""
    if t.task != "lm":
        return ""
    kind = t.tokenizer if t.tokenizer != "auto" else {"chars": "char", "text": "byte"}.get(t.data, "word")
    if t.data in MEMORY_TASKS and kind != "word":
        raise CRTError(f"--tokenizer {kind} with --data {t.data}: the memory tasks are made of word tokens, so drop --tokenizer (or give word)")
    if t.data == "chars" and kind != "char":
        raise CRTError(f"--tokenizer {kind} with --data chars: chars reads a file as characters; for {kind} tokens use --data text")
    if t.data == "text" and kind == "word":
        raise CRTError("--tokenizer word with --data text: word-level text is --data words (a folder of ptb.*.txt or wiki.*.tokens); give byte, char or bpe")
    return kind


DATA_GROUPS = (DataSource, SyntheticOptions, MemoryTaskOptions, VideoOptions)

__all__ = ["DATA", "DATA_GROUPS", "TOKENIZERS", "tokenizer_kind", "DataSource", "MemoryTaskOptions", "SyntheticOptions", "VideoOptions"]
