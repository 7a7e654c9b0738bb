"""Building blocks shared by every model in crt."""

from crt.layers.associative import AssociativeMemory
from crt.layers.attention import CausalSelfAttention, FixedKVCache, KVCache
from crt.layers.block import Block, blocks_flops
from crt.layers.embedding import TokenEmbedding
from crt.layers.feedforward import FeedForward
from crt.layers.gru import GRU, gru_flops
from crt.layers.init import init_weights
from crt.layers.mingru import MinGRU, mingru_flops
from crt.layers.ncgru import NCGRU
from crt.layers.positional import AbsolutePositions, LearnedPositions, Rotary, apply_rotary, recurrent_positions, sinusoidal_table
from crt.layers.trunk import SegmentCache, SegmentTrunk

__all__ = [
    "AbsolutePositions",
    "AssociativeMemory",
    "Block",
    "CausalSelfAttention",
    "FeedForward",
    "FixedKVCache",
    "GRU",
    "KVCache",
    "LearnedPositions",
    "MinGRU",
    "NCGRU",
    "Rotary",
    "SegmentCache",
    "SegmentTrunk",
    "TokenEmbedding",
    "apply_rotary",
    "blocks_flops",
    "gru_flops",
    "init_weights",
    "mingru_flops",
    "recurrent_positions",
    "sinusoidal_table",
]
