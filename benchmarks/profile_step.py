"""Where one training step of a preset spends its time, op by op (torch.profiler, CPU).

    python benchmarks/profile_step.py ptb-crt-35 ptb-transformer-70   # writes docs/results/profile.md
    python benchmarks/profile_step.py ptb-crt-35 --precision fp32 --precision bf16

The step is the one `crt train` takes (the preset's batch x K segments, cross-entropy, AdamW)
on random tokens, with the allocator setting `crt train` uses; warm-up steps first, then
`--steps` profiled steps. The table lists the ops with the most self time: it is how the CPU
traps of docs/results/bench.md were found (the logits' page faults showed up as aten::fill_
and log-softmax time, dropout as aten::bernoulli_, the RNN loops as many small addmm calls).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from crt.analysis.flops import with_vocab
from crt.analysis.results import header, write_results
from crt.config import load_preset
from crt.models import build_model
from crt.runtime import autocast, keep_freed_memory
from crt.train.segments import window_loss

ROOT = Path(__file__).resolve().parents[1]


def profile_preset(name: str, steps: int, rows: int, precision: str) -> str:
    mcfg, tcfg = load_preset(name)
    mcfg = with_vocab(mcfg, tcfg, name)
    torch.manual_seed(0)
    model = build_model(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, K, L = tcfg.batch_size, tcfg.bptt_segments, mcfg.segment_len
    x = torch.randint(mcfg.vocab_size, (B, K * L + 1))  # [B, K*L+1]

    def step() -> None:
        with autocast(torch.device("cpu"), precision):
            loss, _ = window_loss(model, x[:, :-1], x[:, 1:], model.init_state(B), L, K)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    return f"## {name}, {precision} ({steps} steps of {B} x {K} x {L} tokens)\n\n```\n{table}\n```\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--precision", action="append", choices=("fp32", "bf16"), help="fp32 and/or bf16 autocast (repeatable; default fp32)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "profile.md"))
    args = parser.parse_args()
    keep_freed_memory()
    parts = header("One training step, op by op")
    parts += [profile_preset(name, args.steps, args.rows, precision) for name in args.presets for precision in args.precision or ["fp32"]]
    write_results(args.out, parts)
    print("\n".join(parts))


if __name__ == "__main__":
    main()
