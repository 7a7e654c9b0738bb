"""Training throughput of CRT-35 on PTB in 1 process against 2 torchrun processes (Gloo, CPU).

    python benchmarks/distributed.py --data-dir ../shared/data/ptb     # writes docs/results/distributed.md

Three ways to spend the same cores on the same global batch (32 streams, K = 2, 35 tokens):
- 1 process, all threads (today's `crt train`);
- 1 process, 1 thread (what each torchrun process gets: torchrun sets OMP_NUM_THREADS=1);
- torchrun --nproc_per_node 2: 2 processes of 1 thread, 16 streams each, gradients all-reduced.

Each is a real `crt train` run of --steps steps; its speed is the median of its train records'
tokens/s (global tokens over rank 0's wall time, the all-reduce included), the first record
(warm-up) left out. The three run alternately for --rounds rounds, so a drifting machine affects
them alike; the table gives medians over rounds and ratios to the 1-process run.
It also times the one piece DDP training adds in Python: the walk over a step's autograd graph
that finds the parameters a step leaves without a gradient (`crt.train.distributed.reached`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from crt.analysis.results import header, write_results
from crt.config import load_preset
from crt.models import build_model
from crt.runtime import describe_precision
from crt.train.distributed import reached
from crt.train.segments import window_loss

ROOT = Path(__file__).resolve().parents[1]


def run(kind: str, data_dir: str, steps: int, out: Path) -> float:
    flags = ["train", "--preset", "ptb-crt-35", "--data-dir", data_dir, "--max-steps", str(steps), "--eval-every", "0", "--log-every", "5"]
    flags += ["--eval-max-tokens", "2000", "--out-dir", str(out), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if kind == "1 process, 1 thread":
        env["OMP_NUM_THREADS"] = "1"
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "crt"]
        if kind.startswith("2")
        else [sys.executable, "-m", "crt"]
    )
    proc = subprocess.run([*launcher, *flags], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    rates = [r["tokens_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    shutil.rmtree(out)
    return statistics.median(rates[1:])


def graph_walk_ms() -> tuple[float, float, int]:
    """(median ms of `reached` over one CRT-35 training window's graph, median ms of that window's forward and backward, parameters)."""
    mcfg, tcfg = load_preset("ptb-crt-35")
    mcfg.vocab_size = 10_000
    torch.manual_seed(0)
    model = build_model(mcfg)
    params = list(model.parameters())
    x = torch.randint(10_000, (tcfg.batch_size, tcfg.bptt_segments * mcfg.segment_len + 1))
    walks, steps = [], []
    for _ in range(7):
        t0 = time.perf_counter()
        loss, _ = window_loss(model, x[:, :-1], x[:, 1:], model.init_state(tcfg.batch_size), mcfg.segment_len, tcfg.bptt_segments)
        t1 = time.perf_counter()
        reached(loss, params)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        walks.append(t2 - t1)
        steps.append(t1 - t0 + t3 - t2)
    return 1e3 * statistics.median(walks[1:]), 1e3 * statistics.median(steps[1:]), sum(p.numel() for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "ptb"), help="the PTB folder")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "distributed.md"))
    args = parser.parse_args()
    if not (Path(args.data_dir) / "ptb.train.txt").is_file():
        raise SystemExit(f"{args.data_dir} holds no ptb.train.txt: give --data-dir the PTB folder (`crt data download ptb --dir DIR`)")
    kinds = [
        "1 process, 2 threads" if os.cpu_count() == 2 else f"1 process, {torch.get_num_threads()} threads",
        "1 process, 1 thread",
        "2 processes x 1 thread",
    ]
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    scratch = Path(tempfile.mkdtemp(prefix="crt-ddp-bench-"))
    try:
        for r in range(args.rounds):
            for k in kinds:
                rates[k].append(run(k, args.data_dir, args.steps, scratch / f"{r}-{kinds.index(k)}"))
                print(f"round {r + 1}: {k}: {rates[k][-1]:,.0f} tokens/s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    walk, step, n_params = graph_walk_ms()
    ref = statistics.median(rates[kinds[0]])
    lines = header("Data-parallel training on CPU: 1 process against 2 torchrun processes (Gloo)")
    lines += [
        f"CRT-35 (`--preset ptb-crt-35`, width 128, 3 layers) on PTB, global batch 32 streams x 2 segments x 35 tokens, "
        f"{describe_precision('auto', torch.device('cpu'))}, "
        f"{args.steps} steps per run, {args.rounds} rounds alternating the three; tokens/s is the median of a run's train records "
        "(global tokens over rank 0's wall time), first record left out; medians over rounds.",
        "",
        "| how | tokens/s (median) | runs | spread (min-max) | vs 1 process |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for k in kinds:
        med = statistics.median(rates[k])
        lines.append(f"| {k} | {med:,.0f} | {len(rates[k])} | {min(rates[k]):,.0f}-{max(rates[k]):,.0f} | {med / ref:.2f}x |")
    lines += [
        "",
        f"The graph walk that finds a step's unused parameters (DDP runs only): {walk:.1f} ms per step, against {step:.0f} ms for that "
        "window's forward and backward in fp32 in this process (median of 6).",
        "",
        "What 2 cores can show: whether 2 processes of 1 thread keep up with 1 process of 2 threads on the same global batch. "
        "They cannot show scaling: the processes share the cores the 1-process run already uses. On a machine with one GPU "
        f"or one socket per process, each process brings its own compute, and the all-reduce of the {n_params / 1e6:.2f}M gradients per step is what it costs.",
    ]
    print(write_results(args.out, lines))


if __name__ == "__main__":
    main()
