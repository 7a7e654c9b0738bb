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

DATA = {
    "lm": ("synthetic", "mqar", "passkey", "facts", "ptb", "wikitext-2", "wikitext-103", "words", "chars"),
    "video": ("msr-action3d", "smarthome", "synthetic-video"),
}


@dataclass
class DataSource:
    """What is read, and from where."""

    task: str = "lm"  # lm (language modelling) | video (frame-sequence classification)
    data: str = "synthetic"  # lm: synthetic | mqar | passkey | facts | ptb | wikitext-2 | wikitext-103 | words | chars; video: msr-action3d | smarthome | synthetic-video
    data_dir: str = ""  # directory of the corpus files (a text file for chars; for facts the PTB or WikiText folder whose text hides the facts; for msr-action3d the folder holding the archive, the archive, or its unpacked folder)
    map_unk: bool = False  # map valid/test words unseen in train to <unk> instead of failing

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"task": ("lm", "video")}
    RANGES: ClassVar[dict[str, str]] = {}
    USED_BY: ClassVar[dict] = {"map_unk": ("word corpora", lambda m, t: t.data in ("ptb", "wikitext-2", "wikitext-103", "words", "facts"))}


DATA_GROUPS = (DataSource, SyntheticOptions, MemoryTaskOptions, VideoOptions)

__all__ = ["DATA", "DATA_GROUPS", "DataSource", "MemoryTaskOptions", "SyntheticOptions", "VideoOptions"]
