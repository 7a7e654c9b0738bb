"""Checkpoints written before the architecture cleanup (issue 17) still load and compute the same logits.

tests/data/checkpoints-7852f30/ holds, for every language model, the config.json and weights of
a tiny 2-step `crt train` run made by crt at commit 7852f30 (before the models owned their steps
and options), and expected.json the logits that code computed for tokens 0..11 over two
segments with the state carried.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crt.checkpoint import load_model
from crt.state import iter_segments

DATA = Path(__file__).resolve().parent / "data" / "checkpoints-7852f30"
EXPECTED = json.loads((DATA / "expected.json").read_text())


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_an_old_checkpoint_loads_and_gives_its_logits(arch):
    model, ckpt = load_model(DATA / arch, "cpu")
    assert model.cfg.arch == arch and not model.training
    x = torch.arange(12).view(1, 12) % model.cfg.vocab_size
    with torch.no_grad():
        logits = torch.cat([lg for _, lg, _ in iter_segments(model, x, model.init_state(1, evaluation=True), 6)], dim=1)[0]  # [12, V]
    torch.testing.assert_close(logits, torch.tensor(EXPECTED[arch]), rtol=0, atol=1e-5)
