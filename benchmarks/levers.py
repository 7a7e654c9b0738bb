"""Issue 18's speed levers, each an A/B measured side by side in one process.

    python benchmarks/levers.py                 # writes docs/results/levers.md
    python benchmarks/levers.py --compile       # also torch.compile of CRT-35's training step (minutes to compile)

- cross-entropy: `F.cross_entropy` on the tied head's logits against a fused form (log-sum-exp
  forward; backward softmax minus one-hot, no log-softmax tensor kept), [1120, 128] x [128, 10000];
- GRU kernel: one [32, 36, 128] layer forward and backward, oneDNN enabled against disabled;
- minGRU scan: the per-step multiply-add loop `crt.layers.MinGRU` uses against the closed form
  h_t = A_{t,0} h_0 + sum_s A_{t,s} b_s as one masked [C, C] decay matrix per channel (chunks of C);
- with --compile: CRT-35's training step in eager against `torch.compile(model)`.

Each variant is timed alternately with its reference for `--rounds` rounds (median of `--repeats`
calls per round), so a drifting machine affects both alike; ratios are variant / reference time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from crt.analysis.flops import with_vocab
from crt.analysis.results import header, write_results
from crt.config import load_preset
from crt.layers import GRU, MinGRU
from crt.models import build_model
from crt.runtime import keep_freed_memory
from crt.state import detach
from crt.train.segments import window_loss

ROOT = Path(__file__).resolve().parents[1]


class FusedCrossEntropy(torch.autograd.Function):
    """sum_i (logsumexp(z_i) - z_i[y_i]); backward (softmax(z_i) - onehot(y_i)) * g, from z and the saved lse."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)  # [N]
        picked = logits.gather(1, targets[:, None]).squeeze(1)  # [N]
        ctx.save_for_backward(logits, lse, targets)
        return (lse - picked).sum()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        logits, lse, targets = ctx.saved_tensors
        grad = torch.exp(logits - lse[:, None]).mul_(g)  # [N, V]
        grad.scatter_add_(1, targets[:, None], -g.expand(len(targets), 1).to(grad.dtype))
        return grad, None


def closed_form_scan(cell: MinGRU, x: torch.Tensor, h: torch.Tensor, chunk: int) -> torch.Tensor:
    """The same recurrence as MinGRU.forward, as masked decay matrices over chunks of `chunk` steps."""
    k, candidate = cell.gates(x).chunk(2, dim=-1)  # [B, T, H]
    log_a, b = F.logsigmoid(-k), torch.sigmoid(k) * candidate  # log(1 - z), z * h~
    outs = []
    for start in range(0, x.shape[1], chunk):
        la, bb = log_a[:, start : start + chunk], b[:, start : start + chunk]
        log_A = la.cumsum(dim=1)  # [B, C, H]
        C = la.shape[1]
        causal = torch.ones(C, C, dtype=torch.bool).tril()
        decay = torch.where(causal[:, :, None], log_A.unsqueeze(2) - log_A.unsqueeze(1), float("-inf")).exp()  # [B, C, C, H]
        out = torch.einsum("btsh,bsh->bth", decay, bb) + log_A.exp() * h.unsqueeze(1)
        outs.append(out)
        h = out[:, -1]
    return torch.cat(outs, dim=1)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ab(label: str, variants: dict, rounds: int, repeats: int) -> list[str]:
    """Rows 'label | variant | ms per round | ratio to the first variant' for variants timed alternately."""
    for fn in variants.values():
        fn()  # warm-up
    per = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            per[name].append(timed(fn, repeats) * 1e3)
    ref = statistics.median(per[next(iter(variants))])
    return [f"| {label} | {name} | {' / '.join(f'{t:.1f}' for t in ts)} | {statistics.median(ts) / ref:.2f}x |" for name, ts in per.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "levers.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    rows = []

    N, V, D = 1120, 10_000, 128
    h = torch.randn(N, D, requires_grad=True)
    W = (torch.randn(V, D) * 0.02).requires_grad_()
    y = torch.randint(V, (N,))
    notes = []

    def grad_of(loss_fn) -> tuple[float, torch.Tensor]:
        h.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.item(), h.grad.clone()

    (l_ref, g_ref), (l_fused, g_fused) = grad_of(lambda: F.cross_entropy(h @ W.T, y, reduction="sum")), grad_of(lambda: FusedCrossEntropy.apply(h @ W.T, y))
    notes.append(
        f"Fused cross-entropy against F.cross_entropy: summed loss {l_fused:.4f} against {l_ref:.4f}, max |gradient difference| {(g_fused - g_ref).abs().max():.1e}."
    )
    rows += ab(
        "cross-entropy over the tied head, forward + backward",
        {
            "F.cross_entropy": lambda: F.cross_entropy(h @ W.T, y, reduction="sum").backward(),
            "fused": lambda: FusedCrossEntropy.apply(h @ W.T, y).backward(),
        },
        args.rounds,
        args.repeats,
    )

    gru = GRU(D, D)
    x = torch.randn(32, 36, D, requires_grad=True)
    h0 = torch.zeros(32, D)
    g = torch.randn(32, 36, D)

    def gru_step(onednn: bool) -> None:
        with torch.backends.mkldnn.flags(enabled=onednn):
            gru(x, h0)[0].backward(g)

    rows += ab("GRU [32, 36, 128], forward + backward", {"oneDNN on": lambda: gru_step(True), "oneDNN off": lambda: gru_step(False)}, args.rounds, args.repeats)

    cell = MinGRU(D, D)
    with torch.no_grad():
        loop = cell(x, h0)[0]
        notes.append(
            "Closed-form minGRU scan against the loop: max |output difference| "
            + ", ".join(f"{(closed_form_scan(cell, x, h0, c) - loop).abs().max():.1e} (chunks of {c})" for c in (8, 64))
            + "."
        )
    rows += ab(
        "minGRU [32, 36, 128], forward + backward",
        {
            "per-step loop (crt.layers.MinGRU)": lambda: cell(x, h0)[0].backward(g),
            "closed form, chunks of 8": lambda: closed_form_scan(cell, x, h0, 8).backward(g),
            "closed form, chunks of 64": lambda: closed_form_scan(cell, x, h0, 64).backward(g),
        },
        args.rounds,
        args.repeats,
    )

    if args.compile:
        mcfg, tcfg = load_preset("ptb-crt-35")
        mcfg = with_vocab(mcfg, tcfg, "ptb-crt-35")
        B, K, L = tcfg.batch_size, tcfg.bptt_segments, mcfg.segment_len
        data = torch.randint(mcfg.vocab_size, (B, K * L + 1))

        def trainer(compiled: bool):
            torch.manual_seed(0)
            model = build_model(mcfg)
            run = torch.compile(model) if compiled else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            state = [model.init_state(B)]

            def step() -> None:
                loss, s = window_loss(run, data[:, :-1], data[:, 1:], state[0], L, K)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                state[0] = detach(s)

            start = time.perf_counter()
            step()
            step()
            return step, time.perf_counter() - start

        eager, _ = trainer(False)
        compiled, warm = trainer(True)
        notes.append(f"torch.compile: the first two compiled steps (compilation included) took {warm:.0f} s.")
        rows += ab("CRT-35 training step (32 x 2 x 35 tokens)", {"eager": eager, "torch.compile(model)": compiled}, args.rounds, 3)

    parts = header("Speed levers of issue 18: A/Bs in one process")
    parts += [
        f"{args.threads} torch thread(s). Each variant timed alternately with the others, {args.rounds} rounds, median of "
        f"{args.repeats} calls per round (the compiled step: 3). Ratio: median time / the first variant's.",
        "",
        "| what | variant | ms per round | time vs first |",
        "| --- | --- | --- | ---: |",
        *rows,
        "",
        *notes,
    ]
    write_results(args.out, parts)
    print("\n".join(parts))


if __name__ == "__main__":
    main()
