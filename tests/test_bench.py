"""`crt bench` measures what it says: its cases run, its report derives the target ratios from them."""

import dataclasses
import importlib.util
import math

import pytest
from cli_helpers import in_process, one_line_error

from crt.analysis import bench, peers, speed_report
from crt.config import load_preset


def tiny_case(name: str, precision: str = "fp32", **model) -> dict:
    mcfg, tcfg = load_preset(name)
    mcfg = dataclasses.replace(mcfg, vocab_size=50, d_model=16, n_layer=1, n_head=2, d_ff=32, **model)
    mcfg.mem_len = mcfg.memory_len
    tcfg = dataclasses.replace(tcfg, batch_size=2)
    return {
        "name": name,
        "precision": precision,
        "model": dataclasses.asdict(mcfg),
        "train": dataclasses.asdict(tcfg),
        "device": "cpu",
        "threads": 1,
        "steps": 1,
        "repeats": 2,
        "infer_batch": 1,
        "infer_tokens": 40,
        "stream": None,
    }


@pytest.mark.parametrize("name", ["ptb-crt-35", "ptb-transformer-70", "ptb-xl-35", "ptb-rmt-35", "ptb-armt-35"])
def test_run_case_measures_every_quantity(name):
    r = bench.run_case(tiny_case(name))
    assert len(r["train_runs"]) == 2 and len(r["infer_runs"]) == 2
    assert all(x > 0 and math.isfinite(x) for x in r["train_runs"] + r["infer_runs"])
    assert r["train_tokens_per_s"] == pytest.approx(sorted(r["train_runs"])[0] + (sorted(r["train_runs"])[1] - sorted(r["train_runs"])[0]) / 2)
    assert r["peak_memory_mib"] >= r["baseline_memory_mib"] > 0
    assert r["mfu"] == pytest.approx(r["train_tokens_per_s"] * r["train_flops_per_token"] / r["matmul_peak_flops"])


def test_report_ratios_come_from_the_results():
    def row(name, precision, rate):
        return {
            "name": name,
            "precision": precision,
            "params": 1,
            "train_tokens_per_s": rate,
            "infer_tokens_per_s": 1.0,
            "peak_memory_mib": 1.0,
            "train_flops_per_token": 1e6,
            "mfu": 0.5,
            "matmul_peak_flops": 1e9,
        }

    results = [
        row("ptb-crt-35", "fp32", 300.0),
        row("ptb-transformer-70", "fp32", 100.0),
        row("ptb-crt-35", "bf16", 450.0),
        {"name": "ptb-xl-35", "precision": "fp32", "error": "RuntimeError: boom"},
    ]
    text = speed_report.report(results, "crt bench", "machine", "notes")
    assert "| CRT L=35 / Transformer L=70 | fp32 | 3.00x | >= 1.5x | met |" in text
    assert "| bf16 / fp32 training, ptb-crt-35 | - | 1.50x | >= 1.8x | not met |" in text
    assert "failed: RuntimeError: boom" in text
    assert "Transformer-XL" not in text.split("## Targets")[1]  # no ratio from a failed case


def test_trap_cases_change_only_what_they_test():
    cases = bench.make_cases(
        ["ptb-crt-35"],
        ["fp32"],
        peers=False,
        traps=True,
        device="cpu",
        threads=1,
        steps=1,
        repeats=1,
        infer_batch=1,
        infer_tokens=10,
        stream=None,
        overrides={"d_model": 64},
    )
    base, *traps = cases
    assert [c["name"] for c in traps] == [f"ptb-crt-35 [{label}]" for label, _, _ in bench.TRAPS]
    assert base["model"]["d_model"] == 64 and base["model"]["vocab_size"] == 10_000
    for case, (_, fields, model) in zip(traps, bench.TRAPS, strict=True):
        assert {k: v for k, v in case.items() if k not in fields} == {**base, "name": case["name"], "model": case["model"]}
        assert {k: case[k] for k in fields} == fields
        assert case["model"] == {**base["model"], **model}
    text = speed_report.report(
        [
            {
                "name": c["name"],
                "precision": "fp32",
                "params": 1,
                "train_tokens_per_s": 100.0 * (i + 1),
                "infer_tokens_per_s": 1.0,
                "peak_memory_mib": 1.0,
                "train_flops_per_token": 1e6,
                "mfu": 0.1,
                "matmul_peak_flops": 1e9,
            }
            for i, c in enumerate(cases)
        ],
        "c",
        "m",
        "n",
    )
    assert "| glibc malloc defaults | 200 | 2.00x |" in text


def test_diagonal_case_times_both_schedules_and_they_agree():
    cases = bench.make_cases(
        [],
        ["fp32"],
        peers=False,
        traps=False,
        device="cpu",
        threads=1,
        steps=1,
        repeats=2,
        infer_batch=1,
        infer_tokens=10,
        stream=None,
        overrides={"d_model": 16, "n_head": 2, "d_ff": 32, "segment_len": 5},
        diagonal=(6, 4),
    )
    assert len(cases) == 1 and cases[0]["diagonal"] and cases[0]["model"]["n_layer"] == 4 and cases[0]["model"]["arch"] == "armt"
    r = bench.run_diagonal(cases[0])
    assert (r["segments"], r["layers"], r["segment_len"]) == (6, 4, 5)
    assert len(r["seq_runs"]) == len(r["diag_runs"]) == 2 and min(r["seq_runs"] + r["diag_runs"]) > 0
    assert r["max_logit_diff"] < 1e-4  # the same model: only float summation order differs
    text = speed_report.report([r], "crt bench --diagonal", "machine", "notes")
    d = bench.diagonal_summary(r)
    assert f"| 6 x 4 | {d['sequential_s']:.3f} | {d['diagonal_s']:.3f} | {d['speedup']:.2f}x |" in text


def test_bench_rejects_unknown_precision(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(in_process(capsys, "bench", "--precision", "fp8"), "fp8")


@pytest.mark.skipif(importlib.util.find_spec("x_transformers") is not None, reason="the peer libraries are installed")
def test_bench_peers_without_the_extra_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(in_process(capsys, "bench", "--peers"), "pip install")


@pytest.mark.skipif(
    importlib.util.find_spec("x_transformers") is None or importlib.util.find_spec("recurrent_memory_transformer_pytorch") is None,
    reason="peer libraries not installed (pip install -e '.[bench]')",
)
@pytest.mark.parametrize("peer", list(peers.PEERS))
def test_peers_run_on_the_state_interface(peer):
    case = {**tiny_case(peers.PEERS[peer]), "name": peer, "peer": peer}
    r = bench.run_case(case)
    assert r["train_tokens_per_s"] > 0 and r["infer_tokens_per_s"] > 0
