"""`crt bench`: training and streaming tokens/s, peak memory and MFU, per model and precision.

Each (model, precision) case runs in a fresh process, so its peak memory is its own (CPU: peak
resident set size of that process; CUDA: peak allocated by torch) and no allocator or thread
state leaks from one case to the next. Within a case:

    train tokens/s   B x K x L tokens per optimiser step (forward, backward, AdamW), the preset's
                     batch, segment and BPTT depth; median over `repeats` timed groups of `steps`.
    infer tokens/s   streaming: one segment per call, state carried, no gradients, batch 1 by
                     default (the edge case), over the valid split or random tokens.
    per-token ms     latency of one token per call at batch 1, state carried, no gradients (generation):
                     median and p95 over the first min(infer tokens, LATENCY_TOKENS) tokens of the same
                     stream after LATENCY_WARMUP; ours through crt.infer.Stream, the minGRU and Mamba
                     peers through their package's own recurrent step (`peer.stream`); none for the
                     x-transformers and RMT peers, whose wrappers have no per-token step.
    MFU              model FLOPs/s (tokens/s x `crt flops` training FLOPs per token) divided by
                     the peak of a large matmul measured in the same process at the same precision.

The peers (`crt.analysis.peers`) are timed by the same code, the matched ones (minGRU, Mamba) at the
depth nearest their preset's parameter count, counted here (`match_params`); `crt.analysis.rounds` runs the
cases in fresh processes, round after round; `crt.analysis.speed_report` writes the table.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch
import torch.nn as nn

from crt.analysis.flops import count_flops, with_vocab
from crt.analysis.machine import peak_rss_mib
from crt.analysis.peers import MATCHED, PEERS, build_peer, missing_packages, param_count
from crt.config import ModelConfig, TrainConfig, apply_overrides, load_preset
from crt.errors import CRTError
from crt.infer.stream import STEP_METHODS, Stream
from crt.runtime import autocast, keep_freed_memory
from crt.state import detach, iter_segments
from crt.train.segments import window_loss

DIAGONAL_PRESET = "ptb-armt-35"  # the ARMT that --diagonal runs (with its layer count set by the flag)
LATENCY_TOKENS = 512  # tokens fed one per call for the per-token latency (at most the case's infer_tokens)
LATENCY_WARMUP = 16  # leading per-token times dropped: allocator and lazy-init warm-up (a quarter of them if fewer are fed)
DEFAULT_PRESETS = ("ptb-transformer-70", "ptb-crt-70", "ptb-crt-35", "ptb-crt-17", "ptb-crt-ncgru-35", "ptb-xl-35")


def matmul_peak(device: torch.device, precision: str, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul at `precision`, the best of `repeats` (the achievable peak)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = _now(device)
        a @ b
        best = min(best, _now(device) - t0)
    return 2 * n**3 / best


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _train_rate(model: nn.Module, B: int, K: int, L: int, V: int, steps: int, repeats: int, precision: str, device: torch.device) -> list[float]:
    """Training tokens/s of `repeats` groups of `steps` optimiser steps on random tokens."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(V, (B, K * L + 1), generator=g).to(device)  # [B, K*L+1]
    state = model.init_state(B)

    def step() -> None:
        nonlocal state
        with autocast(device, precision):
            loss, state = window_loss(model, data[:, :-1], data[:, 1:], state, L, K)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state = detach(state)

    step()  # warm-up: allocations, lazy inits, autotuning
    rates = []
    for _ in range(repeats):
        t0 = _now(device)
        for _ in range(steps):
            step()
        rates.append(steps * B * K * L / (_now(device) - t0))
    return rates


@torch.no_grad()
def _infer_rate(model: nn.Module, stream: torch.Tensor, L: int, batch: int, repeats: int, precision: str, device: torch.device) -> list[float]:
    """Streaming tokens/s: segments of L tokens, state carried, `batch` parallel streams."""
    model.eval()
    n = stream.numel() // batch
    x = stream[: n * batch].view(batch, n).to(device)  # [batch, n]
    rates = []
    for _ in range(repeats + 1):  # the first pass warms up
        t0 = _now(device)
        with autocast(device, precision):
            for _ in iter_segments(model, x, model.init_state(batch, evaluation=True), L):
                pass
        rates.append(x.numel() / (_now(device) - t0))
    return rates[1:]


@torch.no_grad()
def _token_latencies(model: nn.Module, tokens: torch.Tensor, precision: str, device: torch.device) -> list[float] | None:
    """Seconds per token at batch 1, one token per call with the state carried; None if the model has no per-token step.

    tokens: [n]. Ours: crt.infer.Stream (open_segment / step / close_segment, segment boundaries
    included); a peer: its `stream`, the package's own recurrent step.
    """
    if all(callable(getattr(model, m, None)) for m in STEP_METHODS):
        stream = Stream(model, 1)
    elif callable(getattr(model, "stream", None)):
        stream = model.stream(1)
    else:
        return None
    tokens = tokens.to(device)
    times = []
    with autocast(device, precision):
        for t in tokens.split(1):  # [1] each
            t0 = _now(device)
            stream.feed(t)
            times.append(_now(device) - t0)
    return times[min(LATENCY_WARMUP, len(times) // 4) :]


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One (model, precision) measurement; meant to run in its own process."""
    from crt.models import build_model

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    if case.get("keep_freed_memory", True) and case["device"] == "cpu":
        keep_freed_memory()  # what `crt train` does on CPU
    torch.set_flush_denormal(case.get("flush_denormal", False))
    device = torch.device(case["device"])
    mcfg = ModelConfig(**case["model"])
    tcfg = TrainConfig(**case["train"])
    peer = case.get("peer")
    model = (build_peer(peer, mcfg, case.get("match_params")) if peer else build_model(mcfg)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _peak_memory_mib(device)
    train = _train_rate(
        model, tcfg.batch_size, tcfg.bptt_segments, mcfg.segment_len, mcfg.vocab_size, case["steps"], case["repeats"], case["precision"], device
    )
    train_peak = _peak_memory_mib(device)
    stream = (
        torch.tensor(case["stream"])
        if case["stream"] is not None
        else torch.randint(mcfg.vocab_size, (case["infer_tokens"],), generator=torch.Generator().manual_seed(1))
    )
    infer = _infer_rate(model, stream[: case["infer_tokens"]], mcfg.segment_len, case["infer_batch"], case["repeats"], case["precision"], device)
    latency = _token_latencies(model, stream[: min(case["infer_tokens"], LATENCY_TOKENS)], case["precision"], device)
    peak = matmul_peak(device, case["precision"])
    # a matched peer is another architecture: it counts its own FLOPs; the other peers share their preset's
    flops = model.train_flops_per_token() if callable(getattr(model, "train_flops_per_token", None)) else count_flops(mcfg).train_per_token
    return {
        "name": case["name"],
        "precision": case["precision"],
        "params": sum(p.numel() for p in model.parameters()),
        "depth": getattr(model, "depth", mcfg.n_layer),
        "width": mcfg.d_model,
        "match_params": case.get("match_params"),  # the parameter count of the preset a matched peer stands beside
        "matched_to": PEERS.get(peer) if peer in MATCHED else None,
        "train_tokens_per_s": statistics.median(train),
        "train_runs": train,
        "infer_tokens_per_s": statistics.median(infer),
        "infer_runs": infer,
        "token_latency_runs": latency,  # seconds per token, or None
        "token_latency_ms": statistics.median(latency) * 1e3 if latency else None,
        "token_latency_p95_ms": p95(latency) * 1e3 if latency else None,
        "peak_memory_mib": train_peak,
        "baseline_memory_mib": rss_before,
        "train_flops_per_token": flops,
        "matmul_peak_flops": peak,
        "mfu": statistics.median(train) * flops / peak,
    }


def p95(xs: list[float]) -> float:
    return sorted(xs)[int(0.95 * (len(xs) - 1))]


def run_diagonal(case: dict[str, Any]) -> dict[str, Any]:
    """ARMT inference on one long sequence: the sequential loop against Diagonal Batching.

    Batch 1, `segments` whole segments of the preset's length; each repeat times the sequential
    model then the diagonal executor on the same tokens (interleaved, so drift hits both).
    Also records the largest logit difference between the two, in the case's precision.
    """
    from crt.models import build_model
    from crt.models.diagonal import DiagonalARMT

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    if case["device"] == "cpu":
        keep_freed_memory()
    device = torch.device(case["device"])
    mcfg = ModelConfig(**case["model"])
    model = build_model(mcfg).to(device).eval()
    diagonal = DiagonalARMT(model)
    S, T = case["segments"], mcfg.segment_len
    x = torch.randint(mcfg.vocab_size, (1, S * T), generator=torch.Generator().manual_seed(1)).to(device)  # [1, S*T]

    @torch.no_grad()
    def sequential() -> torch.Tensor:
        state = model.init_state(1)
        return torch.cat([logits for _, logits, state in iter_segments(model, x, state, T)], dim=1)

    def run(fn) -> tuple[float, torch.Tensor]:
        t0 = _now(device)
        with autocast(device, case["precision"]):
            out = fn()
        return _now(device) - t0, out

    _, a = run(sequential)  # warm-up both
    _, (b, _) = run(lambda: diagonal(x, model.init_state(1)))
    seq_times, diag_times = [], []
    for _ in range(case["repeats"]):
        seq_times.append(run(sequential)[0])
        diag_times.append(run(lambda: diagonal(x, model.init_state(1)))[0])
    return {
        "name": case["name"],
        "precision": case["precision"],
        "segments": S,
        "layers": mcfg.n_layer,
        "segment_len": T,
        "mem_tokens": mcfg.mem_tokens,
        "seq_runs": seq_times,
        "diag_runs": diag_times,
        "max_logit_diff": (a.float() - b.float()).abs().max().item(),
    }


def diagonal_summary(r: dict[str, Any]) -> dict[str, float]:
    seq, diag = statistics.median(r["seq_runs"]), statistics.median(r["diag_runs"])
    return {"sequential_s": seq, "diagonal_s": diag, "speedup": seq / diag}


# A/B cases for the known CPU traps, on CRT-35 in fp32: (label, case fields, model overrides)
TRAPS = (
    ("glibc malloc defaults", {"keep_freed_memory": False}, {}),
    ("denormals flushed to zero", {"flush_denormal": True}, {}),
    ("no dropout", {}, {"dropout": 0.0, "emb_dropout": 0.0, "attn_dropout": 0.0}),
)


def make_cases(
    presets: list[str],
    precisions: list[str],
    peers: bool,
    traps: bool,
    device: str,
    threads: int,
    steps: int,
    repeats: int,
    infer_batch: int,
    infer_tokens: int,
    stream: list[int] | None,
    overrides: dict[str, Any],
    diagonal: tuple[int, int] | None = None,
    busy: int = 0,
) -> list[dict[str, Any]]:
    """One case per (preset, precision), plus peers, CPU-trap A/Bs and, with
    diagonal=(segments, layers), ARMT's diagonal-vs-sequential inference on DIAGONAL_PRESET.
    busy > 0: each case is followed by its twin run with `busy` cores kept busy beside it
    (crt.analysis.rounds.busy_cores), so a model's slowdown under load is measured side by side."""
    from crt.models import build_model

    names = list(presets)
    if peers:
        if missing := missing_packages():
            raise CRTError(f'--peers needs the optional peer libraries ({", ".join(missing)} missing): pip install -e ".[bench]"')
        names += [p for p in PEERS.values() if p not in names]
    if traps and "ptb-crt-35" not in names:
        names.append("ptb-crt-35")
    cases = []
    for name in names:
        mcfg, tcfg = load_preset(name)
        mcfg, tcfg = apply_overrides(mcfg, tcfg, overrides)
        mcfg = with_vocab(mcfg, tcfg, name)
        mcfg.mem_len = mcfg.memory_len
        mcfg.validate()
        if tcfg.bptt_segments < 1:
            raise CRTError(
                f"preset {name} back-propagates through whole documents (bptt_segments = 0), and crt bench times windows of K >= 1 segments: "
                f"bench a stream preset (e.g. ptb-crt-35) or a copy of {name} with bptt_segments = K"
            )
        base = {
            "model": dataclasses.asdict(mcfg),
            "train": dataclasses.asdict(tcfg),
            "device": device,
            "threads": threads,
            "steps": steps,
            "repeats": repeats,
            "infer_batch": infer_batch,
            "infer_tokens": infer_tokens,
            "stream": stream,
        }
        # a matched peer is built at the depth nearest this preset's parameter count (as overridden), counted without building it
        ours_params = param_count(lambda: build_model(mcfg)) if peers and any(PEERS[p] == name for p in MATCHED) else None
        for precision in precisions:
            cases.append({**base, "name": name, "precision": precision})
            cases += [
                {**base, "name": peer, "peer": peer, "precision": precision, **({"match_params": ours_params} if peer in MATCHED else {})}
                for peer, ours in PEERS.items()
                if peers and ours == name
            ]
        if traps and name == "ptb-crt-35":
            for label, fields, model in TRAPS:
                cases.append({**base, **fields, "model": {**base["model"], **model}, "name": f"{name} [{label}]", "precision": "fp32"})
    if busy:
        cases = [twin for case in cases for twin in (case, {**case, "name": f"{case['name']} [busy {busy}]", "busy": busy})]
    if diagonal:
        segments, layers = diagonal
        mcfg, tcfg = load_preset(DIAGONAL_PRESET)
        mcfg, tcfg = apply_overrides(mcfg, tcfg, {**overrides, "n_layer": layers})
        mcfg = with_vocab(mcfg, tcfg, DIAGONAL_PRESET).validate()
        for precision in precisions:
            cases.append(
                {
                    "name": f"{DIAGONAL_PRESET} diagonal",
                    "diagonal": True,
                    "model": dataclasses.asdict(mcfg),
                    "device": device,
                    "threads": threads,
                    "repeats": repeats,
                    "segments": segments,
                    "precision": precision,
                }
            )
    return cases
