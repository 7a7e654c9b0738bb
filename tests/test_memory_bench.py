"""benchmarks/memory.py: the grid it plans, the curriculum and configs of its cells, and what it carries and scores."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from crt.data.memory_tasks import facts_length_of, mqar_length, passkey_length
from crt.models import build_model

_spec = importlib.util.spec_from_file_location("memory_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_the_default_grid_has_every_model_on_every_task_and_wide_memories_on_three():
    cells = bench.plan(bench.KNOBS, [], [])
    assert len(cells) == len(set(cells)) == 116
    narrow = [m for m in bench.MODELS if m not in bench.WIDE]
    for task in bench.TASKS:
        seeds = bench.SEEDS.get(task, (0,))
        assert {(m, s) for t, m, s in cells if t == task and m in narrow} == {(m, s) for m in narrow for s in seeds}
        assert {m for t, m, _ in cells if t == task and m in bench.WIDE} == (bench.WIDE if task in bench.WIDE_TASKS else set())
    assert cells[-1][1] in bench.WIDE  # the slowest last
    assert bench.plan(bench.KNOBS, ["rmt-"], ["passkey"]) == [("passkey", m, s) for s in (0, 1, 2) for m in ("rmt-4", "rmt-16")]  # names containing "rmt-"


def test_curriculum_warms_up_then_halves_then_trains_at_the_cell_distance():
    assert bench.curriculum("mqar", {"mqar_gap": 8}) == [-1, 4, 8]
    assert bench.curriculum("mqar", {"mqar_gap": 1}) == [-1, 0, 1]
    assert bench.curriculum("facts", {"facts_length": 128}) == [32, 64, 128]
    assert bench.curriculum("passkey", {"passkey_distance": 32}) == [4, 16, 32]
    assert bench.curriculum("facts", {"facts_length": 32}) == [32]


@pytest.mark.parametrize("task", list(bench.TASKS))
def test_every_cell_config_is_valid_and_the_steps_add_up(tmp_path, task):
    for model in bench.MODELS:
        mcfg, tcfg, stages = bench.configs(task, model, bench.KNOBS, 0, tmp_path)
        mcfg.validate(), tcfg.validate()
        assert sum(s.steps for s in stages) == bench.KNOBS["steps"] and stages[-1].changes == {
            bench.distance_field(tcfg.data): bench.TASKS[task][1][bench.distance_field(tcfg.data)]
        }
        if model == "full":  # the ceiling sees the whole document in one segment
            length = {
                "mqar": lambda: mqar_length(tcfg.mqar_pairs, tcfg.mqar_gap, 16),
                "passkey": lambda: passkey_length(tcfg.passkey_digits, tcfg.passkey_distance),
                "facts": lambda: facts_length_of(tcfg.facts_count, tcfg.facts_length),
            }[tcfg.data]()
            assert mcfg.segment_len == length
    keys = {bench.cell_key(task, m, bench.KNOBS, s) for m in bench.MODELS for s in (0, 1)}
    assert len(keys) == 2 * len(bench.MODELS)  # every cell its own key
    assert bench.cell_key(task, "xl", {**bench.KNOBS, "steps": 2400}, 0) not in keys  # another budget is another cell


def test_carried_floats_and_the_elimination_floor(tmp_path):
    mcfg, _, _ = bench.configs("passkey", "crt-gru-64", bench.KNOBS, 0, tmp_path)
    mcfg.vocab_size = 20
    model = build_model(mcfg)
    assert bench.carried_floats(model, "crt-gru-64") == 64 + 64  # the memory vector and the positional GRU's state
    assert bench.elimination_floor(1) == 1.0 and bench.elimination_floor(2) == 0.75
    assert bench.elimination_floor(8) == pytest.approx(sum(1 / i for i in range(1, 9)) / 8)
