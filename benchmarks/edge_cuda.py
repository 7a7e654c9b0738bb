"""Edge inference on a CUDA GPU: the streams are exact there, and what a token costs, fp32 and bf16.

    python benchmarks/edge_cuda.py            # writes docs/results/edge-cuda.md (needs a CUDA GPU)

The models have random weights: exactness and latency do not depend on their values.
1. Every language model's incremental stream (`crt.infer.open_stream`) against its segment path
   on the GPU over 3 segments and a part, 2 streams: max |logit difference| in fp32, and under
   bf16 autocast the share of positions whose argmax agrees with the fp32 segment path.
2. Per-token latency of greedy generation (median, p95; the GPU synchronised per token; after a
   warm-up generation of two segments, since the first of each cache length picks kernels) and
   streaming tokens/s (`crt score`'s path), fp32 and bf16 autocast, for CRTs of width 128 (the
   PTB preset) and 512, and Transformer-XL at 128.
3. `crt export` of a model that lives on the GPU (the export runs on the CPU copy): ONNX and pt2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("crt", "transformer", "transformer_xl", "rmt", "armt")


def small(arch: str, device: torch.device, **kw):
    from crt.config import ModelConfig
    from crt.models import build_model

    torch.manual_seed(0)
    cfg = {"vocab_size": 50, "d_model": 64, "n_layer": 2, "n_head": 4, "d_ff": 128, "segment_len": 7, **kw}
    model = build_model(ModelConfig(arch=arch, **cfg)).to(device).eval()
    if arch == "armt":  # W_v starts at zero (the memory reads 0): make the memory matter
        with torch.no_grad():
            for layer in model.layers:
                layer.memory.value.weight.normal_(0, 0.3)
    return model


def exactness(device: torch.device) -> list[tuple[str, float, float]]:
    from crt.infer import open_stream
    from crt.state import iter_segments

    rows = []
    tokens = torch.randint(50, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    for arch in ARCHS:
        model = small(arch, device)
        with torch.no_grad():
            steps = iter_segments(model, tokens, model.init_state(2, evaluation=True), 7)
            reference = torch.cat([logits for _, logits, _ in steps], dim=1).float()  # [2, 24, V]
        out = {}
        for precision, ctx in (("fp32", nullcontext()), ("bf16", torch.autocast("cuda", dtype=torch.bfloat16))):
            with ctx:
                stream = open_stream(model, batch_size=2)
                out[precision] = torch.stack([stream.feed(tokens[:, t]) for t in range(tokens.shape[1])], dim=1).float()
        diff = float((out["fp32"] - reference).abs().max())
        agree = float((out["bf16"].argmax(-1) == reference.argmax(-1)).float().mean())
        rows.append((arch, diff, agree))
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def speed(device: torch.device, tokens: int) -> list[tuple[str, str, float, float, float]]:
    from crt.config import ModelConfig
    from crt.infer import generate, score_stream
    from crt.models import build_model

    rows = []
    for arch, d in (("crt", 128), ("crt", 512), ("transformer_xl", 128)):
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch=arch, vocab_size=10_000, d_model=d, n_layer=3, n_head=4, d_ff=4 * d, segment_len=35)).to(device).eval()
        data = torch.randint(10_000, (20_000,), generator=torch.Generator().manual_seed(0)).tolist()
        for precision, ctx in (("fp32", nullcontext), ("bf16", lambda: torch.autocast("cuda", dtype=torch.bfloat16))):
            with ctx():
                generate(model, [1, 2, 3], 2 * 35, temperature=0.0)  # warm-up: every cache length once (kernel choice per shape)
                times: list[float] = []
                generate(model, [1, 2, 3], tokens, temperature=0.0, latencies=times)
                times = sorted(times)
                start = time.perf_counter()
                for _ in score_stream(model, iter(data)):
                    pass
                tps = len(data) / (time.perf_counter() - start)
            rows.append((f"{arch} {d}", precision, statistics.median(times) * 1e3, times[int(0.95 * (len(times) - 1))] * 1e3, tps))
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def exports(device: torch.device) -> list[tuple[str, str, str]]:
    from crt.infer.export import export

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("crt", "transformer_xl"):
            model = small(arch, device)
            for fmt in ("onnx", "pt2"):
                try:
                    r = export(model, fmt, Path(tmp) / f"{arch}.{fmt}", int8=fmt == "onnx")
                    rows.append((arch, fmt, f"max abs difference {r['max_difference']:.1e}"))
                except Exception as e:  # report, do not hide: this table says what did not work
                    rows.append((arch, fmt, f"failed: {str(e).splitlines()[0][:150]}"))
                print(rows[-1], file=sys.stderr, flush=True)
            assert next(model.parameters()).device.type == "cuda"  # the caller's model stays where it was
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gen-tokens", type=int, default=300, help="tokens generated per latency figure")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "edge-cuda.md"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("edge_cuda.py needs a CUDA GPU; docs/results/edge.md holds the CPU figures")
    from crt.analysis.results import header, write_results

    device = torch.device("cuda")
    exact, fast, exported = exactness(device), speed(device, args.gen_tokens), exports(device)
    lines = [
        *header("Edge inference on a CUDA GPU", device=device),
        "Incremental stream vs the segment path on the GPU (random weights, width 64, 2 layers, segments of 7, 24 tokens, 2 streams):",
        "",
        "| arch | fp32 max abs logit difference | bf16 autocast: argmax agreement with fp32 |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {a} | {d:.1e} | {100 * g:.1f}% |" for a, d, g in exact]
    lines += [
        "",
        f"Greedy generation, batch 1, {args.gen_tokens} tokens after a two-segment warm-up, per-token latency with the GPU synchronised per token; streaming = `crt score`'s path "
        "over 20,000 tokens (whole segments of 35). 3 layers, vocabulary 10,000, d_ff = 4 x width, random weights:",
        "",
        "| model, width | precision | latency median (ms) | latency p95 (ms) | streaming tokens/s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {m} | {p} | {med:.2f} | {p95:.2f} | {tps:,.0f} |" for m, p, med, p95, tps in fast]
    lines += [
        "",
        "`crt export` of a model on the GPU (the program is traced and checked on a CPU copy):",
        "",
        "| arch | format | result |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {a} | {f} | {r} |" for a, f, r in exported]
    write_results(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
