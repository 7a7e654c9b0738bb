"""Inference on streams: token-by-token state, sampling, streaming perplexity, export, int8."""

from crt.infer.generate import generate, sample, score_stream
from crt.infer.load import load_language_model
from crt.infer.quantize import quantize_int8
from crt.infer.stream import Segments, Stream, open_segments, open_stream

__all__ = ["Segments", "Stream", "generate", "load_language_model", "open_segments", "open_stream", "quantize_int8", "sample", "score_stream"]
