"""Data: word-level corpora (PTB, WikiText-2/103), character corpora, the synthetic recall task,
and the long-range memory tasks (MQAR across segments, passkey, facts in real text).

    corpus = load_words("data/ptb")           # or load_chars("input.txt"), make_synthetic()
    train = batchify(corpus.train, 32)        # [B, N // B] contiguous streams
"""

from crt.data.corpus import Corpus, Documents, Vocab, batchify, load_chars, load_words
from crt.data.download import download
from crt.data.memory_tasks import make_facts, make_mqar, make_passkey
from crt.data.synthetic import doc_length, make_synthetic

__all__ = [
    "Corpus",
    "Documents",
    "Vocab",
    "batchify",
    "doc_length",
    "download",
    "load_chars",
    "load_words",
    "make_facts",
    "make_mqar",
    "make_passkey",
    "make_synthetic",
]
