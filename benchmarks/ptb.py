"""The paper's PTB comparison (and WikiText-2's): every row trained to convergence on valid, several seeds (SPEC §1, §6).

    python benchmarks/ptb.py --data-dir ../shared/data/ptb --plan 30           # time each row: the grid's cost on this CPU
    python benchmarks/ptb.py --data-dir ../shared/data/ptb --tune 0.1,0.2,0.3 --seeds 0   # the dropout of each family, on valid
    python benchmarks/ptb.py --data-dir ../shared/data/ptb --epochs 15 --seeds 0,1,2 --only "CRT L=35"
    python benchmarks/ptb.py --data-dir DIR --epochs 15 --set d_model=256 --set d_ff=1024 --set device=cuda --jobs 8   # 8 cells at once on one GPU
    python benchmarks/ptb.py --data wikitext-2 --data-dir ../shared/data/wikitext-2 --row "CRT L=35"

Each cell (row x seed) trains for --epochs passes over the training split, validates
--evals-per-epoch times per epoch and scores the whole test split at every validation (the
state carried over the split, SPEC §3.6), and stops early once valid loss has not improved for
--patience validations. A cell reports the test perplexity at its best validation; a row, the mean
and standard deviation over its seeds. Two views: equal tokens (every cell the same epochs), and
test perplexity at matched training FLOPs, read off each cell's curve at the smallest total any
finished cell reached. Every row is set against the Transformer-70 and CRT-35 (Welch's t over
seeds, its p, whether the seeds overlap). Writes docs/results/ptb.md (wikitext-2.md with --data wikitext-2) and a
plot beside it (test perplexity against training FLOPs, mean and std over seeds).

Regularisation is one family, dropout p on the embeddings and on both residual branches (weight
decay fixed), tuned once on valid for the Transformer (its p serves every attention-only row:
Transformer, XL, RMT, ARMT) and once for CRT (every CRT row): --tune P,P,... trains the tuning
row of each family at each p, and every grid cell uses the p of its family's best tuning cell
(seed 0, same epochs), or the presets' p while no tuning cell exists. Finished cells are kept beside the report (ptb.json, committed
with it) and are not trained again, so the grid fills over several invocations, sessions and
machines; --fresh starts over. Checkpoints of the cells go to --runs-dir, which is not kept; a
cell stopped part-way (a session's end, a kill) goes on from its last validation's checkpoint
there when the grid runs again with the same settings, so a cell may outlast a session.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import multiprocessing
import re
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from crt.analysis.flops import count_flops
from crt.analysis.machine import describe
from crt.analysis.results import header, write_results
from crt.checkpoint import Checkpoint, load_checkpoint, load_model
from crt.config import ModelConfig, apply_overrides, config_from_dict, load_preset, parse_assignment, to_dict
from crt.data.load import load_corpus
from crt.data.tokenizer import from_meta as tokenizer_from_meta
from crt.errors import CRTError
from crt.files import write_atomic
from crt.models import build_model
from crt.runtime import describe_precision, resolve_device, resolve_precision
from crt.train.evaluate import evaluate
from crt.train.loop import train
from crt.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LABEL = {"ptb": "PTB", "wikitext-2": "WikiText-2"}

# (row name, preset, overrides): the comparison of the paper, then the CRT ablations of SPEC §3's open choices on CRT-35
GRID: list[tuple[str, str, dict]] = [
    ("Transformer L=70", "ptb-transformer-70", {}),
    ("CRT L=70", "ptb-crt-70", {}),
    ("CRT L=35", "ptb-crt-35", {}),
    ("CRT L=17", "ptb-crt-17", {}),
    ("CRT-NCGRU L=35", "ptb-crt-ncgru-35", {}),
    ("CRT-minGRU L=35 (scan cells)", "ptb-crt-mingru-35", {}),
    ("Transformer-XL L=35 M=35", "ptb-xl-35", {}),
    # rotary positions, as RMT's retrieval runs and our recall work (synthetic-recall-notes.md); ARMT keeps
    # the floor normaliser, the better of the two on PTB (ptb-notes.md); both 4 memory tokens, BPTT over K=2
    ("RMT L=35 k=4, rotary", "ptb-rmt-35", {"positions": "rotary"}),
    ("ARMT L=35 k=4", "ptb-armt-35", {}),
    ("CRT L=35, memory reads last token", "ptb-crt-35", {"memory_reads": "last_token"}),
    # what carries the past: without a memory token the memory vector is never read, and the
    # positional GRU's carried state is the only path across segments; without carry_rpe neither
    ("CRT L=35, no memory token", "ptb-crt-35", {"memory_position": "none"}),
    ("CRT L=35, no path across segments", "ptb-crt-35", {"memory_position": "none", "carry_rpe": False}),
    ("CRT L=35, sinusoidal positions", "ptb-crt-35", {"positions": "sinusoidal"}),
    ("CRT L=35, K=1", "ptb-crt-35", {"bptt_segments": 1}),
    ("CRT L=35, K=4", "ptb-crt-35", {"bptt_segments": 4}),
]


ABLATED = "CRT L=35"  # the row the ablations ("CRT L=35, ...") change one thing of
# the row each regularisation family is tuned on (SPEC §1's two headline models)
TUNING_ROW = {"transformer": "Transformer L=70", "crt": "CRT L=35"}
DEFAULT_SEEDS = (0, 1, 2)  # a row is complete at this many seeds
REGULARISATION = ("dropout", "emb_dropout")  # the family: both set to the one p


def family(preset: str) -> str:
    return "crt" if load_preset(preset)[0].arch == "crt" else "transformer"


def cell_key(name: str, p: float, seed: int, epochs: float) -> str:
    return f"{name} | dropout {p:g} | seed {seed} | {epochs:g} epochs"  # a cell of another p or budget is another cell


def key_of(cell: dict) -> str:
    return cell_key(cell["name"], cell["model"]["dropout"], cell["seed"], cell["epochs_budget"])


def tuned(done: dict, args: argparse.Namespace) -> dict[str, tuple[float, list[dict]]]:
    """Each family's p: its tuning row's best cell on valid (seed 0, this budget); the presets' p without one."""
    out = {}
    for fam, row in TUNING_ROW.items():
        trials = sorted(
            (c for c in done.values() if c["name"] == row and c["seed"] == 0 and c["epochs_budget"] == args.epochs), key=lambda c: c["model"]["dropout"]
        )
        preset = next(pr for n, pr, _ in GRID if n == row)
        p = min(trials, key=lambda c: c["best"]["valid_ppl"])["model"]["dropout"] if trials else load_preset(preset)[0].dropout
        out[fam] = (p, trials)
    return out


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def configure(preset: str, overrides: dict, seed: int, args: argparse.Namespace, corpus):
    """A cell's configs, and its steps per epoch (windows of the batchified training stream)."""
    mcfg, tcfg = load_preset(preset)
    mcfg, tcfg = apply_overrides(mcfg, tcfg, {**overrides, **args.set, "data": args.data, "data_dir": args.data_dir, "seed": seed})
    per_epoch = (len(corpus.train) // tcfg.batch_size - 1) // (mcfg.segment_len * tcfg.bptt_segments)
    return mcfg, tcfg, per_epoch


def run_cell(name: str, preset: str, overrides: dict, p: float, seed: int, args: argparse.Namespace, corpus) -> dict:
    mcfg, tcfg, per_epoch = configure(preset, {**overrides, **dict.fromkeys(REGULARISATION, p)}, seed, args, corpus)
    tokens_per_step = tcfg.batch_size * mcfg.segment_len * tcfg.bptt_segments
    tcfg.max_steps = math.ceil(args.epochs * per_epoch)
    tcfg.warmup_steps = min(tcfg.warmup_steps, tcfg.max_steps // 10)
    tcfg.eval_every, tcfg.eval_max_tokens = max(1, per_epoch // args.evals_per_epoch), 0  # whole splits
    tcfg.eval_test, tcfg.patience = True, args.patience
    tcfg.out_dir = str(Path(args.runs_dir) / f"{slug(name)}-p{p:g}-s{seed}")
    resume = None if args.fresh else interrupted(Path(tcfg.out_dir), mcfg, tcfg, corpus)
    summary = train(mcfg, tcfg, resume=resume, corpus=corpus, progress=not args.no_progress)
    mcfg = trained_config(summary)
    flops = count_flops(mcfg).train_per_token
    records = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
    tests = {r["step"]: r for r in records if r["split"] == "test"}
    curve = [
        {
            "step": v["step"],
            "epochs": v["step"] / per_epoch,
            "train_flops": v["step"] * tokens_per_step * flops,
            "valid_ppl": v["ppl"],
            "test_ppl": tests[v["step"]]["ppl"],
        }
        for v in records
        if v["split"] == "valid"
    ]
    rates = [r["tokens_per_s"] for r in records if r["split"] == "train"]
    device = resolve_device(tcfg.device)
    return {
        "name": name,
        "seed": seed,
        "epochs_budget": args.epochs,
        "preset": preset,
        "overrides": overrides,
        "model": to_dict(mcfg),
        "train": {
            k: v
            for k, v in to_dict(tcfg).items()
            if k in ("batch_size", "bptt_segments", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "patience")
        }
        | {"precision": resolve_precision(tcfg.precision, device)},  # what ran, not `auto`
        "machine": describe(device),
        "params": summary["params"],
        "steps": summary["step"],
        "stopped_early": summary["step"] < tcfg.max_steps,
        "wall_s": summary["elapsed_s"],  # over all its resumes
        "resumed_at_step": resume.meta["step"] if resume is not None else None,  # save_checkpoint records it
        "cells_at_once": args.jobs,  # >1: its wall time and tokens/s shared the device with other cells
        "train_tokens_per_s": statistics.median(rates[1:] or rates),  # the first interval includes warm-up
        "train_flops_per_token": flops,
        "train_ppl": last_epoch_train_ppl(records, per_epoch),
        "curve": curve,
        "best": min(curve, key=lambda c: c["valid_ppl"]),
        "run_dir": summary["run_dir"],
    }


def last_epoch_train_ppl(records: list[dict], per_epoch: int) -> float:
    """Training perplexity over a run's last epoch (dropout on): exp of the mean training loss of its
    train records there, each weighted by the steps it averages (from the record before it)."""
    train = [r for r in records if r["split"] == "train"]
    steps = [r["step"] for r in train]
    spans = [(r["loss"], step - before) for r, step, before in zip(train, steps, [0, *steps[:-1]]) if step > steps[-1] - per_epoch]
    return math.exp(sum(loss * n for loss, n in spans) / sum(n for _, n in spans))


def recover_train_ppl(done: dict[str, dict]) -> bool:
    """Give each kept cell that predates `train_ppl` its value, read from its run's metrics where that run is
    still on this machine and its validations are exactly the cell's curve; True if any cell gained one."""
    gained = False
    for c in done.values():
        metrics = Path(c["run_dir"]) / "metrics.jsonl"
        if "train_ppl" in c or not metrics.exists():
            continue
        records = read_metrics(metrics)
        if [(r["step"], r["ppl"]) for r in records if r["split"] == "valid"] != [(v["step"], v["valid_ppl"]) for v in c["curve"]]:
            continue  # the folder holds another run now
        c["train_ppl"] = last_epoch_train_ppl(records, round(c["curve"][0]["step"] / c["curve"][0]["epochs"]))
        gained = True
    return gained


def interrupted(out: Path, mcfg, tcfg, corpus) -> Checkpoint | None:
    """The checkpoint to go on from, if an earlier run of this cell stopped part-way (its process
    killed, or killed before it wrote the results): the newest of `out`, `out`-2, `out`-3, ...
    (a run that found its folder taken moved on to the next) that holds a sound checkpoint of a run
    with exactly these configs and data. A resumed run follows the trajectory of an unbroken one
    (crt.train.loop.train), so a cell longer than a session still finishes. Runs of other settings
    are left as they are; with none to go on from, the cell trains afresh in the next free folder."""
    folders = [out] + list(itertools.takewhile(Path.exists, (out.with_name(f"{out.name}-{n}") for n in itertools.count(2))))
    model = to_dict(dataclasses.replace(mcfg, vocab_size=len(corpus.vocab)))  # as trained: the vocabulary is set from the data
    refused = []
    for folder in reversed([f for f in folders if (f / "checkpoints").exists()]):
        try:
            ckpt = load_checkpoint(folder)
            trainer = ckpt.load_trainer()
            if to_dict(ckpt.train_config(in_stage=False)) != to_dict(tcfg) or ckpt.meta["model"] != model or tokenizer_from_meta(ckpt.meta) != corpus.tokenizer:
                refused.append(f"{folder} holds a run with other settings (data, epochs, --set or seed)")
                continue
            if "elapsed_s" not in trainer:
                refused.append(f"{folder} holds a checkpoint written before runs recorded their wall time")
                continue
            ckpt.load_weights(build_model(config_from_dict(ModelConfig, model)))  # its weights whole and of this model
        except CRTError as e:
            refused.append(f"{folder} holds an unusable checkpoint ({e})")
            continue
        print(f"{folder}: resuming the stopped cell at step {trainer['step']}", flush=True)
        return ckpt
    if refused:
        print("; ".join(refused) + ": left as they are; the cell trains afresh in a new folder", flush=True)
    return None


def train_cells(todo: list[tuple[str, str, dict, float, int]], args: argparse.Namespace, corpus):
    """Train each (name, preset, overrides, p, seed) of `todo`, yielding (key, cell) as each finishes.

    --jobs 1 trains them one after another here. --jobs N trains N at a time, each in a process of
    its own (spawned: CUDA cannot be forked), for a device that one small model leaves idle, such as
    a GPU; on a CPU each process takes cores / N threads, so N cells share the cores rather than
    fight over them. A cell's record keeps N, since its wall time and tokens/s were shared.
    """
    keys = [cell_key(name, p, seed, args.epochs) for name, _, _, p, seed in todo]
    if args.jobs == 1:
        for key, (name, preset, overrides, p, seed) in zip(keys, todo):
            print(f"== {key}", flush=True)
            yield key, run_cell(name, preset, overrides, p, seed, args, corpus)
        return
    quiet = argparse.Namespace(**{**vars(args), "no_progress": True})  # N progress bars would overwrite each other
    threads = max(1, torch.get_num_threads() // args.jobs)
    pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads, initargs=(threads,))
    try:
        running = {pool.submit(run_cell, name, preset, overrides, p, seed, quiet, corpus): key for key, (name, preset, overrides, p, seed) in zip(keys, todo)}
        print(f"== {len(todo)} cells, {args.jobs} at a time, {threads} thread(s) each: " + "; ".join(keys), flush=True)
        for future in as_completed(running):
            print(f"== finished {running[future]}", flush=True)
            yield running[future], future.result()
    finally:
        pool.shutdown(cancel_futures=True)  # a failed cell: the ones not yet started are dropped, the finished ones are kept


def trained_config(summary: dict):
    """The model config as trained (its vocabulary is set from the data)."""
    return config_from_dict(ModelConfig, load_checkpoint(summary["run_dir"]).meta["model"])


def at_flops(curve: list[dict], budget: float) -> float:
    """Test perplexity at `budget` training FLOPs, log-linear between the curve's validations (nan before the first)."""
    points = [(c["train_flops"], math.log(c["test_ppl"])) for c in curve]
    if budget < points[0][0] or budget > points[-1][0]:
        return math.nan
    for (f0, y0), (f1, y1) in zip(points, points[1:]):
        if f0 <= budget <= f1:
            return math.exp(y0 + (y1 - y0) * (budget - f0) / max(f1 - f0, 1e-12))
    return math.exp(points[-1][1])


def device_hours(cell: dict) -> float:
    """Hours of the whole device one cell took: its wall time shared among the cells trained beside it (--jobs)."""
    return cell["wall_s"] / cell["cells_at_once"] / 3600


def remaining_cost(groups: dict[str, list[dict]]) -> str:
    """How many cells the grid still lacks and what they would cost at the device hours measured so far."""
    every = statistics.median(device_hours(c) for cs in groups.values() for c in cs)
    todo = {name: max(0, len(DEFAULT_SEEDS) - len(groups.get(name, []))) for name, _, _ in GRID}
    hours = sum(n * (statistics.mean(map(device_hours, groups[name])) if name in groups else every) for name, n in todo.items() if n > 0)
    return (
        f"{sum(todo.values())} cells remain: about {hours:.0f} device hours at the hours measured so far "
        f"(a row's mean device hours per cell where it has a cell, else the median of all cells, {every:.2f})."
    )


def mean_std(xs: list[float]) -> str:
    """Mean ± std over the seeds that have a value; "(n of m)" when some have none (a curve that starts past the budget)."""
    kept = [x for x in xs if not math.isnan(x)]
    if not kept:
        return "-"
    text = f"{statistics.mean(kept):.2f} ± {statistics.stdev(kept):.2f}" if len(kept) > 1 else f"{kept[0]:.2f}"
    return text if len(kept) == len(xs) else f"{text} ({len(kept)} of {len(xs)})"


def plot(groups: dict[str, list[dict]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    tab20 = plt.get_cmap("tab20").colors
    colours = tab20[0::2] + tab20[1::2]  # 15 rows: 10 strong colours, then their light shades (the default cycle of 10 repeats)
    for row, (name, cells) in enumerate(groups.items()):
        n = min(len(c["curve"]) for c in cells)  # seeds that stopped early: their common prefix
        x = [statistics.mean(c["curve"][i]["train_flops"] for c in cells) / 1e15 for i in range(n)]
        ys = [[c["curve"][i]["test_ppl"] for c in cells] for i in range(n)]
        ax.errorbar(
            x,
            [statistics.mean(y) for y in ys],
            yerr=[statistics.stdev(y) if len(y) > 1 else 0 for y in ys],
            label=f"{name} ({len(cells)} seed{'s' if len(cells) > 1 else ''})",
            capsize=2,
            color=colours[row % len(colours)],
            linestyle="--" if name.startswith(ABLATED + ",") else "-",  # ablations dashed
        )
    # the early points of a slow starter (ARMT's first epochs reach 1,000) would flatten where the rows differ
    best = min(c["best"]["test_ppl"] for cells in groups.values() for c in cells)
    ax.set_ylim(0.9 * best, 4 * best)
    ax.set_xlabel("training PFLOP (3 x forward)")
    ax.set_ylabel("test perplexity (state carried over the split)")
    ax.set_yscale("log")
    ax.set_title(f"{LABEL[args.data]}: test perplexity against training FLOPs (mean and std over seeds; y cut at 4x the best)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def report(groups: dict[str, list[dict]], choice: dict, args: argparse.Namespace, command: str) -> list[str]:
    cells = [c for cs in groups.values() for c in cs]
    budget = min(c["curve"][-1]["train_flops"] for c in cells)
    m0, t0 = cells[0]["model"], cells[0]["train"]
    tags = machine_tags(cells)
    machine = (
        cells[0]["machine"]
        if len(tags) == 1
        else f"{len(tags)} machines or thread counts, each cell's named in the Cells table: " + "; ".join(f"{t} = {m}" for m, t in tags.items())
    )
    lines = header(f"{LABEL[args.data]}: the comparison trained to convergence on valid, several seeds", command, machine)
    lines += [
        f"Finished cells are kept in `{Path(args.out).with_suffix('.json').name}` beside this file and not retrained, so the grid fills over several "
        f"invocations (`--only`, `--row`, `--seeds`), sessions and machines; this file was last written by `{args.invocation}`.",
        "",
        f"Each cell trains up to {args.epochs:g} epochs, validates {args.evals_per_epoch} x per epoch on the whole valid split and scores the whole "
        f"test split each time (state carried), and stops once valid loss has not improved for {args.patience} validations. "
        "test ppl is the test perplexity at the cell's best validation; rows give mean ± std over their seeds. "
        f"test ppl at matched FLOPs reads each cell's test curve at {budget:.3g} training FLOPs, the smallest total any cell reached (log-linear between validations). "
        "A cell trained beside N - 1 others (`--jobs N`) counts N x its tokens/s and 1/N of its wall time as the device's (its own are in the Cells table).",
        "",
        "| model | params | seeds | epochs run | stopped early | train MFLOP/token | device tokens/s (median of cells) | valid ppl | test ppl | test ppl at matched FLOPs | device hours per cell |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, cs in groups.items():
        lines.append(
            f"| {name} | {cs[0]['params']:,} | {len(cs)} ({', '.join(str(c['seed']) for c in cs)}) | {statistics.mean(c['curve'][-1]['epochs'] for c in cs):.1f} | "
            f"{sum(c['stopped_early'] for c in cs)} | {cs[0]['train_flops_per_token'] / 1e6:.2f} | {statistics.median(c['train_tokens_per_s'] * c['cells_at_once'] for c in cs):,.0f} | "
            f"{mean_std([c['best']['valid_ppl'] for c in cs])} | {mean_std([c['best']['test_ppl'] for c in cs])} | "
            f"{mean_std([at_flops(c['curve'], budget) for c in cs])} | {statistics.mean(map(device_hours, cs)):.2f} |"
        )
    missing = [n for n, _, _ in GRID if n not in groups]
    short = [f"{n} ({len(cs)})" for n, cs in groups.items() if len(cs) < len(DEFAULT_SEEDS)]
    if missing or short:  # a partial grid says what it lacks, so no reader takes it for the whole comparison
        lines += [
            "",
            f"**The grid is not complete.** Rows with fewer than {len(DEFAULT_SEEDS)} seeds (seeds finished): {'; '.join(short) or 'none'}. "
            f"Rows without a finished cell: {'; '.join(missing) or 'none'}. {remaining_cost(groups)}",
        ]
    lines += [
        "",
        f"All rows: width {m0['d_model']}, {m0['n_layer']} layers, {m0['n_head']} heads, feed-forward {m0['d_ff']}, "
        f"AdamW weight decay {t0['weight_decay']}, lr {t0['lr']} cosine to {t0['min_lr']} (precision: each cell's in the Cells table); dropout p on the embeddings and both "
        f"residual branches, p = {choice['transformer'][0]:g} for the attention-only rows and {choice['crt'][0]:g} for the CRT rows (next table). "
        "Per-row settings: the GRID of `benchmarks/ptb.py` (presets in `src/crt/configs/`, overrides in the row name).",
    ]
    lines += comparisons(groups)
    lines += [
        "",
        "## Regularisation, tuned on valid",
        "",
        "Each family's tuning row trained at each p (seed 0, the same budget); the best valid perplexity fixes p for the family's rows.",
        "",
        "| family | tuning row | p | epochs run | best valid ppl at epoch | valid ppl | test ppl | chosen |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for fam, (chosen, trials) in choice.items():
        if not trials:
            lines.append(f"| {fam} | {TUNING_ROW[fam]} | {chosen:g} | - | - | - | - | the presets' p: no tuning cell yet |")
        for c in trials:
            lines.append(
                f"| {fam} | {c['name']} | {c['model']['dropout']:g} | {c['curve'][-1]['epochs']:.1f} | {c['best']['epochs']:.1f} | "
                f"{c['best']['valid_ppl']:.2f} | {c['best']['test_ppl']:.2f} | {'yes' if c['model']['dropout'] == chosen else ''} |"
            )
    lines += [
        "",
        "## Cells",
        "",
        "Every finished cell of the table above: where it ran, at which precision, how many cells shared the device (`--jobs`), and its best validation."
        + (
            " A cell stopped and resumed (hours: resumed at step N) counts the wall time of all its parts; its machine and cells at once are its last part's."
            if any(c.get("resumed_at_step") for cs in groups.values() for c in cs)
            else ""
        ),
        "",
        "| row | seed | machine | precision | cells at once | epochs run | best valid ppl at epoch | valid ppl | test ppl | train ppl, last epoch | best valid / train | train tokens/s | hours | valid gain at the last validation |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, cs in groups.items():
        for c in cs:
            lines.append(
                f"| {name} | {c['seed']} | {tags[c['machine']]} | {c['train']['precision']} | {c['cells_at_once']} | {c['curve'][-1]['epochs']:.1f} | {c['best']['epochs']:.1f} | "
                f"{c['best']['valid_ppl']:.2f} | {c['best']['test_ppl']:.2f} | {overfit(c)} | {c['train_tokens_per_s']:,.0f} | "
                f"{c['wall_s'] / 3600:.2f}{resumed(c)} | {last_gain(c['curve'])} |"
            )
    lines += [
        "",
        converged(cells),
        "",
        f"![test perplexity against training FLOPs]({Path(args.out).with_suffix('.png').name})",
    ]
    return lines


def resumed(cell: dict) -> str:
    return f" (resumed at step {cell['resumed_at_step']})" if cell.get("resumed_at_step") else ""


def overfit(cell: dict) -> str:
    """Train perplexity over the last epoch (dropout on) and the best valid perplexity over it (- for cells kept without it)."""
    if cell.get("train_ppl") is None:
        return "- | -"
    return f"{cell['train_ppl']:.2f} | {cell['best']['valid_ppl'] / cell['train_ppl']:.2f}"


def converged(cells: list[dict]) -> str:
    """How flat the cells ended: the spread of their last validations' gains."""
    gains = [g for c in cells if (g := final_gain(c["curve"])) is not None]
    if not gains:
        return "No cell has two validations yet, so none can say how flat it ended."
    return (
        f"Valid gain at the last validation, over {len(gains)} cells: median {statistics.median(gains):+.2%}, from {min(gains):+.2%} to {max(gains):+.2%}; "
        f"{sum(g > 0.01 for g in gains)} gained over 1%, still falling when the budget ran out. Train ppl: exp of the mean training loss over the cell's "
        "last epoch, dropout on (- for a cell kept from before it was recorded whose run was not on the machine that last wrote this file)."
    )


def final_gain(curve: list[dict]) -> float | None:
    """How much the last validation lowered valid perplexity (a share): near 0 once a cell has flattened; None with one validation."""
    return curve[-2]["valid_ppl"] / curve[-1]["valid_ppl"] - 1 if len(curve) > 1 else None


def last_gain(curve: list[dict]) -> str:
    return "-" if (g := final_gain(curve)) is None else f"{g:+.2%}"


def machine_tags(cells: list[dict]) -> dict[str, str]:
    """Each machine of the cells, tagged M1, M2, ... in the order the cells list them."""
    tags: dict[str, str] = {}
    for c in cells:
        tags.setdefault(c["machine"], f"M{len(tags) + 1}")
    return tags


REFERENCES = ("Transformer L=70", ABLATED)  # every row is set against the paper's baseline and its model


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t of mean(a) - mean(b) and its Welch-Satterthwaite degrees of freedom (unequal variances);
    nan for both when neither row varies and the means are equal (nothing to test)."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)  # squared standard errors
    delta = statistics.mean(a) - statistics.mean(b)
    if va + vb == 0:
        return (math.copysign(math.inf, delta), math.inf) if delta else (math.nan, math.nan)
    return delta / math.sqrt(va + vb), (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))


def t_pvalue(t: float, df: float) -> float:
    """Two-sided p of Student's t with df degrees of freedom: I_x(df/2, 1/2) at x = df / (df + t²),
    the regularised incomplete beta function; the normal's tails for infinite df."""
    if math.isinf(df):
        return math.erfc(abs(t) / math.sqrt(2))
    return incomplete_beta(df / 2, 0.5, df / (df + t * t)) if math.isfinite(t) else 0.0


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) = B(x; a, b) / B(a, b), by its continued fraction
    (evaluated with Lentz's method), which converges fast for x < (a + 1) / (a + b + 2); above that, by
    the symmetry I_x(a, b) = 1 - I_{1-x}(b, a)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - incomplete_beta(b, a, 1 - x)
    # x^a (1-x)^b / (a B(a, b)), in logs
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 100_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * fraction


def versus(a: list[float], b: list[float]) -> str:
    """Row a against reference b: the change of the mean, Welch's t (df), its two-sided p, and whether the seeds' ranges overlap."""
    delta = statistics.mean(a) - statistics.mean(b)
    change = f"{delta:+.2f} ({delta / statistics.mean(b):+.1%})"
    overlap = "yes" if max(min(a), min(b)) <= min(max(a), max(b)) else "no"
    if len(a) < 2 or len(b) < 2:
        return f"{change} | - | - | {overlap}"  # one seed has no spread to weigh the change against
    t, df = welch(a, b)
    if math.isnan(t):
        return f"{change} | - | - | {overlap}"  # neither row varies and their means agree
    p = t_pvalue(t, df)
    return f"{change} | {t:+.1f} ({df:.1f}) | {'-' if math.isnan(p) else '<0.001' if p < 0.001 else f'{p:.3f}'} | {overlap}"


def comparisons(groups: dict[str, list[dict]]) -> list[str]:
    """Every row against each reference row present: how far apart their test perplexities are, and whether the seeds settle it."""
    refs = [r for r in REFERENCES if r in groups]
    if not refs:
        return []
    tests = {name: [c["best"]["test_ppl"] for c in cs] for name, cs in groups.items()}
    lines = [
        "",
        "## How far apart the rows are",
        "",
        f"Each row's test perplexity (at its best validation) against {' and against '.join(refs)}: the change of the mean (the row's minus the "
        "reference's: + is worse); Welch's t over the two rows' seeds (unequal variances) with its degrees of freedom, and its two-sided p, the chance "
        "of a |t| this large were the two means equal; and whether the seeds' ranges overlap. With 3 seeds a row (2 to 4 degrees of freedom) "
        "p < 0.05 takes |t| of 2.8 to 4.3; a row of one seed has no t. The table makes two comparisons a row and corrects for none: "
        "one in twenty comparisons of rows that do not differ passes p < 0.05 by chance. spread: the row's seed std as a share of its mean.",
        "",
        "| row | seeds | spread | " + " | ".join(f"vs {r}: change | t (df) | p | seeds overlap" for r in refs) + " |",
        "| --- | ---: | ---: |" + " ---: | ---: | ---: | --- |" * len(refs),
    ]
    for name, xs in tests.items():
        spread = f"{statistics.stdev(xs) / statistics.mean(xs):.1%}" if len(xs) > 1 else "-"
        against = " | ".join("- | - | - | -" if r == name else versus(xs, tests[r]) for r in refs)
        lines.append(f"| {name} | {len(xs)} | {spread} | {against} |")
    return lines


def plan(rows: list[tuple[str, str, dict]], args: argparse.Namespace, corpus, command: str) -> None:
    """Time --plan steps of every chosen row and one validation (valid + test), and project the cost of a cell."""
    lines = header(f"{LABEL[args.data]} grid: what each cell costs on this machine", command, describe(resolve_device(args.set.get("device", "auto"))))
    lines += [
        f"Each row trained {args.plan} steps (seed 0, {describe_precision('auto', resolve_device(args.set.get('device', 'auto')))}) and scored the whole "
        f"valid and test splits once; a cell of {args.epochs:g} epochs with {args.evals_per_epoch} validation(s) per epoch is projected from those "
        "rates (tokens/s: the last of the short run's train records, so warm-up is left out but the figure is one sample; early stopping makes a cell shorter, never longer).",
        "",
        "| row | tokens/s | steps per epoch | train min per epoch | validation + test s | hours per cell | hours for 3 seeds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    total = 0.0
    for name, preset, overrides in rows:
        mcfg, tcfg, per_epoch = configure(preset, overrides, 0, args, corpus)
        tcfg.max_steps, tcfg.warmup_steps, tcfg.eval_every, tcfg.eval_max_tokens = args.plan, 2, 0, 1000
        tcfg.out_dir = str(Path(args.runs_dir) / "plan" / slug(name))
        summary = train(mcfg, tcfg, corpus=corpus, progress=False)
        rates = [r["tokens_per_s"] for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if r["split"] == "train"]
        rate = statistics.median(rates[1:] or rates)
        model, _ = load_model(summary["run_dir"], tcfg.device)
        t0 = time.perf_counter()
        for split in (corpus.valid, corpus.test):
            evaluate(model, split, tcfg.eval_batch_size, stride=model.cfg.eval_stride, precision=tcfg.precision)
        eval_s = time.perf_counter() - t0
        epoch_s = per_epoch * tcfg.batch_size * mcfg.segment_len * tcfg.bptt_segments / rate
        cell_h = args.epochs * (epoch_s + args.evals_per_epoch * eval_s) / 3600
        total += 3 * cell_h
        lines.append(f"| {name} | {rate:,.0f} | {per_epoch:,} | {epoch_s / 60:.1f} | {eval_s:.0f} | {cell_h:.2f} | {3 * cell_h:.1f} |")
        print(lines[-1], flush=True)
    lines += [
        "",
        f"All rows above, 3 seeds each: {total:.0f} hours on this machine, one cell at a time. A projection from a short run: the hours "
        f"the finished cells took, on each machine, are in the Cells table of `{Path(args.out).name}`.",
    ]
    print(write_results(Path(args.out).with_name(f"{args.data}-plan.md"), lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(LABEL), default="ptb", help="the corpus (default ptb)")
    parser.add_argument("--data-dir", required=True, help="folder with the corpus's train, valid and test files")
    parser.add_argument("--epochs", type=float, default=10, help="the most epochs a cell trains (default 10)")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds: one cell per row and seed (default 0,1,2)")
    parser.add_argument("--evals-per-epoch", type=int, default=1, help="validations (with the test curve) per epoch (default 1)")
    parser.add_argument("--patience", type=int, default=3, help="stop a cell once valid loss has not improved for this many validations (default 3)")
    parser.add_argument("--tune", default="", metavar="P,P,...", help="first train each family's tuning row at these dropouts (seed 0)")
    parser.add_argument("--plan", type=int, default=0, metavar="STEPS", help="only time STEPS steps of each chosen row and write <data>-plan.md")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field in every row (repeatable)")
    parser.add_argument("--only", action="append", default=[], help="train only rows whose name contains this (repeatable)")
    parser.add_argument("--row", action="append", default=[], help="train only the row of exactly this name (repeatable; with --only: either)")
    parser.add_argument("--runs-dir", help="where the cells' checkpoints go (default runs/<data>-grid)")
    parser.add_argument("--out", help="the report (default docs/results/<data>.md); its finished cells go beside it, as .json")
    parser.add_argument("--fresh", action="store_true", help="forget finished cells and train every cell again")
    parser.add_argument(
        "--jobs", type=int, default=1, help="cells trained at once, each in its own process (default 1; several for a GPU that one small model leaves idle)"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if bad := [item for item in args.set if "=" not in item]:
        parser.error(f"--set {bad[0]!r}: give FIELD=VALUE, e.g. --set d_model=256")
    args.set = dict(parse_assignment(item) for item in args.set)  # apply_overrides checks each value's type
    if args.epochs <= 0 or args.patience < 1 or args.evals_per_epoch < 1 or args.jobs < 1:
        parser.error("--epochs must be > 0, and --patience, --evals-per-epoch and --jobs at least 1")
    if set(args.set) & set(REGULARISATION):
        parser.error("dropout is tuned per family (--tune P,P,...), not set for every row: drop --set dropout/emb_dropout")
    try:
        args.tune = [float(x) for x in args.tune.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--tune {args.tune!r}: give dropouts as comma-separated numbers, e.g. --tune 0,0.1,0.3")
    if any(not 0 <= x < 1 for x in args.tune):
        parser.error(f"--tune {args.tune}: a dropout lies in [0, 1)")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. --seeds 0,1,2")
    if not seeds:
        parser.error("--seeds is empty: give at least one seed, e.g. --seeds 0")
    names = [n for n, _, _ in GRID]
    if unknown := [r for r in args.row if r not in names] + [o for o in args.only if not any(o in n for n in names)]:
        parser.error(f"--row/--only {unknown[0]!r} names no row of the grid; the rows: " + "; ".join(names))
    args.out = args.out or str(ROOT / "docs" / "results" / f"{args.data}.md")
    args.runs_dir = args.runs_dir or f"runs/{args.data}-grid"  # a folder per corpus: a cell resumes only its own corpus's runs
    args.invocation = shlex.join(["python", "benchmarks/ptb.py", *sys.argv[1:]])
    argv = sys.argv[1:]
    whole = [
        a
        for i, a in enumerate(argv)
        if a not in ("--only", "--row") and (i == 0 or argv[i - 1] not in ("--only", "--row")) and not a.startswith(("--only=", "--row="))
    ]
    command = shlex.join(["python", "benchmarks/ptb.py", *whole])  # the whole grid: this invocation without --only

    mcfg, tcfg = load_preset(GRID[0][1])
    _, tcfg = apply_overrides(mcfg, tcfg, {**args.set, "data": args.data, "data_dir": args.data_dir})  # a bad --set fails here, before any cell
    chosen = [r for r in GRID if not (args.only or args.row) or r[0] in args.row or any(o in r[0] for o in args.only)]
    if args.tune and not args.plan and not any(n in TUNING_ROW.values() for n, _, _ in chosen):
        parser.error(f"--tune trains the tuning rows ({' and '.join(TUNING_ROW.values())}), and this --row/--only chose neither: add --row for one")
    corpus = load_corpus(tcfg)
    if args.plan:
        return plan(chosen, args, corpus, command)
    results_path = Path(args.out).with_suffix(".json")
    done = {} if args.fresh or not results_path.exists() else {key_of(c): c for c in json.loads(results_path.read_text()).values()}
    for c in done.values():
        c.setdefault("cells_at_once", 1)  # cells from before --jobs ran one at a time
    if recover_train_ppl(done):
        write_atomic(results_path, json.dumps(done, indent=1))

    def fill(cells: list[tuple[str, str, dict, float, int]]) -> None:
        todo = [cell for cell in cells if cell_key(cell[0], cell[3], cell[4], args.epochs) not in done]
        for key, finished in train_cells(todo, args, corpus):
            done[key] = finished
            write_atomic(results_path, json.dumps(done, indent=1))  # each cell kept as it finishes

    if args.tune:  # the tuning rows first: they fix p for the rest of the grid
        fill([(n, pr, ov, p, 0) for n, pr, ov in chosen if n in TUNING_ROW.values() for p in args.tune])
    choice = tuned(done, args)
    fill([(n, pr, ov, choice[family(pr)][0], seed) for n, pr, ov in chosen for seed in seeds])
    groups = {  # every seed finished at the family's p, not only this invocation's
        name: [c for c in done.values() if c["name"] == name and c["epochs_budget"] == args.epochs and c["model"]["dropout"] == choice[family(pr)][0]]
        for name, pr, _ in GRID
    }
    groups = {k: sorted(v, key=lambda c: c["seed"]) for k, v in groups.items() if v}
    if not groups:
        raise SystemExit("no finished cell at the tuned regularisation yet: train some (--row, --seeds) first")
    out = Path(args.out)
    print(write_results(out, report(groups, choice, args, command)))
    plot(groups, out.with_suffix(".png"), args)


if __name__ == "__main__":
    torch.manual_seed(0)
    try:
        main()
    except CRTError as e:  # bad data folder or config field: the one-line message, as the CLI gives it
        print(f"ptb.py: error: {e}", file=sys.stderr)
        sys.exit(2)
