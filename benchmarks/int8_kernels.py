"""One linear layer at batch 1, fp32 against torch's dynamic int8, per call: why int8 generation
pays only for wide models (docs/results/edge.md).

    python benchmarks/int8_kernels.py          # writes docs/results/int8-kernels.md

For each shape (in -> out features), the median of 2,000 calls on one input row (one token), one
thread: nn.Linear in fp32, and the same layer after `crt.infer.quantize_int8` (int8 weights, the
input quantized on each call). The shapes are those of the PTB models (width 128, d_ff 512,
vocabulary 10,000) and of a width-512 model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(128, 384), (128, 512), (512, 128), (128, 10_000), (512, 2048), (512, 10_000)]


def median_us(layer: torch.nn.Module, x: torch.Tensor, calls: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(calls):
            start = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times[calls // 10 :]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "int8-kernels.md"))
    args = parser.parse_args()
    from crt.analysis.results import header, write_results
    from crt.infer.quantize import quantize_int8

    torch.set_num_threads(1)
    torch.manual_seed(0)
    lines = [
        *header("One linear layer at batch 1: fp32 against dynamic int8"),
        f"Median µs per call over {args.calls:,} calls on one input row (the first tenth dropped); int8 = `crt.infer.quantize_int8` of the same layer.",
        "",
        "| in -> out | fp32 (µs) | int8 (µs) | int8 / fp32 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for n_in, n_out in SHAPES:
        layer = torch.nn.Sequential(torch.nn.Linear(n_in, n_out)).eval()  # quantization swaps children, not the root
        x = torch.randn(1, n_in)
        fp32, int8 = median_us(layer, x, args.calls), median_us(quantize_int8(layer), x, args.calls)
        lines.append(f"| {n_in} -> {n_out:,} | {fp32:.1f} | {int8:.1f} | {int8 / fp32:.2f}x |")
        print(lines[-1], file=sys.stderr, flush=True)
    write_results(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
