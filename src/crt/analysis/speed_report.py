"""The speed report `crt bench` writes (docs/results/bench.md): the table, the CPU-trap A/Bs, Diagonal
Batching, and the training-rate ratios against the targets declared here."""

from __future__ import annotations

from typing import Any

from crt.analysis.bench import LATENCY_TOKENS, LATENCY_WARMUP, diagonal_summary
from crt.analysis.peers import PARAM_TOLERANCE, PEERS
from crt.analysis.results import header

# (label, numerator, denominator, target ratio of training tokens/s), per precision: issue 18's targets
RATIO_TARGETS = (
    ("CRT L=35 / Transformer-XL L=35 M=35", "ptb-crt-35", "ptb-xl-35", 1.0),
    ("CRT L=35 minGRU / Transformer-XL L=35 M=35", "ptb-crt-mingru-35", "ptb-xl-35", 1.0),
    ("Transformer L=70 / x-transformers", "ptb-transformer-70", "x-transformers", 1.2),
    ("Transformer-XL / x-transformers XL", "ptb-xl-35", "x-transformers XL", 1.2),
    ("RMT L=35 / recurrent-memory-transformer-pytorch", "ptb-rmt-35", "recurrent-memory-transformer-pytorch", 1.2),
)
# the recurrences may not cost more than their FLOPs: CRT's training MFU against the Transformer-70's, same run and precision
MFU_RATIO_TARGETS = (("CRT L=35", "ptb-crt-35"), ("CRT L=35 minGRU", "ptb-crt-mingru-35"))
MFU_FLOOR = {"fp32": 0.5, "bf16": 0.3}  # every model's training MFU at the PTB presets, per precision
BF16_SPEEDUP_TARGET = 2.0  # bf16 / fp32 training tokens/s, on a CPU with native bf16


def method_notes(rounds: int, threads: int, device: str, repeats: int, steps: int, infer_tokens: int, source: str, infer_batch: int, busy: int = 0) -> str:
    """How the numbers of a `crt bench` run were taken, for its report."""
    return (
        f"Each (model, precision) ran {rounds} times, once per round through the whole list, each time in a fresh process with "
        f"{threads} threads on {device}: {repeats} timed groups of "
        f"{steps} training steps after one warm-up step (median over all groups of all rounds reported), each step one window of the preset's batch x K segments "
        f"of random tokens; inference streams {infer_tokens:,} tokens of {source} in {infer_batch} stream(s), one segment per call, "
        "state carried (median of the repeats after a warm-up pass). "
        f"Per-token latency: the first {min(infer_tokens, LATENCY_TOKENS):,} of those tokens fed one per call at batch 1, state carried "
        f"(median and p95, the first {min(LATENCY_WARMUP, min(infer_tokens, LATENCY_TOKENS) // 4)} dropped as warm-up); ours through `crt.infer.Stream`, "
        "the minGRU and Mamba peers through their package's own recurrent step; - where a wrapper has no per-token step. Peak memory: "
        + ("torch's peak allocation." if device == "cuda" else "peak resident set size of the case's process, the runtime included.")
        + (
            f" Rows marked [busy {busy}] are the row above them run again, in the same round, while {busy} background process(es) each kept a core busy "
            "(a pure-Python loop): the slowdown a loaded machine causes."
            if busy
            else ""
        )
    )


def report(results: list[dict[str, Any]], command: str, machine: str, notes: str) -> str:
    def get(name: str, precision: str) -> dict[str, Any] | None:
        return next((r for r in results if r["name"] == name and r["precision"] == precision and "error" not in r), None)

    diagonal = [r for r in results if "seq_runs" in r]
    results = [r for r in results if "seq_runs" not in r]
    lines = [
        *header("Speed: tokens/s, peak memory and MFU", command, machine),
        notes,
        "",
        "| model | precision | params | train tokens/s | infer tokens/s | per-token ms (median / p95) | peak memory (MiB) | train MFLOP/token | MFU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['precision']} | failed: {r['error']} | | | | | | |")
            continue
        latency = f"{r['token_latency_ms']:.3f} / {r['token_latency_p95_ms']:.3f}" if r.get("token_latency_ms") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['precision']} | {r['params']:,} | {r['train_tokens_per_s']:,.0f} | {r['infer_tokens_per_s']:,.0f} | {latency} | "
            f"{r['peak_memory_mib']:,.0f} | {r['train_flops_per_token'] / 1e6:.2f} | {r['mfu']:.1%} |"
        )
    matched = {r["name"]: r for r in results if r.get("match_params") and "error" not in r}  # one line per peer, whatever the precisions
    if matched:
        lines += [
            "",
            "Peers at matched parameter counts (embedding and tied head included; width fixed at the preset's, depth the one nearest its count: "
            f"at the PTB presets within {PARAM_TOLERANCE:.0%}, tests/test_bench.py), trained at that preset's batch, segment and BPTT depth "
            "with the state carried across segments: "
            + "; ".join(
                f"{name}, {r['depth']} layers of width {r['width']}: {r['params']:,} parameters, {r['params'] / r['match_params'] - 1:+.1%} "
                f"of {r['matched_to']}'s {r['match_params']:,}"
                for name, r in matched.items()
            )
            + ". Their MFLOP/token count their own matrix products (`crt.analysis.peers`).",
        ]
    peaks = {r["precision"]: r["matmul_peak_flops"] for r in results if "error" not in r}
    if peaks:
        lines += [
            "",
            "Matmul peak measured in each case (2048^3, best of 5), last case per precision: "
            + ", ".join(f"{p} {v / 1e9:,.0f} GFLOP/s" for p, v in peaks.items())
            + ".",
        ]

    targets = []
    for precision in sorted({r["precision"] for r in results}):

        def ratio(a: str, b: str, key: str = "train_tokens_per_s", precision: str = precision) -> float | None:
            x, y = get(a, precision), get(b, precision)
            return x[key] / y[key] if x and y else None

        for label, a, b, goal in RATIO_TARGETS:
            value = ratio(a, b)
            if value is not None:
                targets.append(f"| {label}, training tokens/s | {precision} | {value:.2f}x | >= {goal}x | {'met' if value >= goal else 'not met'} |")
        for label, name in MFU_RATIO_TARGETS:
            value = ratio(name, "ptb-transformer-70", "mfu")
            if value is not None:
                targets.append(f"| {label} MFU / Transformer L=70 MFU | {precision} | {value:.2f}x | >= 1.0x | {'met' if value >= 1.0 else 'not met'} |")
        floor = MFU_FLOOR[precision]
        ours = [r for r in results if r["precision"] == precision and "error" not in r and r["name"] not in PEERS and "[" not in r["name"]]
        if ours:
            low = min(ours, key=lambda r: r["mfu"])
            targets.append(
                f"| lowest training MFU of our models ({low['name']}) | {precision} | {low['mfu']:.1%} | >= {floor:.0%} | {'met' if low['mfu'] >= floor else 'not met'} |"
            )
    for r in results:
        fp32 = get(r["name"], "fp32")
        if r["precision"] == "bf16" and "error" not in r and fp32:
            value = r["train_tokens_per_s"] / fp32["train_tokens_per_s"]
            targets.append(
                f"| bf16 / fp32 training, {r['name']} | - | {value:.2f}x | >= {BF16_SPEEDUP_TARGET}x (native bf16) | {'met' if value >= BF16_SPEEDUP_TARGET else 'not met'} |"
            )
    busy = [(r, get(r["name"].rsplit(" [busy", 1)[0], r["precision"])) for r in results if " [busy " in r["name"] and "error" not in r]
    busy_lines = []
    if busy:
        busy_lines = [
            "",
            "## Under a busy core (each case beside its twin run with background load, same round)",
            "",
            "| model | precision | quiet train tokens/s | busy train tokens/s | busy / quiet | quiet per-token ms | busy per-token ms |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r, quiet in busy:
            if quiet is None:
                continue

            def ms(x: dict) -> str:
                return f"{x['token_latency_ms']:.3f}" if x.get("token_latency_ms") is not None else "-"

            busy_lines.append(
                f"| {quiet['name']} | {r['precision']} | {quiet['train_tokens_per_s']:,.0f} | {r['train_tokens_per_s']:,.0f} | "
                f"{r['train_tokens_per_s'] / quiet['train_tokens_per_s']:.2f}x | {ms(quiet)} | {ms(r)} |"
            )
    base = get("ptb-crt-35", "fp32")
    trap_rows = [r for r in results if r["name"].startswith("ptb-crt-35 [") and " [busy " not in r["name"] and "error" not in r]
    if base and trap_rows:
        trap_lines = [
            "",
            "## CPU traps (A/B on CRT L=35, fp32, same run)",
            "",
            "| variant | train tokens/s | vs `crt train`'s setting |",
            "| --- | ---: | ---: |",
            f"| as `crt train` runs it (malloc keeps freed blocks, denormals kept, dropout on) | {base['train_tokens_per_s']:,.0f} | 1.00x |",
        ]
        trap_lines += [
            f"| {r['name'][len('ptb-crt-35 [') : -1]} | {r['train_tokens_per_s']:,.0f} | {r['train_tokens_per_s'] / base['train_tokens_per_s']:.2f}x |"
            for r in trap_rows
        ]
    else:
        trap_lines = []
    if diagonal:
        lines += [
            "",
            "## Diagonal Batching: ARMT inference on one sequence",
            "",
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
        lines += [
            "",
            "## Targets (training tokens/s ratios measured in this run)",
            "",
            "| ratio | precision | measured | target | |",
            "| --- | --- | ---: | ---: | --- |",
            *targets,
        ]
    return "\n".join(lines + busy_lines + trap_lines) + "\n"
