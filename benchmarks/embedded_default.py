"""Run the embedded default (`crt train` with no arguments) over seeds and thread counts, and record it.

    python benchmarks/embedded_default.py --seeds 0-4 --threads 1,2          # docs/results/embedded-default.md
    python benchmarks/embedded_default.py --preset synthetic-crt --preset synthetic-rmt --preset synthetic-armt \\
        --preset synthetic-xl --seeds 0-2 --threads 2 --out docs/results/synthetic-memory.md

Each (seed, threads) case trains the presets (default: the two of `crt train`) exactly as
`crt train --preset NAME --seed S` trains them, with torch limited to that many threads, one case
after another (never two at once: they would share the cores). Recall is scored on the last
stage's valid and test documents. The file gets every run, a summary per preset, the command,
machine, versions and date.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from crt.analysis.results import header, write_results
from crt.cli.main import DEFAULT_PRESETS
from crt.config import apply_overrides, load_curriculum, load_preset, parse_assignment, without_fields
from crt.train.loop import train
from crt.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def int_list(text: str) -> list[int]:
    """'0-4' or '1,2' or '0-2,5' -> a list of ints."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def stage_steps(run_dir: str) -> list[int]:
    """The step at which each stage after the first began, from the run's metrics."""
    return [r["step"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["split"] == "stage"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="synthetic preset to train; repeat for several (default: the two of `crt train`)")
    parser.add_argument("--seeds", type=int_list, default=[0], help="seeds, e.g. 0-4 (default 0)")
    parser.add_argument("--threads", type=int_list, default=[torch.get_num_threads()], help="torch thread counts, e.g. 1,2 (default: torch's)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field in every preset, in every stage (repeatable)"
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "embedded-default.md"), help="Markdown file to write")
    args = parser.parse_args()
    presets = args.preset or list(DEFAULT_PRESETS)
    command = "python benchmarks/embedded_default.py" + "".join(f" {a}" for a in sys.argv[1:])
    overrides = dict(parse_assignment(item) for item in args.set)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for seed in args.seeds:
                for name in presets:
                    mcfg, tcfg = apply_overrides(*load_preset(name), overrides)
                    tcfg.seed, tcfg.out_dir = seed, str(Path(tmp) / f"{name}-s{seed}-t{threads}")
                    start = time.perf_counter()
                    s = train(mcfg, tcfg, without_fields(load_curriculum(name), set(overrides)), progress=False)
                    seconds = time.perf_counter() - start
                    runs.append({"preset": name, "seed": seed, "threads": threads, "seconds": seconds, "starts": stage_steps(s["run_dir"]), **s})
                    c = s["curriculum"]
                    print(
                        f"{name} seed {seed} threads {threads}: {s['step']} steps, {seconds:.0f} s, "
                        f"{'passed' if c['passed'] else 'failed at'} {c['reached']}/{c['stages']}, test recall {s['test_recall']:.3f}",
                        flush=True,
                    )
    torch.set_num_threads(max(args.threads))
    mcfg, tcfg = load_preset(presets[0])
    chance = 1 / tcfg.synth_values
    title = (
        "Embedded default: CRT vs the segment Transformer on the synthetic recall corpus"
        if presets == list(DEFAULT_PRESETS)
        else "The synthetic recall corpus: " + ", ".join(presets)
    )
    lines = [
        *header(title + "".join(f", {item}" for item in args.set), command),
        "Each preset trained as `crt train --preset NAME --seed S` trains it, torch limited to the thread count.",
        "",
        "| preset | model | seed | threads | params | steps | stages began at step | curriculum | wall time (s) | valid recall | test recall |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for r in runs:
        c = r["curriculum"]
        lines.append(
            f"| {r['preset']} | {r['arch']} | {r['seed']} | {r['threads']} | {r['params']:,} | {r['step']} | {', '.join(map(str, r['starts'])) or '-'} | "
            f"{'passed' if c['passed'] else 'failed at'} {c['reached']}/{c['stages']} | {r['seconds']:.0f} | "
            f"{r['valid_recall']:.3f} of {r['valid_answers']:,} | {r['test_recall']:.3f} of {r['test_answers']:,} |"
        )
    lines += [
        "",
        "Per preset, over its runs (test recall on the last stage's data, min / median / max):",
        "",
        "| preset | runs | passed the curriculum | test recall | within 0.05 of chance | wall time (s), median (max) |",
        "| --- | ---: | ---: | --- | ---: | --- |",
    ]
    for name in presets:
        mine = [r for r in runs if r["preset"] == name]
        rec = [r["test_recall"] for r in mine]
        secs = [r["seconds"] for r in mine]
        lines.append(
            f"| {name} | {len(mine)} | {sum(r['curriculum']['passed'] for r in mine)} | {min(rec):.3f} / {statistics.median(rec):.3f} / {max(rec):.3f} | "
            f"{sum(abs(x - chance) <= 0.05 for x in rec)} | {statistics.median(secs):.0f} ({max(secs):.0f}) |"
        )
    verdicts = []
    for name in presets:
        mine = [r for r in runs if r["preset"] == name]
        passed = [r for r in mine if r["curriculum"]["passed"]]
        if passed:
            steps = statistics.median(r["step"] for r in passed)
            verdicts.append(
                f"{name} passed in {len(passed)} of {len(mine)} runs (median {steps:.0f} steps, {statistics.median(r['seconds'] for r in passed):.0f} s, when it passed)"
            )
        else:
            furthest = max(r["curriculum"]["reached"] for r in mine)
            verdicts.append(f"{name} passed in none of {len(mine)} runs (furthest: stage {furthest})")
    lines += ["", "Which models learn it: " + "; ".join(verdicts) + "."]
    if presets == list(DEFAULT_PRESETS):
        totals = [sum(r["seconds"] for r in runs if (r["seed"], r["threads"]) == (seed, t)) for t in args.threads for seed in args.seeds]
        lines += [
            "",
            f"The whole job (`crt train`: both presets, one seed and thread count): median {statistics.median(totals):.0f} s, longest {max(totals):.0f} s.",
        ]
    stages = load_curriculum(presets[0])
    plan = "; ".join(f"stage {i} ({s.label}): up to {s.steps} steps" + (f", until valid {s.advance}" if s.advance else "") for i, s in enumerate(stages, 1))
    lines += [
        "",
        f"Chance recall is 1/{tcfg.synth_values} = {chance:.4f}. Corpus: {tcfg.synth_pairs} key-value pairs per document, segments of "
        f"{mcfg.segment_len} tokens, document protocol (a fresh state and an aligned grid per document), loss on the answers. "
        f"Curriculum ({presets[0]}'s, shared by every preset of this table): {plan}. Presets in `src/crt/configs/`.",
    ]
    out = Path(args.out)
    write_results(out, lines)
    print("\n".join(lines))
    print(f"\nwritten to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
