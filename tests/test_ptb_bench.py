"""benchmarks/ptb.py: its grid, the dropout each family is tuned to, the two views (equal tokens,
matched FLOPs), the report of a partial grid, and its one-line refusals of bad arguments."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crt.config import apply_overrides, load_preset, parse_assignment
from crt.errors import CRTError
from crt.models import build_model

_spec = importlib.util.spec_from_file_location("ptb_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "ptb.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def cell(name: str, seed: int, p: float, valid: list[float], test: list[float], flops_per_step: float = 1e12, epochs: float = 10) -> dict:
    """A finished cell as run_cell stores it, with a made-up curve (one validation per epoch)."""
    curve = [
        {"step": i + 1, "epochs": i + 1, "train_flops": (i + 1) * flops_per_step, "valid_ppl": v, "test_ppl": t} for i, (v, t) in enumerate(zip(valid, test))
    ]
    return {
        "name": name,
        "seed": seed,
        "epochs_budget": epochs,
        "model": {"dropout": p, "d_model": 128, "n_layer": 3, "n_head": 4, "d_ff": 512},
        "train": {"weight_decay": 0.1, "lr": 1e-3, "min_lr": 1e-4, "precision": "bf16"},
        "machine": "test machine",
        "params": 1000,
        "stopped_early": False,
        "wall_s": 3600.0,
        "cells_at_once": 1,
        "train_tokens_per_s": 100.0,
        "train_flops_per_token": 1e6,
        "curve": curve,
        "best": min(curve, key=lambda c: c["valid_ppl"]),
    }


def test_every_row_builds_and_belongs_to_its_family():
    names = [n for n, _, _ in bench.GRID]
    assert len(names) == len(set(names))
    assert set(bench.TUNING_ROW.values()) <= set(names)
    for name, preset, overrides in bench.GRID:
        mcfg, _ = apply_overrides(*load_preset(preset), {**overrides, **dict.fromkeys(bench.REGULARISATION, 0.1), "vocab_size": 100})
        build_model(mcfg)  # every row's overrides name real fields with valid values
        assert bench.family(preset) == ("crt" if name.startswith("CRT") else "transformer"), name


def test_each_family_takes_the_p_of_its_best_seed_0_tuning_cell_at_this_budget():
    t, c = bench.TUNING_ROW["transformer"], bench.TUNING_ROW["crt"]
    cells = [
        cell(t, 0, 0.0, [130], [120]),
        cell(t, 0, 0.1, [128], [119]),
        cell(t, 0, 0.3, [150], [140]),
        cell(t, 1, 0.3, [100], [90]),  # another seed: not a tuning cell
        cell(t, 0, 0.2, [90], [80], epochs=5),  # another budget: not a tuning cell
        cell(c, 0, 0.3, [99], [93]),
        cell(c, 0, 0.1, [112], [105]),
    ]
    choice = bench.tuned({bench.key_of(x): x for x in cells}, argparse.Namespace(epochs=10))
    assert choice["transformer"][0] == 0.1 and [x["model"]["dropout"] for x in choice["transformer"][1]] == [0.0, 0.1, 0.3]
    assert choice["crt"][0] == 0.3
    untuned = bench.tuned({}, argparse.Namespace(epochs=10))  # no tuning cell: the presets' p
    preset = next(pr for n, pr, _ in bench.GRID if n == c)
    assert untuned["crt"] == (load_preset(preset)[0].dropout, [])


def test_a_cell_key_names_row_p_seed_and_budget():
    x = cell("CRT L=35", 2, 0.1, [1], [1])
    assert bench.key_of(x) == "CRT L=35 | dropout 0.1 | seed 2 | 10 epochs"
    assert bench.key_of(x) != bench.key_of(cell("CRT L=35", 2, 0.3, [1], [1]))


def test_matched_flops_reads_the_curve_log_linearly_and_not_outside_it():
    curve = cell("x", 0, 0.1, [1, 1, 1], [100, 400, 200])["curve"]  # validations at 1e12, 2e12, 3e12 FLOPs
    assert bench.at_flops(curve, 1e12) == pytest.approx(100)
    assert bench.at_flops(curve, 1.5e12) == pytest.approx(200)  # halfway in log space between 100 and 400
    assert bench.at_flops(curve, 3e12) == pytest.approx(200)
    assert math.isnan(bench.at_flops(curve, 0.5e12)) and math.isnan(bench.at_flops(curve, 4e12))


def test_mean_std_says_when_a_seed_has_no_value():
    assert bench.mean_std([1.0, 3.0]) == "2.00 ± 1.41"
    assert bench.mean_std([5.0]) == "5.00"
    assert bench.mean_std([1.0, 3.0, math.nan]) == "2.00 ± 1.41 (2 of 3)"
    assert bench.mean_std([math.nan]) == "-"


def test_the_report_of_a_partial_grid_says_what_it_lacks(tmp_path):
    t, c = bench.TUNING_ROW["transformer"], bench.TUNING_ROW["crt"]
    groups = {
        t: [cell(t, 0, 0.1, [130, 128], [121, 120], flops_per_step=1e12)],
        c: [cell(c, s, 0.1, [100 + s, 99 + s], [95 + s, 94 + s], flops_per_step=2e12) for s in bench.DEFAULT_SEEDS],
    }
    choice = {"transformer": (0.1, groups[t]), "crt": (0.1, groups[c][:1])}
    args = argparse.Namespace(data="ptb", out=str(tmp_path / "ptb.md"), invocation="python benchmarks/ptb.py", epochs=10, evals_per_epoch=1, patience=3)
    text = "\n".join(bench.report(groups, choice, args, "python benchmarks/ptb.py --data-dir D"))
    assert "**The grid is not complete.**" in text
    assert f"fewer than 3 seeds (seeds finished): {t} (1)." in text  # CRT has all three
    missing = [n for n, _, _ in bench.GRID if n not in groups]
    assert "Rows without a finished cell: " + "; ".join(missing) + "." in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {c} |"))
    assert "| 3 (0, 1, 2) |" in row and "| 100.00 ± 1.00 | 95.00 ± 1.00 |" in row  # best valid and its test, mean ± std
    # matched FLOPs: the smallest total is the Transformer's 2e12, where CRT's curve has its first point (95 + seed)
    assert row.rstrip(" |").endswith("96.00 ± 1.00 | 1.00")


def test_a_partial_grid_projects_its_remaining_cells_at_the_device_hours_measured(tmp_path):
    t, c = bench.TUNING_ROW["transformer"], bench.TUNING_ROW["crt"]
    shared = cell(t, 0, 0.1, [130, 128], [121, 120]) | {"wall_s": 7200.0, "cells_at_once": 2}  # 2 h beside another cell: 1 device hour
    groups = {t: [shared], c: [cell(c, s, 0.1, [100, 99], [95, 94]) | {"wall_s": 1800.0} for s in bench.DEFAULT_SEEDS]}
    choice = {"transformer": (0.1, groups[t]), "crt": (0.1, groups[c][:1])}
    args = argparse.Namespace(data="ptb", out=str(tmp_path / "ptb.md"), invocation="python benchmarks/ptb.py", epochs=10, evals_per_epoch=1, patience=3)
    text = "\n".join(bench.report(groups, choice, args, "python benchmarks/ptb.py --data-dir D"))
    empty = len(bench.GRID) - 2
    # the Transformer's 2 missing seeds at its own 1 device hour, the empty rows' 3 seeds each at the median of all cells (0.5 h)
    assert f"{2 + 3 * empty} cells remain: about {2 * 1.0 + 3 * empty * 0.5:.0f} device hours" in text
    assert "else the median of all cells, 0.50)" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {t} |"))
    assert "| 200 |" in row and row.rstrip(" |").endswith("| 1.00")  # device tokens/s (2 x 100) and device hours


def test_the_report_names_each_cells_machine_and_precision(tmp_path):
    base = bench.ABLATED
    groups = {base: [cell(base, s, 0.1, [100], [95 + s]) for s in bench.DEFAULT_SEEDS]}
    groups[base][2]["machine"], groups[base][2]["train"]["precision"] = "other machine", "fp32"
    choice = {"transformer": (0.1, []), "crt": (0.1, groups[base][:1])}
    args = argparse.Namespace(data="ptb", out=str(tmp_path / "ptb.md"), invocation="python benchmarks/ptb.py", epochs=10, evals_per_epoch=1, patience=3)
    lines = bench.report(groups, choice, args, "python benchmarks/ptb.py --data-dir D")
    assert "Machine: 2 machines or thread counts, each cell's named in the Cells table: M1 = test machine; M2 = other machine." in lines
    cells = [line for line in lines if line.startswith(f"| {base} | ") and " | M" in line]
    assert [line.split(" | ")[2:4] for line in cells] == [["M1", "bf16"], ["M1", "bf16"], ["M2", "fp32"]]


def test_welch_t_and_its_p_match_their_closed_forms():
    # means 2 and 6, variances 1 and 4 over 3 seeds each: t = -4 / sqrt(1/3 + 4/3), df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17
    t, df = bench.welch([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
    assert t == pytest.approx(-4 / math.sqrt(5 / 3)) and df == pytest.approx(50 / 17)
    for x in (0.3, 1.0, 2.5, 12.0):
        assert bench.t_pvalue(x, 1) == pytest.approx(1 - 2 / math.pi * math.atan(x), abs=1e-9)  # Cauchy
        assert bench.t_pvalue(-x, 2) == pytest.approx(1 - x / math.sqrt(2 + x * x), abs=1e-9)
    assert bench.t_pvalue(1.959964, 1e7) == pytest.approx(0.05, abs=1e-5)  # many df: the normal's 5% point
    assert bench.t_pvalue(0.0, 3) == pytest.approx(1.0)
    for x in (60.0, 7079.0):  # far in the tail
        assert bench.t_pvalue(x, 1) == pytest.approx(2 / math.pi * math.atan(1 / x), rel=1e-9)  # the Cauchy tail, without cancellation
    r = math.sqrt(2 + 7943.0**2)
    assert bench.t_pvalue(7943.0, 2) == pytest.approx(2 / (r * (r + 7943.0)), rel=1e-6)  # 1 - t/√(2+t²), without its cancellation
    assert bench.t_pvalue(2.776445, 4) == pytest.approx(0.05, abs=1e-6) and bench.t_pvalue(1.959964, math.inf) == pytest.approx(0.05, abs=1e-6)
    assert bench.welch([1.0, 1.0], [2.0, 2.0]) == (-math.inf, math.inf) and bench.t_pvalue(-math.inf, math.inf) == 0.0
    assert all(math.isnan(x) for x in bench.welch([1.0, 1.0], [1.0, 1.0]))  # identical rows: nothing to test
    assert bench.versus([1.0, 1.0], [1.0, 1.0]) == "+0.00 (+0.0%) | - | - | yes"


def test_every_row_is_set_against_the_transformer_70_and_crt_35(tmp_path):
    t, c, ablation = "Transformer L=70", bench.ABLATED, f"{bench.ABLATED}, no memory token"
    assert set(bench.REFERENCES) == {t, c} and ablation in [n for n, _, _ in bench.GRID]
    groups = {
        t: [cell(t, s, 0.1, [130], [x]) for s, x in enumerate((117.0, 119.0, 118.0))],
        c: [cell(c, s, 0.1, [100], [x]) for s, x in enumerate((93.0, 95.0, 94.0))],
        ablation: [cell(ablation, 0, 0.1, [103], [99.0])],
    }
    lines = bench.comparisons(groups)
    row = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and " | " in line}
    # CRT-35 against the Transformer: -24 (-20.3%); both stds 1 over 3 seeds, so t = -24 / sqrt(2/3) on df 4, p far under 0.001; no overlap
    assert row[c] == f"| {c} | 3 | 1.1% | -24.00 (-20.3%) | {-24 / math.sqrt(2 / 3):+.1f} (4.0) | <0.001 | no | - | - | - | - |"
    # one seed: the change and the overlap (99 lies inside neither row's range), no t
    assert row[ablation] == f"| {ablation} | 1 | - | -19.00 (-16.1%) | - | - | no | +5.00 (+5.3%) | - | - | no |"
    assert bench.comparisons({ablation: groups[ablation]}) == []  # neither reference: nothing to set the rows against
    # a reference alone still sets the others against itself
    only = bench.comparisons({c: groups[c], ablation: groups[ablation]})
    assert any(line.startswith(f"| {ablation} | 1 | - | +5.00 (+5.3%) | - | - | no |") for line in only)


def test_train_ppl_is_the_last_epochs_and_is_recovered_for_cells_kept_without_it(tmp_path):
    train = [{"step": s, "split": "train", "loss": float(s)} for s in (10, 20, 30, 40, 45)]  # every 10 steps, and a capped last record
    valid = [{"step": 20, "split": "valid", "loss": 4.6, "ppl": 100.0}, {"step": 45, "split": "valid", "loss": 4.5, "ppl": 99.0}]
    records = train + valid
    # the last 20 steps: records 30, 40 (10 steps each) and 45 (5 steps), weighted by the steps they average
    assert bench.last_epoch_train_ppl(records, per_epoch=20) == pytest.approx(math.exp((30 * 10 + 40 * 10 + 45 * 5) / 25))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def kept(seed: int, valid_ppl: list[float], run_dir: Path, **extra) -> dict:
        x = cell("CRT L=35", seed, 0.1, valid_ppl, [95.0] * len(valid_ppl)) | {"run_dir": str(run_dir), **extra}
        for v, step in zip(x["curve"], (20, 45)):  # 20 steps per epoch: validations at epochs 1 and 2.25
            v["step"], v["epochs"] = step, step / 20
        return x

    first = kept(0, [100.0, 99.0], run)
    other = kept(1, [100.0, 98.0], run)  # the folder holds another run now: its curve differs
    gone = kept(2, [100.0, 99.0], tmp_path / "absent")
    known = kept(3, [100.0, 99.0], run, train_ppl=7.0)
    done = {str(i): x for i, x in enumerate((first, other, gone, known))}
    assert bench.recover_train_ppl(done) is True
    assert first["train_ppl"] == pytest.approx(bench.last_epoch_train_ppl(records, 20)) and known["train_ppl"] == 7.0
    assert "train_ppl" not in other and "train_ppl" not in gone
    assert bench.recover_train_ppl(done) is False  # nothing left to recover
    assert bench.overfit(known) == f"7.00 | {99 / 7:.2f}" and bench.overfit(other) == "- | -"


def test_the_report_says_how_flat_the_cells_ended():
    cells = [cell("x", 0, 0.1, [110, 100], [1, 1]), cell("x", 1, 0.1, [100.5, 100], [1, 1]), cell("x", 2, 0.1, [100], [1])]
    assert bench.final_gain(cells[0]["curve"]) == pytest.approx(0.1) and bench.final_gain(cells[2]["curve"]) is None
    line = bench.converged(cells)
    assert line.startswith("Valid gain at the last validation, over 2 cells: median +5.25%, from +0.50% to +10.00%; 1 gained over 1%")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "a"], "--seeds 'a': give comma-separated integers"),
        (["--seeds", ","], "--seeds is empty"),
        (["--row", "CRT L=36"], "'CRT L=36' names no row of the grid"),
        (["--only", "LSTM"], "'LSTM' names no row of the grid"),
        (["--set", "d_model"], "--set 'd_model': give FIELD=VALUE"),
        (["--set", "dropout=0.2"], "dropout is tuned per family"),
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--patience", "0"], "--patience, --evals-per-epoch and --jobs at least 1"),
        (["--jobs", "0"], "--patience, --evals-per-epoch and --jobs at least 1"),
        (["--tune", "0.1,x"], "give dropouts as comma-separated numbers"),
        (["--tune", "1.5"], "a dropout lies in [0, 1)"),
        (["--tune", "0.1", "--row", "CRT L=17"], "--tune trains the tuning rows"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors_before_any_work(monkeypatch, capsys, tmp_path, argv, message):
    monkeypatch.setattr(sys, "argv", ["ptb.py", "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "ptb.md"), *argv])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not list(tmp_path.iterdir())  # nothing written


def test_set_reads_values_as_a_user_types_them():
    """--set FIELD=VALUE: numbers and booleans typed, words left strings, so apply_overrides' strict types judge them."""
    assert [parse_assignment(x) for x in ("d_model=256", "lr=3e-3", "tie_weights=false", "device=cuda", "frame_shape=")] == [
        ("d_model", 256),
        ("lr", 0.003),
        ("tie_weights", False),
        ("device", "cuda"),
        ("frame_shape", ""),
    ]
    mcfg, tcfg = apply_overrides(*load_preset("ptb-crt-35"), dict(parse_assignment(x) for x in ("d_model=256", "lr=3e-3")))
    assert (mcfg.d_model, tcfg.lr) == (256, 0.003)
    with pytest.raises(CRTError, match="d_model expects an integer"):
        apply_overrides(*load_preset("ptb-crt-35"), dict([parse_assignment("d_model=wide")]))


def tiny_corpus(folder: Path) -> None:
    rng, words = random.Random(0), [f"w{i}" for i in range(30)]
    for split, n in (("train", 150), ("valid", 30), ("test", 30)):
        (folder / f"ptb.{split}.txt").write_text("".join(" ".join(rng.choice(words) for _ in range(20)) + "\n" for _ in range(n)))


def test_an_interrupted_cell_resumes_from_its_last_checkpoint_and_ends_as_an_unbroken_one(monkeypatch, capsys, tmp_path):
    """A cell stopped after a validation (its process killed; here: its later checkpoint removed
    and the results forgotten) goes on from its checkpoint, to the curve of an unbroken run, and
    counts the wall time of both parts; a run of other settings in its folder is left alone."""
    tiny_corpus(tmp_path)
    out, runs = tmp_path / "out" / "ptb.md", tmp_path / "runs"
    tiny = ["--set", "d_model=16", "--set", "d_ff=32", "--set", "n_head=2", "--set", "batch_size=4"]

    def grid(*extra: str) -> dict:
        argv = ["ptb.py", "--data-dir", str(tmp_path), "--out", str(out), "--runs-dir", str(runs), "--seeds", "0", "--row", "CRT L=35", *tiny, "--no-progress"]
        monkeypatch.setattr(sys, "argv", [*argv, "--evals-per-epoch", "2", *extra])
        bench.main()
        return json.loads(out.with_suffix(".json").read_text())

    def kill(folder: Path, key: str) -> int:
        """Its last checkpoint never written, the cell never recorded: the step it goes on from."""
        kept = sorted((folder / "checkpoints").glob("step-*"))
        assert len(kept) == 2
        shutil.rmtree(kept[-1])
        (folder / "checkpoints" / "latest").write_text(kept[0].name)
        cells = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".json").write_text(json.dumps({k: c for k, c in cells.items() if k != key}))
        return int(kept[0].name.split("-")[1])

    unbroken = grid("--epochs", "2")
    (key,) = unbroken
    folder = runs / "crt-l-35-p0.1-s0"
    assert unbroken[key]["run_dir"] == str(folder)
    steps = [kill(folder, key)]
    capsys.readouterr()
    resumed = grid("--epochs", "2")[key]
    assert f"resuming the stopped cell at step {steps[0]}" in capsys.readouterr().out
    assert resumed["resumed_at_step"] == steps[0] and resumed["run_dir"] == str(folder)
    assert [c["valid_ppl"] for c in resumed["curve"]] == pytest.approx([c["valid_ppl"] for c in unbroken[key]["curve"]], rel=1e-5)
    assert resumed["best"]["test_ppl"] == pytest.approx(unbroken[key]["best"]["test_ppl"], rel=1e-5)
    assert resumed["wall_s"] > 0 and unbroken[key]["resumed_at_step"] is None
    assert resumed["train_ppl"] == pytest.approx(unbroken[key]["train_ppl"], rel=1e-5)  # its last epoch's records, across the resume
    assert f"(resumed at step {steps[0]})" in out.read_text()  # the Cells table says so
    # another budget is another cell: it does not continue the 2-epoch run, but trains beside it ...
    other = grid("--epochs", "1")
    assert "holds a run with other settings" in capsys.readouterr().out
    (short,) = set(other) - {key}
    assert other[short]["run_dir"] == str(folder) + "-2" and other[short]["resumed_at_step"] is None
    # ... and, stopped there, goes on in that folder, not the first
    step = kill(Path(other[short]["run_dir"]), short)
    again = grid("--epochs", "1")[short]
    assert f"{folder}-2: resuming the stopped cell at step {step}" in capsys.readouterr().out
    assert again["run_dir"] == str(folder) + "-2" and again["best"]["test_ppl"] == pytest.approx(other[short]["best"]["test_ppl"], rel=1e-5)


def test_jobs_trains_cells_in_processes_of_their_own_and_keeps_each(tmp_path):
    """--jobs 2 at a tiny size: both cells finish in their own processes, each at half the threads, and the report lists them."""
    tiny_corpus(tmp_path)
    rows = [bench.TUNING_ROW["transformer"], bench.TUNING_ROW["crt"]]
    tiny = ["--set", "d_model=16", "--set", "d_ff=32", "--set", "n_head=2", "--set", "batch_size=4"]  # typed by parse_assignment, as a user types them
    argv = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "out" / "ptb.md"), "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", "--seeds", "0"]
    script = Path(bench.__file__)
    done = subprocess.run(
        [sys.executable, str(script), *argv, *tiny, "--row", rows[0], "--row", rows[1], "--jobs", "2", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    cells = json.loads((tmp_path / "out" / "ptb.json").read_text())
    assert sorted(c["name"] for c in cells.values()) == sorted(rows)
    for c in cells.values():
        assert c["cells_at_once"] == 2 and c["model"]["d_model"] == 16 and c["steps"] > 0
        assert f"({max(1, torch.get_num_threads() // 2)} threads)" in c["machine"]  # the cores shared, not oversubscribed
    report = (tmp_path / "out" / "ptb.md").read_text()
    assert all(f"| {r} | 0 | M1 |" in report for r in rows)  # both in the Cells table
