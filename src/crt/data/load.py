"""Data dispatch: the corpus or the clips a TrainConfig names (its data, data_dir and options).

Every caller (training, `crt eval`, the benchmarks) loads data through these two functions, so
a dataset is read one way only.
"""

from __future__ import annotations

from pathlib import Path

from crt.config import TrainConfig
from crt.data.clips import VideoData
from crt.data.corpus import Corpus, load_chars, load_text, load_words, read_text, text_splits, word_files
from crt.data.memory_tasks import make_facts, make_mqar, make_passkey, most_frequent_words
from crt.data.options import WORD_DATA, tokenizer_kind
from crt.data.rgb import load_smarthome
from crt.data.skeletons import load_msr_action3d
from crt.data.synthetic import make_synthetic
from crt.data.synthetic_video import make_synthetic_video
from crt.data.tokenizer import Tokenizer, make_tokenizer
from crt.errors import CRTError


def load_corpus(t: TrainConfig, segment_len: int = 0, vocab_size: int = 0, saved: Tokenizer | None = None) -> Corpus:
    """The corpus a TrainConfig names (data + data_dir + tokenizer + options).

    segment_len: the model's segment length, the grid mqar and facts are laid on unless
    t.task_segment names another.
    vocab_size: the BPE vocabulary to train (--tokenizer bpe).
    saved: a checkpoint's tokenizer (`crt.data.tokenizer.from_meta`): running text read with
        byte, char or bpe is encoded with it, nothing trained (evaluation, resume). Word and
        chars corpora build their vocabulary from the data, for the caller to compare.
    """
    docs = dict(train_docs=t.synth_train_docs, valid_docs=t.synth_valid_docs, test_docs=t.synth_test_docs, seed=t.seed)
    segment = t.task_segment or segment_len
    if t.data in ("mqar", "facts") and not segment:
        raise CRTError(f"data={t.data} is laid on a segment grid: give --task-segment (or load it with the model's segment_len)")
    if t.data == "mqar":
        return make_mqar(pairs=t.mqar_pairs, gap=t.mqar_gap, vocab=t.mqar_vocab, segment=segment, filler_vocab=t.synth_filler_vocab, **docs)
    if t.data == "passkey":
        return make_passkey(digits=t.passkey_digits, distance=t.passkey_distance, filler_vocab=t.synth_filler_vocab, **docs)
    if t.data == "facts":
        if not t.data_dir:
            raise CRTError("data=facts hides its facts in real text: give --data-dir the folder of PTB or WikiText-2 (`crt data download ptb --dir DIR`)")
        text = load_words(t.data_dir, map_unk=t.map_unk)
        return make_facts(
            most_frequent_words(text, t.facts_words) if t.facts_words else text, count=t.facts_count, length=t.facts_length, segment=segment, **docs
        )
    if t.data == "synthetic":
        return make_synthetic(
            pairs=t.synth_pairs,
            keys=t.synth_keys,
            values=t.synth_values,
            filler=t.synth_filler,
            filler_vocab=t.synth_filler_vocab,
            query_rounds=t.synth_query_rounds,
            **docs,
        )
    if not t.data_dir:
        raise CRTError(f"data={t.data} needs --data-dir: the folder of the corpus files (or `crt data download {t.data} --dir DIR`)")
    tokenizer = tokenizer_kind(t)
    if t.data in WORD_DATA:
        kind = {"ptb": "ptb", "words": "auto"}.get(t.data, "wikitext")
        if tokenizer == "word":
            return load_words(t.data_dir, kind=kind, map_unk=t.map_unk)
        directory, _, files = word_files(t.data_dir, kind)  # the corpus files read as running text
        splits, name = {split: read_text(f, split) for split, f in files.items()}, directory.name
    elif t.data == "chars":
        return load_chars(t.data_dir)
    elif t.data == "text":
        splits, name = text_splits(t.data_dir), Path(t.data_dir).expanduser().stem
    else:
        raise CRTError(f"unknown data {t.data!r}: use synthetic, mqar, passkey, facts, ptb, wikitext-2, wikitext-103, words, chars or text")
    if saved is not None and saved.kind != tokenizer:
        raise CRTError(f"the checkpoint's tokenizer is {saved.kind}, not {tokenizer}: evaluate and resume with the tokenizer the model was trained with")
    return load_text(splits, name, saved or make_tokenizer(tokenizer, splits, vocab_size))


VIDEO_DATA = ("msr-action3d", "smarthome", "synthetic-video")


def load_video_data(t: TrainConfig, segment_len: int) -> VideoData:
    """The clips a TrainConfig names (data + data_dir + video options)."""
    if t.data == "synthetic-video":
        return make_synthetic_video(classes=t.video_classes, frames_per_segment=segment_len, noise=t.video_noise, seed=t.seed)
    if t.data not in VIDEO_DATA:
        raise CRTError(f"data={t.data!r} is not a video dataset: use one of {', '.join(VIDEO_DATA)} with --task video")
    if not t.data_dir:
        raise CRTError(f"data={t.data} needs --data-dir: the folder holding the clips")
    if t.data == "msr-action3d":
        return load_msr_action3d(t.data_dir, normalise=t.video_normalise, motion=t.video_motion)
    return load_smarthome(t.data_dir, protocol=t.video_protocol, size=t.video_size, max_frames=t.video_max_frames)
