"""Bits per byte of one CRT preset on one text with three tokenizers: BPE, bytes, characters.

Bits per byte (total NLL / ln 2 / UTF-8 bytes of the scored text) compares tokenizers, which
perplexity cannot: each row trains `text-crt-bpe` (3 layers, width 128, 64-token segments) with
the same steps and tokens per step, only --tokenizer (and the vocabulary it gives) changing, then
scores the whole test split with the state carried. One seed, a short budget: not converged.

    python benchmarks/text.py --text ../shared/data/wikitext-2/wiki.train.tokens --bytes 1100000

--text is cut to its first whole lines of at most --bytes bytes, written to a temporary file
(no data is kept in the repository), so the row's text is exactly named by the command.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ("bpe", "byte", "char")


def text_slice(path: Path, limit: int) -> bytes:
    """The first whole lines of `path` that fit in `limit` bytes."""
    data = path.read_bytes()[:limit]
    return data[: data.rfind(b"\n") + 1]


def run_row(tokenizer: str, text_file: Path, args: argparse.Namespace) -> dict:
    from crt.checkpoint import load_model
    from crt.config import apply_overrides, load_preset
    from crt.data.load import load_corpus
    from crt.data.tokenizer import from_meta
    from crt.runtime import resolve_precision
    from crt.train.evaluate import evaluate
    from crt.train.loop import train

    mcfg, tcfg = load_preset("text-crt-bpe")
    mcfg, tcfg = apply_overrides(
        mcfg, tcfg, {"data_dir": str(text_file), "tokenizer": tokenizer, "max_steps": args.steps, "out_dir": str(Path(args.runs_dir) / tokenizer)}
    )
    tcfg.eval_every = 0  # validate once at the end
    start = time.perf_counter()
    summary = train(mcfg, tcfg, progress=False)
    wall = time.perf_counter() - start
    model, ckpt = load_model(summary["run_dir"], "cpu")
    corpus = load_corpus(tcfg, model.cfg.segment_len, saved=from_meta(ckpt.meta))
    valid, test = (
        evaluate(model, split, tcfg.eval_batch_size, precision=tcfg.precision, token_bytes=corpus.token_bytes) for split in (corpus.valid, corpus.test)
    )
    train_bytes = int(corpus.token_bytes[corpus.train].sum())
    return {
        "tokenizer": tokenizer,
        "vocab": model.cfg.vocab_size,
        "params": summary["params"],
        "steps": summary["step"],
        "tokens_seen": summary["tokens_seen"],
        "bytes_per_token": train_bytes / corpus.train.numel(),
        "train_tokens": corpus.train.numel(),
        "wall_s": wall,
        "valid_bpb": valid["bpb"],
        "test_bpb": test["bpb"],
        "test_bytes": test["bytes"],
        "precision": resolve_precision(tcfg.precision, next(model.parameters()).device),
    }


def report(rows: list[dict], args: argparse.Namespace, text: bytes) -> list[str]:
    from crt.analysis.results import header

    lines = header("Any text: bits per byte with BPE, byte and character tokens")
    lines += [
        f"Text: the first {len(text):,} bytes (whole lines) of `{args.text}` (SHA-256 {hashlib.sha256(text).hexdigest()[:16]}...), "
        "split 90/5/5 contiguously by characters (`--data text`). Preset `text-crt-bpe` (CRT, 3 layers, width 128, 64-token segments, "
        f"batch 16 x 2 segments = 2,048 tokens per step), {args.steps} steps per row, one seed, precision {rows[0]['precision']}; only `--tokenizer` changes. "
        "BPE: 2,048 tokens trained on the train split only. **Not converged**: a short equal-step budget, so a tokenizer that packs more "
        "bytes into a token has also seen more text.",
        "",
        "bpb = total NLL / ln 2 / UTF-8 bytes of the scored tokens, over the whole split with the state carried. "
        "train min is wall time (BPE training, data, steps and the end-of-run validation) and measures no speed: the 2 cores may be shared.",
        "",
        "| tokenizer | vocab | params | steps | tokens seen | bytes/token | ~bytes seen | train min | valid bpb | test bpb |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokenizer']} | {r['vocab']:,} | {r['params']:,} | {r['steps']} | {r['tokens_seen']:,} | {r['bytes_per_token']:.2f} | "
            f"{r['tokens_seen'] * r['bytes_per_token']:,.0f} | {r['wall_s'] / 60:.1f} | {r['valid_bpb']:.4f} | {r['test_bpb']:.4f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, type=Path, help="a UTF-8 text file; its first --bytes bytes (whole lines) are the corpus")
    parser.add_argument("--bytes", type=int, default=1_100_000, help="bytes of --text to use (default 1,100,000)")
    parser.add_argument("--steps", type=int, default=600, help="training steps per tokenizer (default 600, the preset's)")
    parser.add_argument("--runs-dir", default="runs/text-bench")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "text.md"))
    args = parser.parse_args()

    from crt.analysis.results import write_results

    text = text_slice(args.text, args.bytes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "text.txt"
        text_file.write_bytes(text)
        for tokenizer in TOKENIZERS:  # one at a time: nothing else runs beside a row
            print(f"== {tokenizer}", flush=True)
            rows.append(run_row(tokenizer, text_file, args))
    lines = report(rows, args, text)
    write_results(args.out, lines)
    print("\n".join(lines))
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
