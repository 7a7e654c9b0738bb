"""Edge inference on this machine: generation latency, streaming speed, memory over long streams, int8.

    python benchmarks/edge.py --data-dir ../shared/data/ptb       # writes docs/results/edge.md

Checkpoints (default runs/ptb-bench/ptb-{crt,xl,armt}-35) come from
`python benchmarks/ptb.py`, or `crt train --preset NAME --data-dir DIR --out-dir runs/ptb-bench/NAME`.
For each, fp32 and int8 (dynamic quantization, `crt.infer.quantize_int8`):
- per-token latency of greedy generation (median, p95), one token at a time with the state carried;
- the same, fp32, beside it with the onnxruntime per-token step (`crt.infer.token_runtime`: the
  model's own open/step/close exported with fixed-size segment caches, what `crt generate`
  runs by default), with its export time (fresh cache, then from the cache), its max |difference|
  from the PyTorch segment path, and `crt score`'s tokens/s through the onnxruntime segment step;
- streaming tokens/s of `crt score`'s path (whole segments, state carried);
- PTB test perplexity;
- size on disk: safetensors (fp32), the int8 state dict, and the ONNX and pt2 step files;
- one segment step's latency in PyTorch eager, onnxruntime and AOTInductor (the pt2 programs
  compiled; needs a C++ compiler), fp32 and int8;
- per-token latency, fp32 and int8, of CRTs of growing width (random weights: latency does not
  depend on their values), to show where int8 starts to pay;
- peak RSS of a fresh process that streams 1k and 100k tokens (also a full-context Transformer,
  whose key/value cache grows with the stream: the reference CRT is meant to beat).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINTS = ("runs/ptb-bench/ptb-crt-35", "runs/ptb-bench/ptb-xl-35", "runs/ptb-bench/ptb-armt-35")


def load(path: str):
    from crt.infer import load_language_model

    return load_language_model(path)


def ptb_tokens(data_dir: str, split: str) -> torch.Tensor:
    from crt.data.corpus import load_words

    return getattr(load_words(data_dir, "ptb"), split)


# ----------------------------------------------------------------------------- child process: peak RSS


def full_context_rss(n_tokens: int, chunk: int = 35) -> None:
    """A 3-layer width-128 decoder with rotary positions whose key/value cache keeps every token
    (what a full-context Transformer needs to stream): fed in chunks of `chunk` tokens."""
    from crt.config import ModelConfig
    from crt.models import build_model

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(arch="transformer", vocab_size=10_000, d_model=128, n_layer=3, n_head=4, d_ff=512, segment_len=chunk, positions="rotary")
    ).eval()
    segment = model.open_segment(model.init_state(1))  # a segment that never closes: its caches keep every token
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for start in range(0, n_tokens, chunk):
            tokens = torch.randint(10_000, (1, min(chunk, n_tokens - start)), generator=g)
            x, attn_kwargs = model.positions(model.tokens(tokens), offset=start)  # [1, T, D]
            model.tokens.unembed(model.trunk(x, attn_kwargs, segment.layers))


def child(args: argparse.Namespace) -> None:
    from crt.analysis.machine import peak_rss_mib
    from crt.infer import score_stream

    torch.set_num_threads(args.threads)
    if args.rss_child == "full-context":
        full_context_rss(args.tokens)
    else:
        model, *_ = load(args.rss_child)
        data = ptb_tokens(args.data_dir, "train")  # the whole split is loaded whatever the stream's length
        # one token at a time, as from a file; not `for t in data`, which unbinds the whole
        # tensor into one 0-d tensor per token before the first (about 0.6 KiB per token)
        for _ in score_stream(model, (int(data[i]) for i in range(args.tokens + 1))):
            pass
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


def peak_rss(target: str, tokens: int, args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--rss-child", target, "--tokens", str(tokens), "--data-dir", args.data_dir, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


# ----------------------------------------------------------------------------- measurements in this process


def latency(model, prompt: list[int], n: int, stream=None) -> tuple[float, float]:
    """(median, p95) ms per generated token; stream: what runs it (default the eager stream)."""
    from crt.infer import generate

    times: list[float] = []
    generate(model, prompt, n, temperature=0.0, latencies=times, stream=stream)
    times = sorted(times[5:])  # the first tokens warm the allocator up
    return statistics.median(times) * 1e3, times[int(0.95 * (len(times) - 1))] * 1e3


def token_runtimes(model, prompt: list[int], n: int, data: list[int]) -> dict[str, object]:
    """The eager stream and the onnxruntime per-token step side by side, in one process, on the
    same prompt: (median, p95) ms of each, alternated over two rounds (the better round of
    each is kept, so a burst of load on the machine hits neither alone); the export time into a
    fresh cache and the load time from it; the max |difference| of the runtime's check; and
    `crt score`'s tokens/s through the onnxruntime segment step. A model the runtime cannot run
    gets the reason instead."""
    from crt.infer import token_runtime
    from crt.infer.stream import open_stream

    out: dict[str, object] = {}
    users_cache = token_runtime.CACHE_DIR
    with tempfile.TemporaryDirectory() as cache:
        token_runtime.CACHE_DIR = Path(cache)  # a fresh cache: the first construction exports
        try:
            start = time.perf_counter()
            runtime = token_runtime.TokenRuntime(model)
            out["export s"] = time.perf_counter() - start
            start = time.perf_counter()
            runtime = token_runtime.TokenRuntime(model)  # from the cache, checked again
            out["cached s"] = time.perf_counter() - start
            out["max difference"] = runtime.max_difference
            segments = token_runtime.SegmentRuntime(model)
            out["score tokens/s"] = stream_speed(model, data, segments)
        except Exception as e:  # the table says what did not work
            out["unsupported"] = str(e).splitlines()[0][:160]
            return out
        finally:
            token_runtime.CACHE_DIR = users_cache
    rounds = {"eager": [], "onnxruntime": []}
    for _ in range(2):
        rounds["eager"].append(latency(model, prompt, n, open_stream(model, 1)))
        runtime.reset()
        rounds["onnxruntime"].append(latency(model, prompt, n, runtime))
    for label, results in rounds.items():
        out[label] = min(results)
    return out


def width_sweep(widths: list[int], prompt: list[int], n: int) -> list[tuple[int, int, float, float]]:
    """(width, parameters, fp32 median ms, int8 median ms) of greedy generation for a 3-layer CRT
    with the PTB vocabulary, d_ff = 4 x width, random weights."""
    from crt.config import ModelConfig
    from crt.infer.quantize import quantize_int8
    from crt.models import build_model

    rows = []
    for d in widths:
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch="crt", vocab_size=10_000, d_model=d, n_layer=3, n_head=4, d_ff=4 * d, segment_len=35)).eval()
        fp32, int8 = latency(model, prompt, n)[0], latency(quantize_int8(model), prompt, n)[0]
        rows.append((d, sum(p.numel() for p in model.parameters()), fp32, int8))
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def step_latencies(model, int8_model, tmp: Path, threads: int, n: int = 100) -> dict[str, float | str]:
    """Median ms of one segment step (batch 1, the initial state) per runtime, fp32 and int8:
    PyTorch eager, onnxruntime on the exported ONNX steps, and the pt2 programs compiled by
    AOTInductor (which needs a C++ compiler: a failure is reported, not hidden). Reads the step
    files `export` wrote to tmp."""
    import numpy as np
    import onnxruntime as ort
    import torchao  # noqa: F401  (the int8 pt2 program's quantize ops)

    from crt.infer.export import SegmentStep

    def median_ms(run) -> float:
        times = []
        with torch.no_grad():
            for _ in range(n):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
        return statistics.median(times[10:]) * 1e3

    step = SegmentStep(model)
    L = model.cfg.eval_segment
    tokens = torch.randint(model.cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(0))
    state = step.initial
    out: dict[str, float | str] = {}
    for label, m in (("fp32", model), ("int8", int8_model)):
        eager = SegmentStep(m)
        out[f"PyTorch eager, {label}"] = median_ms(lambda: eager(tokens, *state))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    for label, name in (("fp32", "step.onnx"), ("int8", "step.int8.onnx")):
        session = ort.InferenceSession(str(tmp / name), options, providers=["CPUExecutionProvider"])
        feed = dict(zip([i.name for i in session.get_inputs()], [tokens.numpy(), *[np.asarray(s) for s in state]]))
        out[f"onnxruntime, {label}"] = median_ms(lambda: session.run(None, feed))
    for label, name in (("fp32", "step.pt2"), ("int8", "step.int8.pt2")):
        try:
            package = torch._inductor.aoti_compile_and_package(torch.export.load(str(tmp / name)), package_path=str(tmp / f"aoti-{name}"))
            compiled = torch._inductor.aoti_load_package(package)
            out[f"AOTInductor, {label}"] = median_ms(lambda: compiled(tokens, *state))
        except Exception as e:  # the table says what did not work
            out[f"AOTInductor, {label}"] = f"failed: {str(e).splitlines()[0][:120]}"
    return out


def stream_speed(model, data: list[int], segments=None) -> float:
    """Tokens/s of `crt score`'s path; segments: what runs the segments (default PyTorch's)."""
    from crt.infer import score_stream

    start = time.perf_counter()
    for _ in score_stream(model, iter(data), segments=segments):
        pass
    return len(data) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", help="language-model checkpoint; repeat for several (default: PTB CRT-35 and XL-35)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "ptb"), help="PTB folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: an edge CPU core)")
    parser.add_argument("--gen-tokens", type=int, default=300, help="tokens generated for the latency figures")
    parser.add_argument("--stream-tokens", type=int, default=20_000, help="tokens streamed for tokens/s")
    parser.add_argument("--rss-tokens", type=int, nargs=2, default=[1_000, 100_000], help="stream lengths for peak RSS")
    parser.add_argument("--widths", type=int, nargs="*", default=[128, 256, 512, 1024], help="CRT widths for the int8 latency sweep")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "edge.md"))
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return child(args)

    from crt.analysis.machine import describe
    from crt.analysis.results import header, write_results
    from crt.checkpoint import load_checkpoint
    from crt.infer.export import export
    from crt.infer.quantize import quantize_int8
    from crt.train.evaluate import evaluate

    torch.set_num_threads(args.threads)
    command = "python benchmarks/edge.py" + "".join(f" {a}" for a in sys.argv[1:])
    test = ptb_tokens(args.data_dir, "test")
    stream_data = test[: args.stream_tokens].tolist()
    prompt = test[:20].tolist()
    rows, sizes, rss, steps, runtimes = [], [], [], [], []
    for path in args.checkpoint or [str(ROOT / c) for c in DEFAULT_CHECKPOINTS]:
        model, vocab, mcfg, tcfg = load(path)
        name = Path(path).name
        int8 = quantize_int8(model)
        ppl = {}
        for label, m in (("fp32", model), ("int8", int8)):
            ppl[label] = evaluate(m, test, tcfg.eval_batch_size)["ppl"]
            med, p95 = latency(m, prompt, args.gen_tokens)
            rows.append((name, mcfg.arch, label, med, p95, stream_speed(m, stream_data), ppl[label], 100 * (ppl[label] / ppl["fp32"] - 1)))
            print(rows[-1], file=sys.stderr, flush=True)
        runtimes.append((name, token_runtimes(model, prompt, args.gen_tokens, stream_data)))
        print(runtimes[-1], file=sys.stderr, flush=True)
        ckpt = load_checkpoint(path)
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(int8.state_dict(), Path(tmp) / "int8.pt")
            size = {
                "fp32 safetensors": (ckpt.path / "model.safetensors").stat().st_size,
                "int8 state dict (torch.save)": (Path(tmp) / "int8.pt").stat().st_size,
            }
            for fmt, label in (("onnx", "ONNX step"), ("pt2", "torch.export step (pt2)")):
                r = export(model, fmt, Path(tmp) / f"step.{fmt}")
                size[f"fp32 {label}"] = r["path"].stat().st_size
                size[f"int8 {label}"] = r["int8_path"].stat().st_size
            steps.append((name, step_latencies(model, int8, Path(tmp), args.threads)))
            print(steps[-1], file=sys.stderr, flush=True)
        sizes.append((name, size))
        rss.append((name, [peak_rss(path, n, args) for n in args.rss_tokens]))
    rss.append(("full-context Transformer (3 x 128, KV cache of every token)", [peak_rss("full-context", n, args) for n in args.rss_tokens]))
    sweep = width_sweep(args.widths, prompt, args.gen_tokens)

    a, b = args.rss_tokens
    lines = [
        *header("Edge inference: latency, streaming, memory, int8", command, f"{describe()}; {args.threads} torch thread(s)"),
        f"Generation: greedy, {args.gen_tokens} tokens after a 20-token PTB prompt, batch 1, per-token latency = sampling + feeding the token back "
        "(every model incremental: one position per token through the layers, `crt.infer.open_stream`). "
        f"Streaming: `crt score`'s path over {len(stream_data):,} PTB test tokens (whole segments, state carried). Perplexity: PTB test, `crt eval`'s path.",
        "",
        "| checkpoint | arch | weights | latency median (ms) | latency p95 (ms) | streaming tokens/s | test ppl | ppl change vs fp32 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, arch, label, med, p95, tps, p, change in rows:
        lines.append(f"| {name} | {arch} | {label} | {med:.2f} | {p95:.2f} | {tps:,.0f} | {p:.2f} | {change:+.2f}% |")
    fp32 = {r[0]: r for r in rows if r[2] == "fp32"}
    lines += ["", "int8 latency as a share of fp32 (median): " + ", ".join(f"{r[0]} {r[3] / fp32[r[0]][3]:.2f}x" for r in rows if r[2] == "int8") + ".", ""]
    lines += [
        "Per-token generation by runtime, fp32 (same prompt and tokens; the two runtimes alternated over two rounds in one process, the better round "
        "of each kept). onnxruntime: the per-token step `crt generate` runs by default (`crt.infer.token_runtime`: the model's open_segment, step "
        "and close_segment exported with fixed-size segment caches, 1 intra-op thread, sequential, every graph optimisation), checked against the "
        "PyTorch segment path before use (max |difference| of logits and state over 3 segments; the bound is 1e-4). Export: into a fresh cache, "
        "then from the cache (checked again). Score: `crt score`'s path through the onnxruntime segment step.",
        "",
        "| checkpoint | eager median (µs) | eager p95 (µs) | onnxruntime median (µs) | onnxruntime p95 (µs) | speed-up | max \\|difference\\| "
        "| export (s) | from cache (s) | score tokens/s (onnxruntime) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in runtimes:
        if "unsupported" in r:
            lines.append(f"| {name} | | | not supported: {r['unsupported']} | | | | | | |")
            continue
        (em, ep), (om, op) = r["eager"], r["onnxruntime"]
        lines.append(
            f"| {name} | {em * 1e3:.0f} | {ep * 1e3:.0f} | {om * 1e3:.0f} | {op * 1e3:.0f} | {em / om:.1f}x | {r['max difference']:.1e} "
            f"| {r['export s']:.1f} | {r['cached s']:.1f} | {r['score tokens/s']:,.0f} |"
        )
    lines.append("")
    lines += [
        f"Peak RSS of a fresh process streaming {a:,} and {b:,} tokens (MiB; checkpoints through `crt score`'s path on PTB train):",
        "",
        f"| model | {a:,} tokens | {b:,} tokens | change |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, (x, y) in rss:
        lines.append(f"| {name} | {x:.0f} | {y:.0f} | {100 * (y / x - 1):+.1f}% |")
    lines += [
        "",
        "Per-token latency of greedy generation (median ms, same settings) for a 3-layer CRT with the PTB vocabulary and d_ff = 4 x width, random weights:",
        "",
        "| width | parameters | fp32 | int8 | int8 / fp32 |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for d, n, f, q in sweep:
        lines.append(f"| {d} | {n / 1e6:.1f}M | {f:.2f} | {q:.2f} | {q / f:.2f}x |")
    lines += [
        "",
        "One segment step (batch 1, a whole segment of tokens at once, as `crt score` and an exported program run it), median ms per runtime:",
        "",
        "| checkpoint | runtime | fp32 | int8 | int8 / fp32 |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, times in steps:
        for runtime in ("PyTorch eager", "onnxruntime", "AOTInductor"):
            f, q = times[f"{runtime}, fp32"], times[f"{runtime}, int8"]
            ratio = f"{q / f:.2f}x" if isinstance(f, float) and isinstance(q, float) else "-"
            cell = lambda v: f"{v:.2f}" if isinstance(v, float) else v  # noqa: E731
            lines.append(f"| {name} | {runtime} | {cell(f)} | {cell(q)} | {ratio} |")
    lines += ["", "Size on disk (MiB):", "", "| checkpoint | file | MiB |", "| --- | --- | ---: |"]
    for name, size in sizes:
        for k, v in size.items():
            lines.append(f"| {name} | {k} | {v / 2**20:.2f} |")
    out = Path(args.out)
    write_results(out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
