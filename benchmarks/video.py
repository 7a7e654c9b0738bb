"""MSR Action3D cross-subject: CR-ViT against a segment-limited and an all-frames transformer.

    python benchmarks/video.py --data-dir ../shared/data/video    # writes docs/results/video.md

Trains each preset (msr-crvit, msr-transformer-segment, msr-transformer-all by default) exactly
as `crt train --preset NAME --data-dir DIR` trains it, times it, scores the test subjects (top-1
and mean per-class accuracy, the state carried over every segment of a clip), saves each
confusion matrix as a PNG beside the results, and writes the table with the command, machine,
versions and date. Nothing is selected on the test subjects: the last checkpoint is scored.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

from crt.analysis.results import header, write_results
from crt.checkpoint import load_model
from crt.config import apply_overrides, load_preset
from crt.data.load import load_video_data
from crt.train.loop import train
from crt.train.video import evaluate_clips, plot_confusion

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("msr-crvit", "msr-transformer-segment", "msr-transformer-all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=str(ROOT.parent / "shared" / "data" / "video"), help="MSR Action3D: the archive, its folder or the unpacked files"
    )
    parser.add_argument("--preset", action="append", help="preset to train; repeat for several (default: the three msr-* presets)")
    parser.add_argument("--max-steps", type=int, help="override every preset's training steps (a quicker, shorter run)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "video.md"), help="Markdown file to write (confusion PNGs go beside it)")
    args = parser.parse_args()
    presets = args.preset or list(PRESETS)
    command = "python benchmarks/video.py" + "".join(f" {a}" for a in sys.argv[1:])
    out = Path(args.out)
    rows, skipped, ckpt_frame = [], set(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in presets:
            mcfg, tcfg = load_preset(name)
            overrides = {"out_dir": str(Path(tmp) / name), "data_dir": args.data_dir}
            if args.max_steps:
                overrides["max_steps"] = args.max_steps
            mcfg, tcfg = apply_overrides(mcfg, tcfg, overrides)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                data = load_video_data(tcfg, mcfg.segment_len)  # with the preset's options, as crt train loads it
            skipped |= {str(w.message) for w in caught}
            start = time.perf_counter()
            summary = train(mcfg, tcfg, corpus=data, progress=False)
            seconds = time.perf_counter() - start
            model, ckpt = load_model(summary["run_dir"], "cpu")
            ckpt_frame[name] = ckpt.meta["model"]["frame_shape"]  # joints x (3 positions, or 6 with velocities)
            test = evaluate_clips(model, data.test, len(data.classes), tcfg.eval_batch_size, tcfg.video_max_frames)
            png = out.with_name(f"video-confusion-{name}.png")
            plot_confusion(test["confusion"], data.classes, png, title=f"{name}: MSR Action3D test subjects")
            rows.append((name, mcfg, tcfg, summary, test, seconds, png))
            print(f"{name}: top-1 {test['acc']:.3f}, mean per-class {test['mean_class_acc']:.3f}, {seconds:.0f} s", file=sys.stderr, flush=True)
    lines = [
        *header("MSR Action3D cross-subject: CR-ViT vs transformer baselines", command),
        "Each preset trained as `crt train --preset NAME --data-dir DIR` trains it.",
        f"Data: {len(data.train)} training clips (odd subjects), {len(data.test)} test clips (even subjects), 20 classes. {'; '.join(sorted(skipped))}.",
        "",
        "| preset | model | frame | segment (frames) | params | steps | wall time (s) | test top-1 | test mean per-class | confusion |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, mcfg, tcfg, s, test, seconds, png in rows:
        lines.append(
            f"| {name} | {mcfg.arch} | {ckpt_frame[name]} | {mcfg.segment_len} | {s['params']:,} | {s['step']} | {seconds:.0f} | {test['acc']:.3f} | {test['mean_class_acc']:.3f} | [{png.name}]({png.name}) |"
        )
    lines += [
        "",
        (
            "Every clip is subsampled to at most 64 evenly spaced frames and run in segments with the state carried; "
            "the score is that of the last checkpoint (no model selection on the test subjects, which are MSR Action3D's only held-out split). "
            "Presets in `src/crt/configs/`."
        ),
    ]
    write_results(out, lines)
    print("\n".join(lines))
    print(f"\nwritten to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
