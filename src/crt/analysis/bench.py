"""`crt bench`: training and streaming tokens/s, peak memory and MFU, per model and precision.

Each (model, precision) case runs in a fresh process, so its peak memory is its own (CPU: peak
resident set size of that process; CUDA: peak allocated by torch) and no allocator or thread
state leaks from one case to the next. Within a case:

    train tokens/s   B x K x L tokens per optimiser step (forward, backward, AdamW), the preset's
                     batch, segment and BPTT depth; median over `repeats` timed groups of `steps`.
    infer tokens/s   streaming: one segment per call, state carried, no gradients, batch 1 by
                     default (the edge case), over the valid split or random tokens.
    MFU              model FLOPs/s (tokens/s x `crt flops` training FLOPs per token) divided by
                     the peak of a large matmul measured in the same process at the same precision.

Peers (optional extra `pip install -e ".[bench]"`): x-transformers' decoder with XL-style
memories and lucidrains' recurrent-memory-transformer-pytorch, built at the same width, depth,
heads, feed-forward, vocabulary, segment, batch and dropout rates, and timed by the same code.
Their dropout sits in slightly different places (inside the feed-forward rather than on both
residual branches), so they draw somewhat fewer random numbers per step than our models.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import statistics
import time
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from crt.analysis.flops import count_flops, with_vocab
from crt.analysis.machine import peak_rss_mib
from crt.analysis.results import header
from crt.config import ModelConfig, TrainConfig, apply_overrides, load_preset
from crt.errors import CRTError
from crt.runtime import autocast, keep_freed_memory
from crt.state import detach, iter_segments
from crt.train.segments import window_loss

DIAGONAL_PRESET = "ptb-armt-35"  # the ARMT that --diagonal runs (with its layer count set by the flag)
DEFAULT_PRESETS = ("ptb-transformer-70", "ptb-crt-70", "ptb-crt-35", "ptb-crt-17", "ptb-crt-ncgru-35", "ptb-xl-35")
PEERS = {
    "x-transformers XL": "ptb-xl-35",  # peer name -> our preset of the same architecture
    "x-transformers": "ptb-transformer-70",
    # timed at CRT-35's size with one memory token (CRT's one memory vector); our own RMT is ptb-rmt-35
    "recurrent-memory-transformer-pytorch": "ptb-crt-35",
}


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


class PeerState(NamedTuple):
    memory: torch.Tensor  # [B, ...] the peer's memories, on our state interface (detach works on it)


class PeerXL(nn.Module):
    """x-transformers' decoder (XL-style memories when mem_len > 0) behind `logits, state = model(tokens, state)`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from x_transformers import Decoder, TransformerWrapper

        self.cfg, self.mem_len = cfg, cfg.mem_len if cfg.arch == "transformer_xl" else 0
        self.net = TransformerWrapper(
            num_tokens=cfg.vocab_size, max_seq_len=cfg.segment_len, max_mem_len=self.mem_len,
            attn_layers=Decoder(
                dim=cfg.d_model, depth=cfg.n_layer, heads=cfg.n_head, ff_mult=cfg.d_ff // cfg.d_model, rel_pos_bias=self.mem_len > 0,
                attn_dropout=cfg.attn_dropout, ff_dropout=cfg.dropout,
            ),
            use_abs_pos_emb=self.mem_len == 0, tie_embedding=cfg.tie_weights, emb_dropout=cfg.emb_dropout,
        )

    def init_state(self, batch_size: int, evaluation: bool = False) -> PeerState:
        device = self.net.token_emb.emb.weight.device
        return PeerState(torch.zeros(batch_size, self.cfg.n_layer, 0, self.cfg.d_model, device=device))  # no memories yet

    def forward(self, tokens: torch.Tensor, state: PeerState) -> tuple[torch.Tensor, PeerState]:
        if not self.mem_len:
            return self.net(tokens), state
        mems = list(state.memory.unbind(1)) if state.memory.shape[2] else None  # n_layer x [B, M, D]
        logits, mems = self.net(tokens, mems=mems, return_mems=True)
        return logits, PeerState(torch.stack(mems, dim=1))  # [B, n_layer, M, D]


class PeerRMT(nn.Module):
    """recurrent-memory-transformer-pytorch behind `logits, state = model(tokens, state)`.

    One memory token (CRT's one memory vector), no XL memories, so it is a recurrent-memory
    transformer of the same size and segment as CRT.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer

        self.cfg = cfg
        self.net = RecurrentMemoryTransformer(
            dim=cfg.d_model, num_tokens=cfg.vocab_size, depth=cfg.n_layer, num_memory_tokens=1, seq_len=cfg.segment_len,
            heads=cfg.n_head, dim_head=cfg.d_model // cfg.n_head, ff_mult=cfg.d_ff // cfg.d_model, use_xl_memories=False,
            num_residual_streams=1, attn_dropout=cfg.attn_dropout, ff_dropout=cfg.dropout,
        )

    def init_state(self, batch_size: int, evaluation: bool = False) -> PeerState:
        device = self.net.token_emb.weight.device
        return PeerState(torch.zeros(batch_size, 0, self.cfg.d_model, device=device))  # no memories yet

    def forward(self, tokens: torch.Tensor, state: PeerState) -> tuple[torch.Tensor, PeerState]:
        logits, memories = self.net(tokens, state.memory if state.memory.shape[1] else None)[:2]  # memories: [B, 1, D]
        return logits, PeerState(memories)


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
    model = (PeerXL(mcfg) if peer and peer.startswith("x-transformers") else PeerRMT(mcfg) if peer else build_model(mcfg)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _peak_memory_mib(device)
    train = _train_rate(model, tcfg.batch_size, tcfg.bptt_segments, mcfg.segment_len, mcfg.vocab_size, case["steps"], case["repeats"], case["precision"], device)
    train_peak = _peak_memory_mib(device)
    stream = torch.tensor(case["stream"]) if case["stream"] is not None else torch.randint(mcfg.vocab_size, (case["infer_tokens"],), generator=torch.Generator().manual_seed(1))
    infer = _infer_rate(model, stream[: case["infer_tokens"]], mcfg.segment_len, case["infer_batch"], case["repeats"], case["precision"], device)
    peak = matmul_peak(device, case["precision"])
    flops = count_flops(mcfg).train_per_token
    return {
        "name": case["name"], "precision": case["precision"], "params": sum(p.numel() for p in model.parameters()),
        "train_tokens_per_s": statistics.median(train), "train_runs": train,
        "infer_tokens_per_s": statistics.median(infer), "infer_runs": infer,
        "peak_memory_mib": train_peak, "baseline_memory_mib": rss_before,
        "train_flops_per_token": flops, "matmul_peak_flops": peak,
        "mfu": statistics.median(train) * flops / peak,
    }


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
        "name": case["name"], "precision": case["precision"], "segments": S, "layers": mcfg.n_layer, "segment_len": T,
        "mem_tokens": mcfg.mem_tokens, "seq_runs": seq_times, "diag_runs": diag_times,
        "max_logit_diff": (a.float() - b.float()).abs().max().item(),
    }


def diagonal_summary(r: dict[str, Any]) -> dict[str, float]:
    seq, diag = statistics.median(r["seq_runs"]), statistics.median(r["diag_runs"])
    return {"sequential_s": seq, "diagonal_s": diag, "speedup": seq / diag}


def _worker(case: dict[str, Any], queue: Any) -> None:
    try:
        queue.put(run_diagonal(case) if case.get("diagonal") else run_case(case))
    except Exception as e:  # reported in the table, the other cases still run
        queue.put({"name": case["name"], "precision": case["precision"], "error": f"{type(e).__name__}: {e}"})


def run_isolated(case: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(case, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run_rounds(cases: list[dict[str, Any]], rounds: int, log=print) -> list[dict[str, Any]]:
    """Every case once per round, each time in a fresh process; results merged over the rounds.

    Shared machines drift over minutes, so cases measured one after another are not comparable;
    taking each case once per round spreads the drift over all of them. Rates are the median
    over every timed group of every round, peak memory the largest seen, and MFU uses the
    median matmul peak of the case's rounds.
    """
    per_case: list[list[dict[str, Any]]] = [[] for _ in cases]
    for r in range(rounds):
        for i, case in enumerate(cases):
            result = run_isolated(case)
            per_case[i].append(result)
            if "error" in result:
                line = result["error"]
            elif case.get("diagonal"):
                d = diagonal_summary(result)
                line = f"sequential {d['sequential_s']:.3f} s, diagonal {d['diagonal_s']:.3f} s ({d['speedup']:.2f}x)"
            else:
                line = f"train {result['train_tokens_per_s']:,.0f} tok/s, infer {result['infer_tokens_per_s']:,.0f} tok/s"
            log(f"round {r + 1}/{rounds} {case['name']} {case['precision']}: {line}")
    merged = []
    for runs in per_case:
        failed = next((x for x in runs if "error" in x), None)
        if failed:
            merged.append(failed)
            continue
        if "seq_runs" in runs[0]:
            merged.append({
                **runs[0], "seq_runs": [v for x in runs for v in x["seq_runs"]], "diag_runs": [v for x in runs for v in x["diag_runs"]],
                "max_logit_diff": max(x["max_logit_diff"] for x in runs),
            })
            continue
        train = [v for x in runs for v in x["train_runs"]]
        infer = [v for x in runs for v in x["infer_runs"]]
        peak = statistics.median(x["matmul_peak_flops"] for x in runs)
        merged.append({
            **runs[0], "train_runs": train, "infer_runs": infer,
            "train_tokens_per_s": statistics.median(train), "infer_tokens_per_s": statistics.median(infer),
            "peak_memory_mib": max(x["peak_memory_mib"] for x in runs), "matmul_peak_flops": peak,
            "mfu": statistics.median(train) * runs[0]["train_flops_per_token"] / peak,
        })
    return merged


# A/B cases for the known CPU traps, on CRT-35 in fp32: (label, case fields, model overrides)
TRAPS = (
    ("glibc malloc defaults", {"keep_freed_memory": False}, {}),
    ("denormals flushed to zero", {"flush_denormal": True}, {}),
    ("no dropout", {}, {"dropout": 0.0, "emb_dropout": 0.0, "attn_dropout": 0.0}),
)


def make_cases(
    presets: list[str], precisions: list[str], peers: bool, traps: bool, device: str, threads: int, steps: int, repeats: int,
    infer_batch: int, infer_tokens: int, stream: list[int] | None, overrides: dict[str, Any],
    diagonal: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One case per (preset, precision), plus peers, CPU-trap A/Bs and, with
    diagonal=(segments, layers), ARMT's diagonal-vs-sequential inference on DIAGONAL_PRESET."""
    names = list(presets)
    if peers:
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
            raise CRTError(f"preset {name} back-propagates through whole documents (bptt_segments = 0), and crt bench times windows of K >= 1 segments: "
                           f"bench a stream preset (e.g. ptb-crt-35) or a copy of {name} with bptt_segments = K")
        base = {
            "model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg), "device": device, "threads": threads, "steps": steps,
            "repeats": repeats, "infer_batch": infer_batch, "infer_tokens": infer_tokens, "stream": stream,
        }
        for precision in precisions:
            cases.append({**base, "name": name, "precision": precision})
            cases += [{**base, "name": peer, "peer": peer, "precision": precision} for peer, ours in PEERS.items() if peers and ours == name]
        if traps and name == "ptb-crt-35":
            for label, fields, model in TRAPS:
                cases.append({**base, **fields, "model": {**base["model"], **model}, "name": f"{name} [{label}]", "precision": "fp32"})
    if diagonal:
        segments, layers = diagonal
        mcfg, tcfg = load_preset(DIAGONAL_PRESET)
        mcfg, tcfg = apply_overrides(mcfg, tcfg, {**overrides, "n_layer": layers})
        mcfg = with_vocab(mcfg, tcfg, DIAGONAL_PRESET).validate()
        for precision in precisions:
            cases.append({
                "name": f"{DIAGONAL_PRESET} diagonal", "diagonal": True, "model": dataclasses.asdict(mcfg), "device": device, "threads": threads,
                "repeats": repeats, "segments": segments, "precision": precision,
            })
    return cases


def report(results: list[dict[str, Any]], command: str, machine: str, notes: str) -> str:
    def get(name: str, precision: str) -> dict[str, Any] | None:
        return next((r for r in results if r["name"] == name and r["precision"] == precision and "error" not in r), None)

    diagonal = [r for r in results if "seq_runs" in r]
    results = [r for r in results if "seq_runs" not in r]
    lines = [
        *header("Speed: tokens/s, peak memory and MFU", command, machine),
        notes,
        "",
        "| model | precision | params | train tokens/s | infer tokens/s | peak memory (MiB) | train MFLOP/token | MFU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['precision']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['precision']} | {r['params']:,} | {r['train_tokens_per_s']:,.0f} | {r['infer_tokens_per_s']:,.0f} | "
            f"{r['peak_memory_mib']:,.0f} | {r['train_flops_per_token'] / 1e6:.2f} | {r['mfu']:.1%} |"
        )
    peaks = {r["precision"]: r["matmul_peak_flops"] for r in results if "error" not in r}
    if peaks:
        lines += ["", "Matmul peak measured in each case (2048^3, best of 5), last case per precision: " + ", ".join(f"{p} {v / 1e9:,.0f} GFLOP/s" for p, v in peaks.items()) + "."]

    targets = []
    for precision in sorted({r["precision"] for r in results}):
        def ratio(a: str, b: str, precision: str = precision) -> float | None:
            x, y = get(a, precision), get(b, precision)
            return x["train_tokens_per_s"] / y["train_tokens_per_s"] if x and y else None

        for label, a, b, goal in (
            ("CRT L=70 / Transformer L=70 (memory costs <= 10%)", "ptb-crt-70", "ptb-transformer-70", 0.9),
            ("CRT L=35 / Transformer-XL L=35 M=35", "ptb-crt-35", "ptb-xl-35", 1.3),
            ("CRT L=35 / Transformer L=70", "ptb-crt-35", "ptb-transformer-70", 1.5),
            ("Transformer L=70 / x-transformers", "ptb-transformer-70", "x-transformers", 1.2),
            ("Transformer-XL / x-transformers XL", "ptb-xl-35", "x-transformers XL", 1.2),
        ):
            value = ratio(a, b)
            if value is not None:
                targets.append(f"| {label} | {precision} | {value:.2f}x | >= {goal}x | {'met' if value >= goal else 'not met'} |")
    for r in results:
        fp32 = get(r["name"], "fp32")
        if r["precision"] == "bf16" and "error" not in r and fp32:
            value = r["train_tokens_per_s"] / fp32["train_tokens_per_s"]
            targets.append(f"| bf16 / fp32 training, {r['name']} | - | {value:.2f}x | >= 1.8x | {'met' if value >= 1.8 else 'not met'} |")
    base = get("ptb-crt-35", "fp32")
    trap_rows = [r for r in results if r["name"].startswith("ptb-crt-35 [") and "error" not in r]
    if base and trap_rows:
        trap_lines = ["", "## CPU traps (A/B on CRT L=35, fp32, same run)", "", "| variant | train tokens/s | vs `crt train`'s setting |", "| --- | ---: | ---: |",
                      f"| as `crt train` runs it (malloc keeps freed blocks, denormals kept, dropout on) | {base['train_tokens_per_s']:,.0f} | 1.00x |"]
        trap_lines += [f"| {r['name'][len('ptb-crt-35 ['):-1]} | {r['train_tokens_per_s']:,.0f} | {r['train_tokens_per_s'] / base['train_tokens_per_s']:.2f}x |" for r in trap_rows]
    else:
        trap_lines = []
    for r in results:
        if r["name"] == "ptb-crt-35" and r["precision"] == "bf16" and "error" not in r:
            targets.append(f"| training MFU, CRT L=35 | bf16 | {r['mfu']:.1%} | >= 30% | {'met' if r['mfu'] >= 0.3 else 'not met'} |")
    if diagonal:
        lines += [
            "", "## Diagonal Batching: ARMT inference on one sequence", "",
            "| model | precision | segments x layers | sequential (s) | diagonal (s) | speed-up | max logit difference |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in diagonal:
            d = diagonal_summary(r)
            lines.append(
                f"| {r['name']} (L={r['segment_len']}, k={r['mem_tokens']}) | {r['precision']} | {r['segments']} x {r['layers']} | "
                f"{d['sequential_s']:.3f} | {d['diagonal_s']:.3f} | {d['speedup']:.2f}x | {r['max_logit_diff']:.1e} |"
            )
        lines.append(f"\nMedians of {len(diagonal[0]['seq_runs'])} timed runs each (sequential and diagonal interleaved, batch 1, after a warm-up of each).")
    if targets:
        lines += ["", "## Targets (training tokens/s ratios measured in this run)", "", "| ratio | precision | measured | target | |", "| --- | --- | ---: | ---: | --- |", *targets]
    return "\n".join(lines + trap_lines) + "\n"
