"""`crt`: train, evaluate and fetch data from the command line.

Every user error ends in one line on stderr and exit status 2, never a traceback; exit 1 means
the job ran and did not succeed (a curriculum not completed, a benchmark case that failed).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from crt.config import (
    MODEL_FIELDS,
    TRAIN_FIELDS,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    field_help,
    load_curriculum,
    load_preset,
    preset_names,
    stages_from_list,
)
from crt.errors import CRTError

DEFAULT_PRESETS = ("synthetic-crt", "synthetic-transformer")
EVAL_FIELDS = (
    "data_dir",
    "mqar_gap",
    "passkey_distance",
    "facts_length",
    "video_max_frames",
    "map_unk",
    "protocol",
    "eval_batch_size",
    "eval_segment_len",
    "eval_mem_len",
    "eval_stride",
    "eval_max_tokens",
    "precision",
    "device",
)
RUNTIME_HELP = (
    "auto (default): the onnxruntime {graph} where onnxruntime is installed and the model supported (exported on the fly and cached, "
    "checked against PyTorch), else PyTorch, saying why; onnxruntime: that or an error; torch: PyTorch eager. The choice is printed on stderr"
)
EXPORT_MAX_BATCH, EXPORT_MAX_CHECK = 4096, 1000  # bounds of `crt export`: beyond them the check alone would take gigabytes
_PY_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _add_field_flags(parser: argparse.ArgumentParser, names: list[str], title: str) -> None:
    group = parser.add_argument_group(title)
    explained = field_help()
    for name in names:
        f = MODEL_FIELDS.get(name) or TRAIN_FIELDS[name]
        typ = _PY_TYPES[f.type] if isinstance(f.type, str) else f.type
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=f"{explained.get(name, '')} (default {f.default})")
        else:
            group.add_argument(flag, dest=name, type=typ, default=None, metavar=typ.__name__.upper(), help=f"{explained.get(name, '')} (default {f.default!r})")


def _overrides(args: argparse.Namespace, names) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _fmt(x: float, spec: str) -> str:
    return "n/a" if isinstance(x, float) and math.isnan(x) else format(x, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    video = "valid_acc" in rows[0]
    if video:
        columns = [("valid acc", lambda r: _fmt(r["valid_acc"], ".3f")), ("mean class acc", lambda r: _fmt(r["valid_mean_class_acc"], ".3f"))]
    elif any("test_recall" in r for r in rows):  # a memory task: recall with its number of answers, on the last stage's data
        columns = [(f"{s} recall", lambda r, s=s: f"{_fmt(r[f'{s}_recall'], '.3f')} of {r[f'{s}_answers']:,}") for s in ("valid", "test")]
    else:
        columns = [("valid ppl", lambda r: _fmt(r["valid_ppl"], ".3f"))]
    if any(r["curriculum"]["stages"] > 1 for r in rows):
        columns += [
            ("curriculum", lambda r: ("passed" if r["curriculum"]["passed"] else "failed at") + f" {r['curriculum']['reached']}/{r['curriculum']['stages']}")
        ]
    widths = [max(len(name), *(len(cell(r)) for r in rows)) + 2 for name, cell in columns]
    header = f"{'model':<14}{'params':>10}{'steps':>7}" + "".join(f"{name:>{w}}" for (name, _), w in zip(columns, widths)) + "  run"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['arch']:<14}{r['params']:>10,}{r['step']:>7}" + "".join(f"{cell(r):>{w}}" for (_, cell), w in zip(columns, widths)) + f"  {r['run_dir']}")


def cmd_train(args: argparse.Namespace) -> None:
    from crt.checkpoint import load_checkpoint
    from crt.train.loop import train

    overrides = _overrides(args, list(MODEL_FIELDS) + list(TRAIN_FIELDS))
    pinned = set(overrides) & set(TRAIN_FIELDS)
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if args.stages is not None:
            raise CRTError(f"--{'' if args.stages else 'no-'}stages with --resume: a resumed run keeps the curriculum it was trained with; drop the flag")
        changed = sorted(k for k in overrides if k in MODEL_FIELDS)
        if changed:
            raise CRTError(f"cannot change model fields {changed} when resuming: start a new run instead")
        mcfg = config_from_dict(ModelConfig, ckpt.meta["model"])
        _, tcfg = apply_overrides(mcfg, ckpt.train_config(in_stage=False), overrides)
        _warn_unused([(mcfg, tcfg)], overrides)
        stages = _pin(stages_from_list(ckpt.meta.get("stages", [])), pinned)
        corpus = None
        if tcfg.task == "lm" and ckpt.meta.get("stage", 0) == 0:  # encoded with the run's saved tokenizer, not a new one
            from crt.data.load import load_corpus
            from crt.data.tokenizer import from_meta

            corpus = load_corpus(tcfg, mcfg.segment_len, saved=from_meta(ckpt.meta))
        summary = train(mcfg, tcfg, stages, resume=ckpt, corpus=corpus, progress=not args.no_progress)
        print_table([summary])
        if not summary["curriculum"]["passed"]:
            raise TrainingFailed
        return
    if not args.preset:
        changed = [f for f in ("arch", "task") if f in overrides] + (["data"] if overrides.get("data", "synthetic") != "synthetic" else [])
        if changed:
            flags = " and ".join(f"--{f}" for f in changed)
            raise CRTError(
                f"{flags} without --preset: the default job trains {' and '.join(DEFAULT_PRESETS)} on the built-in recall task; "
                f"give a preset to start from (e.g. --preset ptb-crt-35, see `crt train --help`) or a .toml of your own"
            )
    presets = [args.preset] if args.preset else list(DEFAULT_PRESETS)
    jobs = [(name, *apply_overrides(*load_preset(name), overrides)) for name in presets]
    for _, m, t in jobs:
        m.validate(), t.validate()
    _warn_unused([(m, t) for _, m, t in jobs], overrides)
    rows = []
    for name, mcfg, tcfg in jobs:
        print(f"== training {mcfg.arch} ({name}) -> {tcfg.out_dir}", flush=True)
        stages = _pin(load_curriculum(name), pinned) if args.stages is not False else []
        rows.append(train(mcfg, tcfg, stages, progress=not args.no_progress))
    print()
    print_table(rows)
    # The default job compares a memory model with a baseline that cannot pass the curriculum by
    # design; it fails when the memory model does. A chosen preset fails when it does.
    judged = rows[:1] if not args.preset else rows
    if not args.preset:
        print(
            f"\nThe {rows[-1]['arch']} baseline has no memory across segments, so its curriculum failing is the expected result; "
            f"the job passes when {rows[0]['arch']} passes."
        )
    if not all(r["curriculum"]["passed"] for r in judged):
        raise TrainingFailed


def _warn_unused(jobs, overrides: dict[str, Any]) -> None:
    """Say which explicit flags no model of the job reads (a flag that does nothing is a mistake)."""
    from crt.config import unused_fields

    unused = None
    for mcfg, tcfg in jobs:
        these = unused_fields(mcfg, tcfg, overrides)
        unused = these if unused is None else [w for w in unused if w.split()[0] in {x.split()[0] for x in these}]
    for warning in unused or []:
        print(f"crt: warning: {warning}", file=sys.stderr, flush=True)


class TrainingFailed(Exception):
    """A job ran but did not succeed: a curriculum not completed, a benchmark case failed (the reason is already printed): exit 1."""


def _pin(stages, pinned: set[str]):
    """The stages without the fields the user set explicitly, saying which stage values they replace."""
    from crt.config import without_fields

    for field in sorted(pinned):
        if any(field in s.changes for s in stages):
            print(f"crt: --{field.replace('_', '-')} given: it holds in every stage, in place of the preset's stage values", file=sys.stderr, flush=True)
    return without_fields(stages, pinned)


def cmd_eval(args: argparse.Namespace) -> None:
    from crt.checkpoint import load_checkpoint, load_model
    from crt.data.load import load_corpus
    from crt.data.tokenizer import from_meta
    from crt.runtime import describe_precision, resolve_device, resolve_precision
    from crt.train.distributed import join, launched
    from crt.train.scoring import split_scorer

    ckpt = load_checkpoint(args.checkpoint)
    overrides = _overrides(args, EVAL_FIELDS)
    mcfg, tcfg = apply_overrides(config_from_dict(ModelConfig, ckpt.meta["model"]), ckpt.train_config(), overrides)
    tcfg.validate()
    mcfg.validate()
    _warn_unused([(mcfg, tcfg)], overrides)
    if tcfg.task == "video":
        if args.int8:
            raise CRTError("--int8 scores language models only; drop it for a video checkpoint")
        if launched():
            raise CRTError("crt eval of a video classifier runs in one process (each clip is scored whole): run it without torchrun")
        return _eval_video(ckpt, mcfg, tcfg, args)
    if args.confusion:
        raise CRTError("--confusion is for video classifiers: a language model has no confusion matrix; drop it")
    saved = from_meta(ckpt.meta)
    corpus = load_corpus(tcfg, mcfg.segment_len, saved=saved)
    vocab = saved.vocab
    if vocab.itos != corpus.vocab.itos:
        raise CRTError(
            f"checkpoint vocabulary ({len(vocab)} types) differs from that of {tcfg.data} {tcfg.data_dir} ({len(corpus.vocab)} types): evaluate on the corpus the model was trained on"
        )
    join(resolve_device(tcfg.device))  # under torchrun: each process scores its share of the split
    model, _ = load_model(ckpt, tcfg.device, mcfg)
    score, mode = split_scorer(corpus, args.split, mcfg, tcfg, cap_given="eval_max_tokens" in overrides)
    result = score(model, tcfg.precision)
    print(f"{mcfg.arch} {ckpt.path} on {corpus.name} {args.split}: {mode}; {describe_precision(tcfg.precision, next(model.parameters()).device)}")
    recall = f"  recall {result['recall']:.3f} of {result['answers']:,} answers" if not math.isnan(result["recall"]) else ""
    bpb = f"  bpb {result['bpb']:.4f} over {result['bytes']:,} bytes" if not math.isnan(result["bpb"]) else ""
    print(f"loss {result['loss']:.4f}  ppl {result['ppl']:.3f}  tokens {result['tokens']:,}" + bpb + recall)
    if args.int8:
        from crt.infer.quantize import quantize_int8

        q = score(quantize_int8(model), "fp32")
        print(
            f"int8 (dynamic, CPU): loss {q['loss']:.4f}  ppl {q['ppl']:.3f}  ({100 * (q['ppl'] / result['ppl'] - 1):+.2f}% vs {resolve_precision(tcfg.precision, next(model.parameters()).device)})"
        )
    unk = corpus.unk_mapped.get(args.split)
    if unk:
        print(f"{unk:,} {args.split} tokens unseen in train were mapped to <unk>")


def _eval_video(ckpt, mcfg: ModelConfig, tcfg: TrainConfig, args: argparse.Namespace) -> None:
    from crt.checkpoint import load_model
    from crt.data.load import load_video_data
    from crt.train.video import evaluate_clips, plot_confusion

    data = load_video_data(tcfg, mcfg.segment_len)
    if data.classes != ckpt.meta.get("classes"):
        raise CRTError(f"checkpoint classes differ from those of {tcfg.data} {tcfg.data_dir}: evaluate on the data the model was trained on")
    model, _ = load_model(ckpt, tcfg.device, mcfg)
    r = evaluate_clips(model, getattr(data, args.split), len(data.classes), tcfg.eval_batch_size, tcfg.video_max_frames, tcfg.precision)
    out = Path(args.confusion) if args.confusion else ckpt.path.parent.parent / f"confusion-{args.split}.png"
    plot_confusion(r["confusion"], data.classes, out, title=f"{mcfg.arch} on {data.name} {args.split}")
    print(f"{mcfg.arch} {ckpt.path} on {data.name} {args.split} ({r['clips']} clips, segments of {mcfg.eval_segment} frames, state carried)")
    print(f"loss {r['loss']:.4f}  top-1 acc {r['acc']:.4f}  mean per-class acc {r['mean_class_acc']:.4f}")
    print(f"confusion matrix: {out}")


def cmd_generate(args: argparse.Namespace) -> None:
    from crt.infer import generate, load_language_model, open_stream

    if not 0 <= args.seed < 2**63:
        raise CRTError(f"--seed {args.seed}: give a seed in 0 .. 2**63 - 1")
    if args.max_new_tokens < 0 or not (math.isfinite(args.temperature) and args.temperature >= 0) or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise CRTError("need --max-new-tokens >= 0, --temperature >= 0 (0: greedy), --top-k >= 0 (0: all) and 0 < --top-p <= 1")
    model, tokenizer, mcfg, tcfg = load_language_model(args.checkpoint, args.device)
    prompt = tokenizer.prompt(args.prompt)
    stream = open_stream(model, 1, args.runtime)
    print(f"runtime: {stream.runtime}", file=sys.stderr)
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, stream=stream)
    # decoded together: a character whose bytes straddle the prompt's end comes out whole
    print(tokenizer.decode(prompt + out if args.prompt else out))


def cmd_score(args: argparse.Namespace) -> None:
    from crt.analysis.machine import peak_rss_mib
    from crt.infer import load_language_model, open_segments, score_stream
    from crt.infer.text import read_lines, text_ids

    if args.report_every < 0:
        raise CRTError(f"--report-every {args.report_every}: give a number of tokens >= 0 (0: at the end only)")
    if args.file != "-" and not Path(args.file).is_file():
        raise CRTError(f"{args.file} is not a file: give a text file to score, or - for stdin")
    model, tokenizer, mcfg, tcfg = load_language_model(args.checkpoint, args.device)
    segments = open_segments(model, 1, args.runtime)
    binary, source = (sys.stdin.buffer, "stdin") if args.file == "-" else (open(args.file, "rb"), args.file)
    with binary:
        ids = text_ids(read_lines(binary, source), tokenizer, args.map_unk, source)
        for i, r in enumerate(score_stream(model, ids, args.report_every, segments, tokenizer.token_bytes())):
            if not r["tokens"]:
                raise CRTError(f"{source} has fewer than two tokens: nothing to score")
            if i == 0:  # with the first result: a text it cannot score gets its one-line error alone
                print(f"runtime: {segments.runtime}", file=sys.stderr)
            bpb = f"  bpb {r['bpb']:.4f}" if not math.isnan(r["bpb"]) else ""
            print(f"tokens {r['tokens']:,}  loss {r['loss']:.4f}  ppl {r['ppl']:.3f}{bpb}  peak RSS {peak_rss_mib():.0f} MiB", flush=True)


def cmd_export(args: argparse.Namespace) -> None:
    from crt.infer import load_language_model
    from crt.infer.export import export

    if not (1 <= args.batch_size <= EXPORT_MAX_BATCH and 1 <= args.check_segments <= EXPORT_MAX_CHECK):
        raise CRTError(
            f"--batch-size {args.batch_size} and --check-segments {args.check_segments}: give 1..{EXPORT_MAX_BATCH} streams and 1..{EXPORT_MAX_CHECK} segments "
            "(the check runs them all in memory, in PyTorch and in the runtime)"
        )
    suffix = Path(args.out).suffix.lower()
    if suffix in (".onnx", ".pt2") and suffix != "." + args.format:
        raise CRTError(f"--out {args.out} names a {suffix[1:]} file but --format is {args.format}: make them agree")
    from crt.checkpoint import resolve

    source = resolve(args.checkpoint).resolve()
    if Path(args.out).resolve().parent in (source, source.parent):
        raise CRTError(f"--out {args.out} is inside the checkpoint folder it exports from: write the program somewhere else")
    model, tokenizer, mcfg, _ = load_language_model(args.checkpoint)
    r = export(model, args.format, args.out, args.batch_size, args.check_segments, int8=args.int8, tokenizer=tokenizer)  # out of memory: main() says so
    size = r["path"].stat().st_size / 2**20
    print(f"{mcfg.arch} segment step -> {r['path']} ({size:.2f} MiB): (tokens [{args.batch_size}, {mcfg.eval_segment}], *state) -> (logits, *state)")
    print(f"checked over {args.check_segments} segments: max |difference| from PyTorch {r['max_difference']:.2e}")
    if r["int8_path"]:
        print(
            f"int8 -> {r['int8_path']} ({r['int8_path'].stat().st_size / 2**20:.2f} MiB): max |logit difference| from fp32 {r['int8_max_difference']:.3f}, "
            f"same argmax at {100 * r['int8_agreement']:.1f}% of positions"
        )
    print(f"initial state -> {r['state_path']}")
    print(f"tokenizer ({tokenizer.kind}) -> {r['tokenizer_path']}")


def cmd_flops(args: argparse.Namespace) -> None:
    from crt.analysis.flops import PARTS, flops_table, with_vocab

    overrides = _overrides(args, list(MODEL_FIELDS))
    rows, jobs = [], []
    for name in args.preset or list(DEFAULT_PRESETS):
        mcfg, tcfg = load_preset(name)
        mcfg, tcfg = apply_overrides(mcfg, tcfg, overrides)
        rows.append((name, with_vocab(mcfg, tcfg, name)))
        jobs.append((mcfg, tcfg))
    _warn_unused(jobs, overrides)
    print(f"MFLOP per token ({'evaluation' if args.eval else 'training'} lengths; 1 multiply-add = 2 FLOPs; train = 3 x forward)")
    print(flops_table(rows, evaluation=args.eval))
    print(
        "Counted: all matrix products (" + ", ".join(PARTS) + "). Not counted: norms, activations, softmax, "
        "embedding lookups, the NCGRU's per-segment Cayley solve. Causal attention is counted as the full score matrix it computes."
    )


def cmd_bench(args: argparse.Namespace) -> None:
    from crt.analysis import bench
    from crt.analysis.machine import describe
    from crt.analysis.rounds import run_rounds
    from crt.analysis.speed_report import method_notes, report
    from crt.data.load import load_corpus
    from crt.runtime import resolve_device

    for flag in ("threads", "steps", "repeats", "rounds", "infer_batch", "infer_tokens"):
        if getattr(args, flag) < 1:
            raise CRTError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a count >= 1")
    device = resolve_device(args.device)
    args.precision = args.precision or ["fp32", "bf16"]
    for p in args.precision:
        if p not in ("fp32", "bf16"):
            raise CRTError(f"unknown precision {p!r}: use fp32 or bf16")
    if args.busy < 0:
        raise CRTError(f"--busy {args.busy}: give a number of cores to keep busy, >= 0")
    stream, source = None, "random tokens"
    if args.data_dir:
        corpus = load_corpus(TrainConfig(data="ptb", data_dir=args.data_dir))
        stream, source = corpus.valid.tolist(), f"the PTB valid split in {args.data_dir}"
    if args.diagonal and (args.diagonal_segments < 1 or args.diagonal_layers < 1):
        raise CRTError(f"--diagonal-segments ({args.diagonal_segments}) and --diagonal-layers ({args.diagonal_layers}) must be >= 1")
    presets = args.preset or ([] if args.diagonal else list(bench.DEFAULT_PRESETS))
    cases = bench.make_cases(
        presets,
        args.precision,
        args.peers,
        args.traps,
        device.type,
        args.threads,
        args.steps,
        args.repeats,
        args.infer_batch,
        args.infer_tokens,
        stream,
        overrides=_overrides(args, list(MODEL_FIELDS)),
        diagonal=(args.diagonal_segments, args.diagonal_layers) if args.diagonal else None,
        busy=args.busy,
    )
    results = run_rounds(cases, args.rounds, log=lambda line: print(line, flush=True))
    failed = [r for r in results if "error" in r]
    notes = method_notes(args.rounds, args.threads, device.type, args.repeats, args.steps, args.infer_tokens, source, args.infer_batch, args.busy)
    text = report(results, "crt bench " + " ".join(sys.argv[2:]), describe(device), notes)
    if args.out:
        _write_report(Path(args.out), text)
    print(text)
    if failed:
        print(
            f"crt: {len(failed)} of {len(results)} cases failed: {', '.join(r['name'] + ' ' + r['precision'] for r in failed)} (see the table)", file=sys.stderr
        )
        raise TrainingFailed


def _write_report(path: Path, text: str) -> None:
    from crt.files import write_atomic

    if path.is_dir() or path.is_symlink() or (path.exists() and not path.is_file()):
        raise CRTError(f"--out {path} exists and is not a regular file: give a file path for the report")
    try:
        write_atomic(path, text)
    except OSError as e:
        raise CRTError(f"cannot write the report to {path} ({e.strerror}): give --out a path in a folder you can write to") from None


def cmd_download(args: argparse.Namespace) -> None:
    from crt.data import download

    path = download(args.name, args.dir)
    print(f"{args.name} is in {path}")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"crt: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="crt", description="Compact Recurrent Transformer: train, evaluate, fetch data.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser(
        "train",
        help="train a model (no arguments: CRT and the Transformer on the built-in recall task)",
        description="Train from a preset plus overrides of any field. With no --preset it trains CRT and the "
        "segment Transformer on the built-in synthetic recall corpus, one document per batch row, through a curriculum "
        "(the presets' [[stage]]s: one filler token, then one and two whole segments of filler, each stage until valid "
        "recall passes its threshold) and prints a table; it exits 1 if CRT fails a stage. "
        f"Presets: {', '.join(preset_names())}.",
    )
    p.add_argument("--preset", help="preset name or path to a .toml file")
    p.add_argument("--resume", metavar="PATH", help="continue the run in PATH (a run directory or checkpoint folder) in the stage its checkpoint belongs to")
    p.add_argument(
        "--stages",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train through the preset's [[stage]] tables, a curriculum: each stage changes some training fields and ends when its validation condition holds (default); "
        "--no-stages trains [train]'s fields alone for max_steps steps. Fields given as flags hold in every stage",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_field_flags(p, list(MODEL_FIELDS), "model fields (override the preset; defaults shown are those without one)")
    _add_field_flags(p, list(TRAIN_FIELDS), "training fields (override the preset; defaults shown are those without one)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="perplexity of a language model over a whole split; accuracy and a confusion matrix of a video classifier")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run directory or checkpoint folder")
    p.add_argument("--split", choices=("valid", "test"), default="valid")
    p.add_argument("--confusion", metavar="PNG", help="video: where to write the confusion matrix (default RUN/confusion-SPLIT.png)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="language models: also score an int8 copy (dynamic quantization of linear and GRU layers, int8 embeddings, CPU) beside fp32",
    )
    _add_field_flags(p, list(EVAL_FIELDS), "evaluation options (default: as trained)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a language model, one token at a time with its state carried")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run directory or checkpoint folder")
    p.add_argument("--prompt", default="", help="text to start from (default: the start of a line)")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default 50)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0: greedy argmax (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: the smallest set of tokens whose probability reaches p (default 1: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--runtime", default="auto", help=RUNTIME_HELP.format(graph="per-token step"))
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="running perplexity of a text stream of any length (a file or stdin), in constant memory")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run directory or checkpoint folder")
    p.add_argument("file", help="UTF-8 text file, or - for stdin")
    p.add_argument("--report-every", type=int, default=10_000, help="print the running perplexity every N scored tokens (default 10000; 0: at the end only)")
    p.add_argument("--map-unk", action="store_true", help="score words the vocabulary lacks as <unk> (else they are an error)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--runtime", default="auto", help=RUNTIME_HELP.format(graph="segment step"))
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("export", help="one segment step with explicit state, as ONNX or a torch.export program, checked against PyTorch")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run directory or checkpoint folder")
    p.add_argument("--format", choices=("onnx", "pt2"), required=True, help="onnx (checked with onnxruntime) or pt2 (torch.export: ExecuTorch, AOTInductor)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the program (the initial state goes beside it)")
    p.add_argument("--batch-size", type=int, default=1, help="parallel streams B fixed in the program (default 1)")
    p.add_argument("--check-segments", type=int, default=4, help="consecutive segments the runtime must reproduce (default 4)")
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write FILE.int8.onnx or FILE.int8.pt2, linear layers dynamically quantized to int8 (default on; pt2 needs torchao)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("flops", help="analytic FLOPs per token and segment of presets, side by side")
    p.add_argument("--preset", action="append", help="preset name or .toml path; repeat for several (default: the built-in pair)")
    p.add_argument("--eval", action="store_true", help="count at the evaluation segment and memory lengths")
    _add_field_flags(p, list(MODEL_FIELDS), "model fields (override every preset)")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("bench", help="training and streaming tokens/s, peak memory and MFU per model and precision")
    p.add_argument("--preset", action="append", help="preset to measure; repeat for several (default: the PTB grid)")
    p.add_argument("--precision", action="append", help="fp32 and/or bf16 (default: both)")
    p.add_argument(
        "--peers",
        action="store_true",
        help="also time x-transformers and recurrent-memory-transformer-pytorch at their presets' sizes, and minGRU-pytorch and mambapy "
        'at CRT-35\'s width and parameter count (pip install -e ".[bench]")',
    )
    p.add_argument(
        "--busy", type=int, default=0, help="also run each case with this many cores kept busy by background processes (robustness to a loaded machine)"
    )
    p.add_argument("--traps", action="store_true", help="A/B cases on CRT-35 fp32 for the known CPU traps (allocator, denormals, dropout)")
    p.add_argument(
        "--diagonal", action="store_true", help="add ARMT inference on one long sequence, Diagonal Batching vs sequential (alone unless --preset is given)"
    )
    p.add_argument("--diagonal-segments", type=int, default=64, help="segments in the --diagonal sequence (default 64)")
    p.add_argument("--diagonal-layers", type=int, default=4, help="ARMT layers for --diagonal (default 4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per case (default: all cores)")
    p.add_argument("--steps", type=int, default=5, help="training steps per timed group")
    p.add_argument("--repeats", type=int, default=3, help="timed groups per case and round")
    p.add_argument("--rounds", type=int, default=3, help="passes over all cases, each case in a fresh process (drift is spread over all cases)")
    p.add_argument("--infer-batch", type=int, default=1, help="parallel streams for inference")
    p.add_argument("--infer-tokens", type=int, default=4096, help="tokens streamed per inference measurement")
    p.add_argument("--data-dir", help="PTB folder: stream its valid split for inference (default: random tokens)")
    p.add_argument("--out", help="also write the Markdown report here (e.g. docs/results/bench.md)")
    _add_field_flags(p, list(MODEL_FIELDS), "model fields (override every preset)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    d = dsub.add_parser("download", help="download a corpus from its canonical public source and verify it")
    d.add_argument("name", choices=("ptb", "wikitext-2", "wikitext-103"))
    d.add_argument("--dir", required=True, help="folder to put the files in")
    d.set_defaults(func=cmd_download)
    return parser


def _terminated(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler, `kill`): unwind like Ctrl-C, so a run that saved nothing removes its folder


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"crt: warning: {message}\n"  # one line, no source excerpt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    from crt.train.distributed import launched, leave

    # under torchrun, rank 0 alone talks; another rank says only why it failed, naming itself
    rank = int(os.environ.get("RANK", "0") or 0) if launched() else 0  # a RANK a scheduler sets for one process is not ours
    out, errors = sys.stdout, sys.stderr
    with open(os.devnull, "w") as quiet:
        if rank:
            sys.stdout = sys.stderr = quiet
        rc = None
        try:
            rc = _run(args, errors, f" (rank {rank})" if rank else "")
            return rc
        finally:
            leave(finished=rc in (0, 1))  # 1: the job ran to its end on every rank and did not pass
            sys.stdout, sys.stderr = out, errors


def entry() -> None:
    """The `crt` command and `python -m crt`: run main() and exit with its status.

    Under torchrun the process ends with os._exit once main() has left the process group and its
    output is flushed. Python's own exit goes on to the C++ teardown of the distributed runtime,
    which now and then aborts a process whose job had succeeded (SIGABRT after all its atexit
    handlers ran), and torchrun then fails the whole job (docs/results/distributed-notes.md).
    Nothing is left to write by then: every file is written whole and closed before main() returns."""
    from crt.train.distributed import launched

    rc = main()
    if launched():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:  # a reader that went away (`| head`): its output is lost either way
                pass
        os._exit(rc)
    sys.exit(rc)


def _run(args: argparse.Namespace, errors, who: str) -> int:
    from crt.train.distributed import launched

    try:
        if launched() and args.func not in (cmd_train, cmd_eval):
            name = args.func.__name__.removeprefix("cmd_")
            raise CRTError(f"crt {name} runs in one process, and torchrun started several: only train and eval run distributed; run it without torchrun")
        args.func(args)
    except CRTError as e:
        print(f"crt: error{who}: {e}", file=errors)
        return 2
    except TrainingFailed:
        return 1
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e) and "out of memory" not in str(e):
            raise
        print(
            f"crt: error{who}: out of memory ({str(e).splitlines()[0][:160] if str(e) else 'MemoryError'}): lower the sizes you asked for "
            "(model width, batch, documents, tokens)",
            file=errors,
        )
        return 2
    except KeyboardInterrupt:
        print("crt: interrupted", file=sys.stderr)  # rank > 0: quiet (torchrun stops the others when one fails)
        return 130
    return 0


if __name__ == "__main__":
    entry()
