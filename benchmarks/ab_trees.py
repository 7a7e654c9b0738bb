"""Speed of two source trees side by side: `crt bench`'s training and streaming rates, and the
token-by-token stream, measured in alternation so that machine drift hits both.

    git worktree add /tmp/before <commit>            # the tree before a change
    python benchmarks/ab_trees.py --before /tmp/before --after . --out docs/results/refactor-ab.md

Each (tree, preset) measurement runs in a fresh process whose `crt` is imported from that
tree's src/; round r measures every preset in tree A then tree B, round r + 1 in B then A.
Reported: medians over all timed groups of all rounds, and after/before ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs inside the child, with the tree's src/ first on sys.path: crt bench's case, then the stream.
CHILD = r"""
import json, sys, time, statistics, torch
from crt.analysis import bench
from crt.infer import open_stream
from crt.models import build_model
from crt.config import ModelConfig
args = json.loads(sys.argv[1])
case = bench.make_cases([args["preset"]], ["fp32"], False, False, "cpu", args["threads"], args["steps"], args["repeats"], 1, args["infer_tokens"], None, {})[0]
r = bench.run_case(case)
torch.manual_seed(0)
model = build_model(ModelConfig(**case["model"])).eval()
stream, tokens = open_stream(model, 1), torch.randint(case["model"]["vocab_size"], (args["stream_tokens"],))
rates = []
for _ in range(args["repeats"] + 1):
    t0 = time.perf_counter()
    for t in tokens:
        stream.feed(t.view(1))
    rates.append(len(tokens) / (time.perf_counter() - t0))
print(json.dumps({"train": r["train_runs"], "infer": r["infer_runs"], "stream": rates[1:]}))
"""


def commit_of(tree: Path) -> str:
    """The tree's git commit (and "+ changes" when its files differ from it), or "not a git checkout"."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        return "not a git checkout"
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def measure(tree: Path, preset: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": str(args.threads)}
    spec = json.dumps(
        {
            "preset": preset,
            "threads": args.threads,
            "steps": args.steps,
            "repeats": args.repeats,
            "infer_tokens": args.infer_tokens,
            "stream_tokens": args.stream_tokens,
        }
    )
    out = subprocess.run([sys.executable, "-c", CHILD, spec], env=env, capture_output=True, text=True, cwd="/")
    if out.returncode:
        sys.exit(f"{tree} {preset} failed:\n{out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="source tree before the change (a checkout with src/crt)")
    parser.add_argument("--after", type=Path, default=ROOT, help="source tree after it (default: this checkout)")
    parser.add_argument("--presets", nargs="+", default=["ptb-crt-35", "ptb-transformer-70", "ptb-xl-35", "ptb-rmt-35", "ptb-armt-35"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--infer-tokens", type=int, default=4096)
    parser.add_argument("--stream-tokens", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "refactor-ab.md")
    args = parser.parse_args()
    for tree in (args.before, args.after):
        if not (tree / "src" / "crt").is_dir():
            parser.error(f"{tree} has no src/crt: give the root of a crt checkout")
    sys.path.insert(0, str(ROOT / "src"))
    from crt.analysis.machine import describe
    from crt.analysis.results import header, write_results

    runs = {(t, p): {"train": [], "infer": [], "stream": []} for t in ("before", "after") for p in args.presets}
    rounds = {key: {k: [] for k in value} for key, value in runs.items()}  # each round's median: the spread within one tree
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for preset in args.presets:
            for name in order:
                got = measure(getattr(args, name), preset, args)
                for k, v in got.items():
                    runs[(name, preset)][k] += v
                    rounds[(name, preset)][k].append(statistics.median(v))
                print(
                    f"round {r + 1}/{args.rounds} {name:6} {preset}: " + ", ".join(f"{k} {statistics.median(v):,.0f} tok/s" for k, v in got.items()),
                    file=sys.stderr,
                    flush=True,
                )
    lines = header(
        "Two source trees side by side: training, segment streaming and token streaming rates",
        machine=f"{describe()}; {args.threads} torch threads per measurement",
    )
    lines += [
        f"Before: `{args.before}` (commit {commit_of(args.before)}); after: `{args.after}` (commit {commit_of(args.after)}). {args.rounds} rounds, each preset measured in both trees per round (the order alternating), "
        f"each measurement a fresh process. Train and segment-infer: `crt bench`'s case (fp32, the preset's batch and K, {args.repeats} groups of "
        f"{args.steps} steps; {args.infer_tokens:,} tokens streamed a segment per call, batch 1). Token stream: `crt.infer.open_stream`, "
        f"{args.stream_tokens} tokens fed one at a time, batch 1. Medians over all groups of all rounds, in tokens/s.",
        "",
        "| preset | train before | train after | after / before | segment infer before | after | after / before | token stream before | after | after / before |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in args.presets:
        cells = []
        for k in ("train", "infer", "stream"):
            b, a = statistics.median(runs[("before", p)][k]), statistics.median(runs[("after", p)][k])
            cells += [f"{b:,.0f}", f"{a:,.0f}", f"{a / b:.2f}x"]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The spread within one tree: the lowest and highest of its per-round medians (tokens/s). A ratio above is noise unless it exceeds these.",
        "",
        "| preset | tree | train | segment infer | token stream |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in args.presets:
        for name in ("before", "after"):
            r = rounds[(name, p)]
            lines.append(f"| {p} | {name} | " + " | ".join(f"{min(r[k]):,.0f}-{max(r[k]):,.0f}" for k in ("train", "infer", "stream")) + " |")
    write_results(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
