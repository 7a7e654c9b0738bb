"""Shared fixtures: the read-only benchmark data beside the repository (../shared/data)."""

from pathlib import Path

import pytest

_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def ptb_dir() -> Path:
    """../shared/data/ptb (ptb.{train,valid,test}.txt), or skip when this machine lacks it."""
    path = _DATA / "ptb"
    if not path.is_dir():
        pytest.skip(f"../shared/data/ptb not found: {path} holds the PTB files on the project machines")
    return path


@pytest.fixture
def wikitext2_dir() -> Path:
    """../shared/data/wikitext-2 (wiki.{train,valid,test}.tokens), or skip when this machine lacks it."""
    path = _DATA / "wikitext-2"
    if not path.is_dir():
        pytest.skip(f"../shared/data/wikitext-2 not found: {path} holds the WikiText-2 files on the project machines")
    return path
