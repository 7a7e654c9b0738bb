"""Load a trained language model for inference."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from crt.checkpoint import load_checkpoint, load_model
from crt.config import ModelConfig, TrainConfig, config_from_dict
from crt.data.tokenizer import Tokenizer, from_meta
from crt.errors import CRTError


def load_language_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Tokenizer, ModelConfig, TrainConfig]:
    """(model in eval mode, its tokenizer, model config, train config) of a language-model
    checkpoint (a run directory or a checkpoint folder)."""
    ckpt = load_checkpoint(path)
    mcfg, tcfg = config_from_dict(ModelConfig, ckpt.meta["model"]), ckpt.train_config()
    if tcfg.task != "lm":
        raise CRTError(f"{ckpt.path} is a {mcfg.arch} frame-sequence classifier: this command needs a language model checkpoint")
    tokenizer = from_meta(ckpt.meta)  # before the model: a missing `tokenizers` package is one line
    model, _ = load_model(ckpt, device, mcfg)
    return model, tokenizer, mcfg, tcfg
