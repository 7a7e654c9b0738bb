"""`crt bench` measures what it says: its cases run, its report derives the target ratios from them."""

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import in_process, one_line_error

from crt.analysis import bench, peers, rounds, speed_report
from crt.analysis.flops import with_vocab
from crt.config import ModelConfig, load_preset
from crt.errors import CRTError
from crt.models import build_model
from crt.state import detach
from crt.train.segments import window_loss


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
    # per token: 40 tokens fed one per call through crt.infer.Stream, the first quarter (10) dropped as warm-up
    assert len(r["token_latency_runs"]) == 30 and all(x > 0 for x in r["token_latency_runs"])
    runs = sorted(r["token_latency_runs"])
    assert r["token_latency_p95_ms"] == pytest.approx(1e3 * runs[27]) and r["token_latency_ms"] == pytest.approx(1e3 * (runs[14] + runs[15]) / 2)


def test_report_ratios_come_from_the_results():
    def row(name, precision, rate, mfu=0.5):
        return {
            "name": name,
            "precision": precision,
            "params": 1,
            "train_tokens_per_s": rate,
            "infer_tokens_per_s": 1.0,
            "peak_memory_mib": 1.0,
            "train_flops_per_token": 1e6,
            "mfu": mfu,
            "matmul_peak_flops": 1e9,
        }

    results = [
        row("ptb-crt-35", "fp32", 300.0, mfu=0.45),
        row("ptb-crt-35 [busy 1]", "fp32", 150.0, mfu=0.2),
        row("ptb-transformer-70", "fp32", 100.0, mfu=0.6),
        row("x-transformers", "fp32", 50.0, mfu=0.1),  # a peer: not one of our models' MFUs
        row("ptb-crt-35", "bf16", 450.0),
        {"name": "ptb-xl-35", "precision": "fp32", "error": "RuntimeError: boom"},
    ]
    text = speed_report.report(results, "crt bench", "machine", "notes")
    targets = text.split("## Targets")[1]
    assert "| Transformer L=70 / x-transformers, training tokens/s | fp32 | 2.00x | >= 1.2x | met |" in targets
    assert "| CRT L=35 MFU / Transformer L=70 MFU | fp32 | 0.75x | >= 1.0x | not met |" in targets
    assert "| lowest training MFU of our models (ptb-crt-35) | fp32 | 45.0% | >= 50% | not met |" in targets
    assert "| bf16 / fp32 training, ptb-crt-35 | - | 1.50x | >= 2.0x (native bf16) | not met |" in targets
    assert "| ptb-crt-35 | fp32 | 300 | 150 | 0.50x | - | - |" in text.split("## Under a busy core")[1]
    assert "failed: RuntimeError: boom" in text
    assert "Transformer-XL" not in targets  # no ratio from a failed case
    assert "## CPU traps" not in text  # a busy twin is not a trap A/B


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


@pytest.mark.skipif(not peers.missing_packages(), reason="the peer libraries are installed")
def test_bench_peers_without_the_extra_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(in_process(capsys, "bench", "--peers"), "pip install")


def test_peer_cases_need_every_peer_library(monkeypatch):
    monkeypatch.setattr(bench, "missing_packages", lambda: ["mambapy"])
    with pytest.raises(CRTError, match=r"mambapy missing\): pip install"):
        bench.make_cases([], ["fp32"], True, False, "cpu", 1, 1, 1, 1, 10, None, {})


def _installed(peer: str):
    module = peers.PACKAGES[peer]
    return pytest.param(peer, marks=pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} not installed (pip install -e '.[bench]')"))


@pytest.mark.parametrize("peer", [_installed(p) for p in peers.PEERS])
def test_peers_run_on_the_state_interface(peer):
    case = {**tiny_case(peers.PEERS[peer]), "name": peer, "peer": peer}
    r = bench.run_case(case)
    assert r["train_tokens_per_s"] > 0 and r["infer_tokens_per_s"] > 0
    if peer in peers.MATCHED:  # a pure recurrence: its package's own per-token step
        assert r["token_latency_ms"] > 0 and r["train_flops_per_token"] > 0
    else:  # the transformer wrappers have no per-token step
        assert r["token_latency_runs"] is None and r["token_latency_ms"] is None


MATCHED = [_installed(p) for p in peers.MATCHED]
TINY = dict(arch="crt", vocab_size=23, d_model=32, n_layer=2, n_head=4, d_ff=64, segment_len=5, dropout=0.0, emb_dropout=0.0)


def _package_forward(model, tokens):
    """The package's own forward over a whole sequence from its zero start (no state in, none out)."""
    if isinstance(model, peers.PeerMinGRU):
        return model.net(tokens)  # minLM.forward
    return model.head(model.norm_f(model.mamba(model.embedding(tokens))))  # mambapy's Mamba.forward between our embedding and tied head


@pytest.mark.parametrize("peer", MATCHED)
def test_matched_peer_has_its_presets_parameter_count(peer, monkeypatch):
    """What `crt bench --peers` builds: the preset's width and cases (B, L, K), the depth nearest its parameter count."""
    monkeypatch.setattr(bench, "missing_packages", lambda: [])  # the other peers' libraries are not needed to make the cases
    preset = peers.PEERS[peer]
    cases = bench.make_cases([], ["fp32"], True, False, "cpu", 1, 1, 1, 1, 10, None, {})
    ours, case = next(c for c in cases if c["name"] == preset), next(c for c in cases if c["name"] == peer)
    assert (case["model"], case["train"]) == (ours["model"], ours["train"])  # same width, vocabulary, segment, batch and BPTT depth
    mcfg, tcfg = load_preset(preset)
    mcfg = with_vocab(mcfg, tcfg, preset)
    mcfg.mem_len = mcfg.memory_len
    target = sum(p.numel() for p in build_model(mcfg).parameters())
    assert case["match_params"] == target
    torch.manual_seed(0)
    model = peers.build_peer(peer, ModelConfig(**case["model"]), case["match_params"])
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / target - 1) <= peers.PARAM_TOLERANCE, f"{peer}: {n:,} parameters against {preset}'s {target:,}"
    assert model.cfg.d_model == mcfg.d_model and peers.param_count(lambda: peers.build_peer(peer, mcfg, target)) == n
    for depth in (model.depth - 1, model.depth + 1):  # the nearest depth: one layer fewer or more is no closer
        assert abs(peers.param_count(lambda d=depth: type(model)(mcfg, d)) - target) >= abs(n - target)


@pytest.mark.parametrize("peer", MATCHED)
def test_matched_peer_carries_its_state_across_segments(peer):
    torch.manual_seed(0)
    model = peers.build_peer(peer, ModelConfig(**TINY)).eval()
    x = torch.randint(23, (2, 12), generator=torch.Generator().manual_seed(1))  # [2, 12]
    with torch.no_grad():
        whole, whole_state = model(x, model.init_state(2))  # [2, 12, 23]
        state, parts = model.init_state(2), []
        for segment in x.split(5, dim=1):  # 5, 5 and 2 tokens, the state carried
            logits, state = model(segment, state)
            parts.append(logits)
        torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5)
        for a, b in zip(state, whole_state, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        # the state matters: the second segment from a fresh state is another answer
        assert (model(x[:, 5:10], model.init_state(2))[0] - whole[:, 5:10]).abs().max() > 1e-3
        # the package's own forward over the whole sequence, and its own per-token step, agree with the segments
        torch.testing.assert_close(_package_forward(model, x), whole, atol=1e-5, rtol=1e-5)
        stream = model.stream(2)
        torch.testing.assert_close(torch.stack([stream.feed(x[:, t]) for t in range(12)], dim=1), whole, atol=1e-5, rtol=1e-5)
    assert type(detach(state)) is type(state) and all(t.shape[0] == 2 for t in state)


@pytest.mark.parametrize("peer", MATCHED)
def test_matched_peer_trains_through_its_carried_state(peer):
    torch.manual_seed(0)
    model = peers.build_peer(peer, ModelConfig(**{**TINY, "dropout": 0.1})).train()
    data = torch.randint(23, (2, 2 * 5 + 1), generator=torch.Generator().manual_seed(2))  # [B=2, K*L+1]
    # the second segment's loss reaches back through the state the first one carried (BPTT over K = 2)
    logits, state = model(data[:, :5], model.init_state(2))
    logits, _ = model(data[:, 5:10], state)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(logits.square().sum(), list(state)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, state = [], model.init_state(2)
    for _ in range(8):  # one window of K = 2 segments each step, as `crt bench` and `crt train` run it
        loss, state = window_loss(model, data[:, :-1], data[:, 1:], model.init_state(2), 5, 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(not t.requires_grad for t in detach(state))


def test_report_shows_per_token_latency_and_matched_sizes():
    row = {
        "precision": "fp32",
        "train_tokens_per_s": 1.0,
        "infer_tokens_per_s": 1.0,
        "peak_memory_mib": 1.0,
        "train_flops_per_token": 1e6,
        "mfu": 0.1,
        "matmul_peak_flops": 1e9,
    }
    matched = {"depth": 7, "width": 128, "match_params": 1000, "matched_to": "ptb-crt-35"}
    results = [
        {**row, "name": "ptb-crt-35", "params": 1000, "token_latency_ms": 0.25, "token_latency_p95_ms": 0.4},
        {**row, **matched, "name": "mambapy", "params": 1030, "token_latency_ms": 1.5, "token_latency_p95_ms": 2.0},
        {**row, "name": "x-transformers", "params": 5, "token_latency_ms": None},
    ]
    text = speed_report.report(results, "c", "m", "n")
    assert "| ptb-crt-35 | fp32 | 1,000 | 1 | 1 | 0.250 / 0.400 | 1 |" in text
    assert "| x-transformers | fp32 | 5 | 1 | 1 | - | 1 |" in text
    assert "mambapy, 7 layers of width 128: 1,030 parameters, +3.0% of ptb-crt-35's 1,000" in text


def test_busy_twins_follow_each_case_and_load_the_cores():
    cases = bench.make_cases(["ptb-crt-35", "ptb-transformer-70"], ["fp32"], False, False, "cpu", 1, 1, 1, 1, 10, None, {"d_model": 64}, busy=1)
    assert [c["name"] for c in cases] == ["ptb-crt-35", "ptb-crt-35 [busy 1]", "ptb-transformer-70", "ptb-transformer-70 [busy 1]"]
    assert [c.get("busy", 0) for c in cases] == [0, 1, 0, 1]

    def rest(case: dict) -> dict:
        return {k: v for k, v in case.items() if k not in ("name", "busy")}

    assert all(rest(a) == rest(b) for a, b in zip(cases[::2], cases[1::2]))  # nothing else differs

    def spinning() -> int:  # live processes running the busy loop right now (zombies have an empty cmdline)
        count = 0
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                count += b"while True: pass" in cmdline.read_bytes()
            except OSError:  # the process ended while we looked
                pass
        return count

    before = spinning()
    with rounds.busy_cores(2):
        assert spinning() == before + 2
    assert spinning() == before


def test_bench_rejects_a_negative_busy_count(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(in_process(capsys, "bench", "--busy", "-1"), "--busy -1")
