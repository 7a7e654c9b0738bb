"""Run the embedded default (`crt train` with no arguments) and record it in docs/results/.

    python benchmarks/embedded_default.py            # writes docs/results/embedded-default.md
    python benchmarks/embedded_default.py --preset synthetic-rmt --preset synthetic-armt --out docs/results/synthetic-rmt-armt.md

Trains the two built-in presets (or the --preset ones) exactly as `crt train` does, times each, evaluates both on the
test split too, and writes the table with the command, machine, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path


from crt.analysis.machine import describe
from crt.cli.main import DEFAULT_PRESETS
from crt.config import apply_overrides, config_from_dict, load_preset, load_stages
from crt.models import build_model
from crt.train.checkpoint import load_checkpoint, write_atomic
from crt.train.evaluate import evaluate
from crt.train.loop import load_corpus, train_stages

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="synthetic preset to train; repeat for several (default: the two of `crt train`)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "embedded-default.md"), help="Markdown file to write")
    args = parser.parse_args()
    presets = args.preset or list(DEFAULT_PRESETS)
    command = "python benchmarks/embedded_default.py" + "".join(f" {a}" for a in sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in presets:
            mcfg, tcfg = load_preset(name)
            tcfg.out_dir = str(Path(tmp) / name)
            start = time.perf_counter()
            summary = train_stages(mcfg, tcfg, load_stages(name), progress=False)
            seconds = time.perf_counter() - start
            ckpt = load_checkpoint(summary["run_dir"])
            model = build_model(config_from_dict(type(mcfg), ckpt.meta["model"]))
            ckpt.load_weights(model)
            final = config_from_dict(type(tcfg), ckpt.meta["train"])  # the last stage's training config
            corpus = load_corpus(final)
            test = evaluate(model, corpus.test, tcfg.eval_batch_size, answers=corpus.answers["test"])
            rows.append((name, summary, test, seconds))
    lines = [
        "# Embedded default: CRT vs the segment Transformer on the synthetic recall corpus" if presets == list(DEFAULT_PRESETS) else "# The synthetic recall corpus: " + ", ".join(presets),
        "",
        f"Command: `{command}` (each preset trained as `crt train --preset NAME` trains it). Date: {datetime.date.today()}.",
        f"Machine: {describe()}.",
        "",
        "| preset | model | params | train steps | wall time (s) | valid ppl | valid recall | test ppl | test recall |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s, test, seconds in rows:
        lines.append(
            f"| {name} | {s['arch']} | {s['params']:,} | {s['step']} | {seconds:.0f} | {s['valid_ppl']:.3f} | {s['valid_recall']:.3f} | {test['ppl']:.3f} | {test['recall']:.3f} |"
        )
    mcfg, tcfg = load_preset(presets[0])
    plan = f"steps 1-{tcfg.max_steps}: filler {tcfg.synth_filler}, K = {tcfg.bptt_segments}"
    for stage in load_stages(presets[0]):
        first = tcfg.max_steps + 1
        _, tcfg = apply_overrides(mcfg, tcfg, stage)
        plan += f"; steps {first}-{tcfg.max_steps}: filler {tcfg.synth_filler}, K = {tcfg.bptt_segments}"
    lines += [
        "",
        f"Chance recall is 1/{tcfg.synth_values} = {1 / tcfg.synth_values:.3f}. Corpus: {tcfg.synth_pairs} key-value pairs per document, "
        f"{tcfg.synth_filler} filler tokens, segments of {mcfg.segment_len} tokens (ppl and recall on this corpus); presets in `src/crt/configs/`.",
        f"Training ({presets[0]}'s plan; every preset of this table has the same): {plan}.",
    ]
    out = Path(args.out)
    write_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
