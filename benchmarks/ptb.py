"""The paper's PTB comparison at one equal budget: quality per FLOP (SPEC §1, §6).

    python benchmarks/ptb.py --data-dir ../shared/data/ptb            # the grid, ~1 hour on 2 CPU cores
    python benchmarks/ptb.py --data-dir DIR --tokens 2e7 --set d_model=512 --set d_ff=2048 --set device=cuda

Trains every row of GRID on the same training tokens (max_steps follows from --tokens and each
row's batch x segment x K), then evaluates valid and test with the state carried over the whole
split (SPEC §3.6) and writes docs/results/ptb.md and docs/results/ptb.png (test perplexity
against training FLOPs per token). Finished rows are kept in --runs-dir/results.json and are not
trained again, so an interrupted grid continues where it stopped; --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from crt.analysis.flops import count_flops
from crt.analysis.machine import describe
from crt.analysis.results import header
from crt.checkpoint import load_model
from crt.config import apply_overrides, load_preset, to_dict
from crt.data.load import load_corpus
from crt.files import write_atomic
from crt.runtime import resolve_device, resolve_precision
from crt.train.evaluate import evaluate
from crt.train.loop import train
from crt.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]

# (row name, preset, overrides). The first eight are the comparison of issues 3 and 4; the rest ablate SPEC §3's
# open choices on CRT-35: what the memory RNN reads, recurrent vs sinusoidal positions, BPTT depth K.
GRID: list[tuple[str, str, dict]] = [
    ("Transformer L=70", "ptb-transformer-70", {}),
    ("CRT L=70", "ptb-crt-70", {}),
    ("CRT L=35", "ptb-crt-35", {}),
    ("CRT L=17", "ptb-crt-17", {}),
    ("CRT-NCGRU L=35", "ptb-crt-ncgru-35", {}),
    ("Transformer-XL L=35 M=35", "ptb-xl-35", {}),
    ("RMT L=35 k=4", "ptb-rmt-35", {}),
    ("ARMT L=35 k=4", "ptb-armt-35", {}),
    ("CRT L=35, memory reads last token", "ptb-crt-35", {"memory_reads": "last_token"}),
    ("CRT L=35, sinusoidal positions", "ptb-crt-35", {"positions": "sinusoidal"}),
    ("CRT L=35, K=1", "ptb-crt-35", {"bptt_segments": 1}),
    # what carries the past: without a memory token the memory vector is never read, and the
    # positional GRU's carried state is the only path across segments; without carry_rpe neither
    ("CRT L=35, no memory token", "ptb-crt-35", {"memory_position": "none"}),
    ("CRT L=35, no memory token, positions restart each segment", "ptb-crt-35", {"memory_position": "none", "carry_rpe": False}),
    # ARMT as published divides reads by z.q + 1e-5 (crt.layers.associative explains the floor)
    ("ARMT L=35 k=4, original normaliser z.q + 1e-5", "ptb-armt-35", {"assoc_floor": False}),
    # issue 18's cell ablation: minGRU (input-only gates, no sequential matmul) for either RNN, two seeds for the noise
    ("CRT L=35, minGRU memory", "ptb-crt-35", {"memory_cell": "mingru"}),
    ("CRT L=35, minGRU positions", "ptb-crt-35", {"position_cell": "mingru"}),
    ("CRT L=35, minGRU positions and memory", "ptb-crt-35", {"position_cell": "mingru", "memory_cell": "mingru"}),
    ("CRT L=35, seed 1", "ptb-crt-35", {"seed": 1}),
    ("CRT L=35, minGRU positions and memory, seed 1", "ptb-crt-35", {"position_cell": "mingru", "memory_cell": "mingru", "seed": 1}),
]


def run_row(name: str, preset: str, overrides: dict, args: argparse.Namespace, corpus) -> dict:
    mcfg, tcfg = load_preset(preset)
    mcfg, tcfg = apply_overrides(mcfg, tcfg, {**overrides, **args.set, "data_dir": args.data_dir})
    tokens_per_step = tcfg.batch_size * mcfg.segment_len * tcfg.bptt_segments
    tcfg.max_steps = math.ceil(args.tokens / tokens_per_step)
    tcfg.warmup_steps = min(tcfg.warmup_steps, tcfg.max_steps // 10)
    tcfg.eval_every = 0  # validate once at the end; the grid's time goes to training
    tcfg.out_dir = str(Path(args.runs_dir) / preset)
    start = time.perf_counter()
    summary = train(mcfg, tcfg, corpus=corpus, progress=not args.no_progress)
    wall = time.perf_counter() - start
    model, _ = load_model(summary["run_dir"], tcfg.device)
    mcfg = model.cfg
    test = evaluate(model, corpus.test, tcfg.eval_batch_size, stride=mcfg.eval_stride, precision=tcfg.precision)
    train_rates = [r["tokens_per_s"] for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if r["split"] == "train"]
    return {
        "name": name,
        "preset": preset,
        "overrides": overrides,
        "model": to_dict(mcfg),
        "train": {
            k: v
            for k, v in to_dict(tcfg).items()
            if k in ("batch_size", "bptt_segments", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "device", "seed")
        }
        | {"precision": resolve_precision(tcfg.precision, next(model.parameters()).device)},  # what ran, not `auto`
        "params": summary["params"],
        "tokens_seen": summary["tokens_seen"],
        "wall_s": wall,
        "train_tokens_per_s": statistics.median(train_rates[1:] or train_rates),  # the first interval includes warm-up
        "train_flops_per_token": count_flops(mcfg).train_per_token,
        "eval_flops_per_token": count_flops(mcfg, evaluation=True).forward_per_token,
        "valid_ppl": summary["valid_ppl"],
        "test_ppl": test["ppl"],
        "run_dir": summary["run_dir"],
    }


def plot(rows: list[dict], budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["train_flops_per_token"] / 1e6, r["test_ppl"], s=30)
        ax.annotate(r["name"], (r["train_flops_per_token"] / 1e6, r["test_ppl"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("training MFLOP per token (3 x forward)")
    ax.set_ylabel("test perplexity (state carried over the split)")
    ax.set_title(f"PTB, {budget / 1e6:.1f}M training tokens per model")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def report(rows: list[dict], args: argparse.Namespace, command: str, machine: str) -> str:
    ref = next((r for r in rows if r["preset"] == "ptb-transformer-70" and not r["overrides"]), None)
    m0 = rows[0]["model"]
    lines = [
        *header("PTB: quality per FLOP at one equal budget", command, machine),
        "Finished rows are kept in `--runs-dir`/results.json and not retrained, "
        f"so a grid may be filled over several invocations (`--only`); this file was last written by `{args.invocation}`.",
        "",
        f"Every row trained on the same budget of {args.tokens:,.0f} tokens (rounded up to whole steps of batch x segment x K), width {m0['d_model']}, {m0['n_layer']} layers, "
        f"{m0['n_head']} heads, feed-forward {m0['d_ff']}; test perplexity is over the whole test split with the state carried "
        "from segment to segment (Transformer: non-overlapping segments). FLOPs from `crt flops` (training = 3 x forward); "
        "tokens/s is the median training rate logged during the run, without evaluation. Equal tokens is not equal updates: "
        "a row whose step covers more tokens (batch x segment x K) takes fewer optimiser steps (column updates).",
        "",
        "| model | params | updates | train MFLOP/token | eval MFLOP/token | train tokens/s | valid ppl | test ppl | test ppl vs Transformer-70 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        rel = f"{r['test_ppl'] / ref['test_ppl']:.3f}x" if ref else "-"
        lines.append(
            f"| {r['name']} | {r['params']:,} | {r['train']['max_steps']} | {r['train_flops_per_token'] / 1e6:.2f} | {r['eval_flops_per_token'] / 1e6:.2f} | "
            f"{r['train_tokens_per_s']:,.0f} | {r['valid_ppl']:.2f} | {r['test_ppl']:.2f} | {rel} |"
        )
    t = rows[0]["train"]
    lines += [
        "",
        f"Regularisation and optimisation (all rows): dropout {m0['dropout']} (residual and feed-forward), embedding dropout "
        f"{m0['emb_dropout']}, attention dropout {m0['attn_dropout']}, AdamW weight decay {t['weight_decay']} on matrices, lr {t['lr']} "
        f"with linear warmup over min(60, updates / 10) steps and cosine decay to {t['min_lr']}, gradient clipping at 1.0, batch {t['batch_size']}, "
        f"{t['precision']}, seed {t['seed']}.",
        "Per-row settings: `benchmarks/ptb.py` GRID (presets in `src/crt/configs/`, overrides listed in the row name); "
        f"each row's full config is in `{Path(args.runs_dir) / 'results.json'}` after a run.",
        "",
        f"![test perplexity against training FLOPs per token]({Path(args.out).with_suffix('.png').name})",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder with ptb.{train,valid,test}.txt")
    parser.add_argument("--tokens", type=float, default=1.4e6, help="training tokens per model (equal budget)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field in every row (repeatable)")
    parser.add_argument("--only", action="append", default=[], help="train only rows whose name contains this (repeatable)")
    parser.add_argument("--row", action="append", default=[], help="train only the row of exactly this name (repeatable; with --only: either)")
    parser.add_argument("--runs-dir", default="runs/ptb-bench")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "ptb.md"))
    parser.add_argument("--fresh", action="store_true", help="forget finished rows and train every row again")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    args.set = dict(item.split("=", 1) for item in args.set)  # apply_overrides converts each value to its field's type
    args.invocation = shlex.join(["python", "benchmarks/ptb.py", *sys.argv[1:]])
    argv = sys.argv[1:]
    whole = [
        a
        for i, a in enumerate(argv)
        if a not in ("--only", "--row") and (i == 0 or argv[i - 1] not in ("--only", "--row")) and not a.startswith(("--only=", "--row="))
    ]
    command = shlex.join(["python", "benchmarks/ptb.py", *whole])  # the whole grid: this invocation without --only

    results_path = Path(args.runs_dir) / "results.json"
    done = {} if args.fresh or not results_path.exists() else json.loads(results_path.read_text())
    mcfg, tcfg = load_preset(GRID[0][1])
    _, tcfg = apply_overrides(mcfg, tcfg, {"data_dir": args.data_dir})
    corpus = load_corpus(tcfg)
    for name, preset, overrides in GRID:
        chosen = not (args.only or args.row) or name in args.row or any(o in name for o in args.only)
        if name in done or not chosen:
            continue
        print(f"== {name}", flush=True)
        done[name] = run_row(name, preset, overrides, args, corpus)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(results_path, json.dumps(done, indent=1))
    rows = [done[name] for name, _, _ in GRID if name in done]
    device = resolve_device(args.set.get("device", "auto"))
    text = report(rows, args, command, describe(device))
    out = Path(args.out)
    write_atomic(out, text)
    plot(rows, args.tokens, out.with_suffix(".png"))
    print(text)
    print(f"written to {out} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
