"""Run the embedded default (`crt train` with no arguments) and record it in docs/results/.

    python benchmarks/embedded_default.py            # writes docs/results/embedded-default.md

Trains the two built-in presets exactly as `crt train` does, times each, evaluates both on the
test split too, and writes the table with the command, machine, versions and date.
"""

from __future__ import annotations

import datetime
import sys
import tempfile
import time
from pathlib import Path


from crt.analysis.machine import describe
from crt.cli.main import DEFAULT_PRESETS
from crt.config import config_from_dict, load_preset
from crt.models import build_model
from crt.train.checkpoint import load_checkpoint, write_atomic
from crt.train.evaluate import evaluate
from crt.train.loop import load_corpus, train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in DEFAULT_PRESETS:
            mcfg, tcfg = load_preset(name)
            tcfg.out_dir = str(Path(tmp) / name)
            corpus = load_corpus(tcfg)
            start = time.perf_counter()
            summary = train(mcfg, tcfg, corpus=corpus, progress=False)
            seconds = time.perf_counter() - start
            ckpt = load_checkpoint(summary["run_dir"])
            model = build_model(config_from_dict(type(mcfg), ckpt.meta["model"]))
            ckpt.load_weights(model)
            test = evaluate(model, corpus.test, tcfg.eval_batch_size, answers=corpus.answers["test"])
            rows.append((name, summary, test, seconds))
    lines = [
        "# Embedded default: CRT vs the segment Transformer on the synthetic recall corpus",
        "",
        f"Command: `python benchmarks/embedded_default.py` (the same training as `crt train` with no arguments). Date: {datetime.date.today()}.",
        f"Machine: {describe()}.",
        "",
        "| preset | model | params | train steps | wall time (s) | valid ppl | valid recall | test ppl | test recall |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s, test, seconds in rows:
        lines.append(
            f"| {name} | {s['arch']} | {s['params']:,} | {s['step']} | {seconds:.0f} | {s['valid_ppl']:.3f} | {s['valid_recall']:.3f} | {test['ppl']:.3f} | {test['recall']:.3f} |"
        )
    mcfg, tcfg = load_preset(DEFAULT_PRESETS[0])
    lines += [
        "",
        f"Chance recall is 1/{tcfg.synth_values} = {1 / tcfg.synth_values:.3f}. Corpus: {tcfg.synth_pairs} key-value pairs per document, "
        f"{tcfg.synth_filler} filler tokens, segments of {mcfg.segment_len} tokens; presets in `src/crt/configs/`.",
    ]
    out = ROOT / "docs" / "results" / "embedded-default.md"
    write_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
