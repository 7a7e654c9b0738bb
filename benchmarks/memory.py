"""How much does a memory hold, and for how long? Every memory model on the same axes.

    python benchmarks/memory.py                       # the default grid: ~1.5 h on 2 CPU cores without facts
    python benchmarks/memory.py --plan                # which cells exist, which are done, which are single-seed
    python benchmarks/memory.py --only crt-gru --tasks passkey --max-minutes 30
    python benchmarks/memory.py --set d_model=128 --set steps=3000 --set device=cuda --jobs 1

Each cell trains one model on one task (`crt.data.memory_tasks`, the document protocol: one
document per row, fresh state, loss on the answers) for the same number of steps, through the
same fixed-step curriculum: a warm-up where the answer sits close to its evidence, half the
distance, then the cell's distance (MQAR's gap -1 -> G/2 -> G, passkey's 4 -> D/2 -> D, facts'
text 32 -> L/2 -> L tokens). Test recall is scored on 200 fresh documents; the extrapolation
cells then score the trained model at 10x and 100x the distance, state carried.

Finished cells are appended to docs/results/memory-cells.jsonl (keyed by everything that defines
them: task, model, knobs, seed) and never trained again, so the grid fills over several runs;
--jobs N trains N cells at once (torch threads split between them). Writes docs/results/memory.md
and its plots from every finished cell of the current knobs.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime
import hashlib
import json
import multiprocessing
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CELLS = ROOT / "docs" / "results" / "memory-cells.jsonl"
PTB = ROOT.parent / "shared" / "data" / "ptb"

# Knobs --set may change: width and budget of every cell. A cell's key includes all of them.
KNOBS = dict(d_model=64, n_layer=2, n_head=4, d_ff=256, segment=16, steps=800, batch=32, train_docs=4000, eval_docs=200, device="cpu")

# Models: name -> model fields (beyond the knobs) and lr (that of its synthetic-* preset).
MODELS = {
    "crt-gru-64": (dict(arch="crt", memory_cell="gru", d_memory=64), 3e-3),
    "crt-gru-256": (dict(arch="crt", memory_cell="gru", d_memory=256), 3e-3),
    "crt-gru-1024": (dict(arch="crt", memory_cell="gru", d_memory=1024), 3e-3),
    "crt-ncgru-64": (dict(arch="crt", memory_cell="ncgru", d_memory=64), 3e-3),
    "crt-ncgru-256": (dict(arch="crt", memory_cell="ncgru", d_memory=256), 3e-3),
    "crt-ncgru-1024": (dict(arch="crt", memory_cell="ncgru", d_memory=1024), 3e-3),
    "rmt-4": (dict(arch="rmt", mem_tokens=4, positions="rotary"), 1e-3),
    "rmt-16": (dict(arch="rmt", mem_tokens=16, positions="rotary"), 1e-3),
    "armt": (dict(arch="armt", mem_tokens=4, assoc_floor=False), 3e-3),
    "xl": (dict(arch="transformer_xl"), 3e-3),  # mem_len = the segment
    "transformer": (dict(arch="transformer"), 3e-3),  # the floor: attention within a segment only
    "full": (dict(arch="transformer"), 3e-3),  # the ceiling: one segment as long as the document
}

# Tasks: name -> (data, fields). MQAR's pair sweep at G = 1 and gap sweep at P = 2 share (2, 1).
PAIRS, GAPS, MQAR_P, MQAR_G = (1, 2, 4, 8), (1, 2, 4, 8), 2, 1
TASKS = {
    **{f"mqar-p{p}-g{MQAR_G}": ("mqar", dict(mqar_pairs=p, mqar_gap=MQAR_G)) for p in PAIRS},
    **{f"mqar-p{MQAR_P}-g{g}": ("mqar", dict(mqar_pairs=MQAR_P, mqar_gap=g)) for g in GAPS},
    "passkey": ("passkey", dict(passkey_digits=4, passkey_distance=32)),  # two segments of 16
    "facts": ("facts", dict(facts_count=4, facts_length=128, facts_words=1000)),  # 8 segments of PTB text, its 1,000 commonest words; skipped without it
}
EXTRAPOLATE = {"passkey": "passkey_distance", f"mqar-p{MQAR_P}-g{MQAR_G}": "mqar_gap"}  # cells scored at 10x and 100x
SEEDS = {"passkey": (0, 1, 2)}  # other tasks: seed 0 only
# The 1024-wide memories cost ~10x a 64-wide one per step (the memory GRU steps through every
# token): at the default size they run the extrapolation cells and the largest P only, seed 0.
WIDE = {"crt-gru-1024", "crt-ncgru-1024"}
WIDE_TASKS = (*EXTRAPOLATE, f"mqar-p{PAIRS[-1]}-g{MQAR_G}")
CHANCE = {"mqar": lambda f: 2 / 32, "passkey": lambda f: 0.1, "facts": lambda f: 1 / 6}


def distance_field(data: str) -> str:
    return {"mqar": "mqar_gap", "passkey": "passkey_distance", "facts": "facts_length"}[data]


def curriculum(data: str, fields: dict) -> list[int]:
    """The distances of the three fixed-step stages: warm-up, half, the cell's own."""
    target = fields[distance_field(data)]
    first = {"mqar": -1, "passkey": 4, "facts": 32}[data]
    return sorted({first, max(first, target // 2), target})


def cell_key(task: str, model: str, knobs: dict, seed: int) -> str:
    spec = json.dumps([TASKS[task], MODELS[model], knobs, seed], sort_keys=True)
    return f"{task}/{model}/s{seed}/" + hashlib.sha256(spec.encode()).hexdigest()[:10]


def configs(task: str, model: str, knobs: dict, seed: int, runs: Path):
    from crt.config import ModelConfig, Stage, TrainConfig

    data, fields = TASKS[task]
    arch_fields, lr = MODELS[model]
    S = knobs["segment"]
    m = dict(
        d_model=knobs["d_model"],
        n_layer=knobs["n_layer"],
        n_head=knobs["n_head"],
        d_ff=knobs["d_ff"],
        segment_len=S,
        dropout=0.0,
        emb_dropout=0.0,
        **arch_fields,
    )
    if m["arch"] == "transformer_xl":
        m["mem_len"] = S
    t = TrainConfig(
        data=data,
        data_dir=str(PTB) if data == "facts" else "",
        protocol="document",
        loss="answers",
        task_segment=S,
        batch_size=knobs["batch"],
        bptt_segments=0,
        max_steps=knobs["steps"],
        lr=lr,
        min_lr=lr,
        warmup_steps=50,
        weight_decay=0.0,
        eval_every=0,
        eval_batch_size=100,
        log_every=50,
        seed=seed,
        synth_train_docs=knobs["train_docs"],
        synth_valid_docs=knobs["eval_docs"],
        synth_test_docs=knobs["eval_docs"],
        device=knobs["device"],
        out_dir=str(runs / cell_key(task, model, knobs, seed).replace("/", "-")),
        **fields,
    )
    dists = curriculum(data, fields)
    quarter = knobs["steps"] // 4
    steps = {1: [], 2: [2 * quarter], 3: [quarter, quarter]}[len(dists)]
    steps.append(knobs["steps"] - sum(steps))  # the last stage takes the rest
    stages = [Stage({distance_field(data): d}, n) for d, n in zip(dists, steps)]
    if model == "full":  # the whole document in one segment
        from crt.data.memory_tasks import facts_length_of, mqar_length, passkey_length

        m["segment_len"] = {
            "mqar": lambda: mqar_length(t.mqar_pairs, t.mqar_gap, S),
            "passkey": lambda: passkey_length(t.passkey_digits, t.passkey_distance),
            "facts": lambda: facts_length_of(t.facts_count, t.facts_length),
        }[data]()
    return ModelConfig(**m), t, stages


def _small(t, docs: int, **fields):
    import dataclasses

    return dataclasses.replace(t, synth_train_docs=docs, synth_valid_docs=docs, synth_test_docs=docs, **fields)


def carried_floats(model, model_name: str) -> int:
    """Floats a model carries across a segment boundary (one sequence): its state's size.
    The full-attention ceiling has no boundary; its number is the KV cache of one document."""
    cfg = model.cfg
    if model_name == "full":
        return 2 * cfg.n_layer * cfg.segment_len * cfg.d_model
    state = model.init_state(1)
    return sum(t.numel() for t in state if t.is_floating_point())


@torch.no_grad()
def recall_by_rank(model, docs) -> list[float]:
    """Recall of the i-th answer of every document (MQAR: the i-th query). A model that knows
    which values a document holds but not which key each belongs to scores 1/P on the first
    query and 1 on the last one, by elimination."""
    from crt.train.documents import document_batch, run_documents

    model.eval()
    device = next(model.parameters()).device
    hits = []
    for lo in range(0, len(docs), 50):
        inputs, targets, is_answer = (t.to(device) for t in document_batch(docs, torch.arange(lo, min(lo + 50, len(docs)))))
        pred = torch.cat([logits.argmax(-1) for _, logits in run_documents(model, inputs, model.cfg.segment_len, evaluation=True)], dim=1)  # [B, n]
        hits.append((pred == targets)[is_answer].view(inputs.shape[0], -1))  # [B, answers per document]
    return torch.cat(hits).float().mean(0).cpu().tolist()


def elimination_floor(pairs: int) -> float:
    """MQAR recall of a model that holds the set of values but no key-value binding: the i-th
    of P queries guesses among the P - i + 1 values not yet asked, so recall = H_P / P."""
    return sum(1 / i for i in range(1, pairs + 1)) / pairs


def run_cell(task: str, model_name: str, knobs: dict, seed: int, runs: str, threads: int) -> dict:
    """Train and score one cell (in a worker process); its record."""
    torch.set_num_threads(threads)
    from crt.analysis.machine import cpu_name
    from crt.data.load import load_corpus
    from crt.train.documents import evaluate_documents
    from crt.train.loop import train

    mcfg, tcfg, stages = configs(task, model_name, knobs, seed, Path(runs))
    log = Path(tcfg.out_dir + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        summary = train(mcfg, tcfg, stages, progress=False)
    wall = time.perf_counter() - start
    model, _ = load_trained(task, model_name, knobs, seed, Path(runs))
    data, fields = TASKS[task]
    record = {
        "key": cell_key(task, model_name, knobs, seed),
        "task": task,
        "data": data,
        "fields": fields,
        "model": model_name,
        "knobs": knobs,
        "seed": seed,
        "arch": mcfg.arch,
        "params": summary["params"],
        "state_floats": carried_floats(model, model_name),
        "steps": summary["step"],
        "stages": [s.changes for s in stages],
        "valid_recall": summary["valid_recall"],
        "test_recall": summary["test_recall"],
        "test_answers": summary["test_answers"],
        "chance": CHANCE[data](fields),
        "train_s": round(wall, 1),
        "machine": f"{cpu_name()}, {threads} torch threads",
        "torch": torch.__version__,
        "date": str(datetime.date.today()),
        "extrapolation": {},
    }
    if data == "mqar":
        record["recall_by_query"] = recall_by_rank(model, load_corpus(tcfg, mcfg.segment_len).documents["test"])
    if task in EXTRAPOLATE and model_name != "full":  # the ceiling's learned positions end at its training length
        name = EXTRAPOLATE[task]
        for factor in (10, 100):
            corpus = load_corpus(_small(tcfg, 100, **{name: fields[name] * factor}), mcfg.segment_len)
            r = evaluate_documents(model, corpus.documents["test"], 20)
            record["extrapolation"][str(factor)] = {"distance": fields[name] * factor, "recall": r["recall"], "answers": r["answers"]}
    return record


def load_trained(task: str, model_name: str, knobs: dict, seed: int, runs: Path):
    """The trained model of a finished cell, from its run folder, and its TrainConfig."""
    from crt.checkpoint import load_model

    _, tcfg, _ = configs(task, model_name, knobs, seed, runs)
    model, _ = load_model(tcfg.out_dir, tcfg.device)
    return model, tcfg


def rescore(cells: dict[str, dict], knobs: dict, runs: Path) -> None:
    """Add recall by query to finished MQAR cells that lack it (cells run before it was recorded)."""
    from crt.data.load import load_corpus

    for r in cells.values():
        if r["data"] == "mqar" and r["knobs"] == knobs and "recall_by_query" not in r:
            model, tcfg = load_trained(r["task"], r["model"], knobs, r["seed"], runs)
            r["recall_by_query"] = recall_by_rank(model, load_corpus(tcfg, model.cfg.segment_len).documents["test"])
            write_cells(cells)
            print(f"{r['task']:<14} {r['model']:<15} seed {r['seed']}: recall by query {[round(x, 3) for x in r['recall_by_query']]}", flush=True)


def read_cells() -> dict[str, dict]:
    if not CELLS.exists():
        return {}
    cells = {}
    for line in CELLS.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            cells[r["key"]] = r
    return cells


def write_cells(cells: dict[str, dict]) -> None:
    from crt.files import write_atomic

    write_atomic(CELLS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in cells.values()))


def plan(knobs: dict, only: list[str], tasks: list[str]) -> list[tuple[str, str, int]]:
    cells = []
    for task in TASKS:
        if tasks and not any(t in task for t in tasks):
            continue
        for seed in SEEDS.get(task, (0,)):
            for model in MODELS:
                if model in WIDE and (task not in WIDE_TASKS or seed > 0):
                    continue
                if not only or any(o in model for o in only):
                    cells.append((task, model, seed))
    # the extrapolation cells first, then seed 0 of every MQAR cell, then the extra seeds, then
    # facts (real text: a 1,000-word softmax), the 1024-wide memories (slower still) last
    first = [*EXTRAPOLATE, *TASKS]
    return sorted(cells, key=lambda c: (c[1] in WIDE, c[0] == "facts", c[2], first.index(c[0]), list(MODELS).index(c[1])))


# ---------------------------------------------------------------------------------------------
# report


def _mean(records: list[dict], key: str = "test_recall") -> tuple[float, float, int]:
    vals = [r[key] for r in records]
    mean = sum(vals) / len(vals)
    return mean, max(vals) - min(vals), len(vals)


def _plots(rows: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []

    def save(fig, name):
        tmp = out / f".{name}.tmp.png"
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(out / name)
        names.append(name)

    models = [m for m in MODELS if any(mm == m for (_, mm) in rows)]
    colour = {m: plt.cm.tab20(i) for i, m in enumerate(MODELS)}
    for axis, values, label, fname in (
        ("pairs", PAIRS, f"pairs P (gap G = {MQAR_G} segments)", "memory-pairs.png"),
        ("gaps", GAPS, f"gap G in whole segments (P = {MQAR_P} pairs)", "memory-distance.png"),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for model in models:
            tasks = [f"mqar-p{v}-g{MQAR_G}" if axis == "pairs" else f"mqar-p{MQAR_P}-g{v}" for v in values]
            pts = [(v, _mean(rows[(t, model)])[0]) for v, t in zip(values, tasks) if (t, model) in rows]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colour[model], label=f"{model} ({floats_text(rows, model)} floats)")
        ax.axhline(2 / 32, color="grey", ls=":", label="chance")
        if axis == "pairs":
            ax.plot(PAIRS, [elimination_floor(p) for p in PAIRS], color="black", ls="--", lw=1, label="values without keys (H_P / P)")
        else:
            ax.axhline(elimination_floor(MQAR_P), color="black", ls="--", lw=1, label="values without keys (H_P / P)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("test recall")
        ax.set_title("MQAR across segments")
        ax.legend(fontsize=7, ncol=2)
        save(fig, fname)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for p in PAIRS:
        pts = sorted(
            (max(rows[(f"mqar-p{p}-g{MQAR_G}", m)][0]["state_floats"], 1), _mean(rows[(f"mqar-p{p}-g{MQAR_G}", m)])[0])
            for m in models
            if (f"mqar-p{p}-g{MQAR_G}", m) in rows
        )
        if pts:
            ax.plot(*zip(*pts), marker="o", ls="--", label=f"P = {p}")
    ax.set_xscale("log")
    ax.set_xlabel("floats carried across a segment boundary (log; the segment Transformer's 0 drawn at 1)")
    ax.set_ylabel("test recall")
    ax.set_title(f"MQAR recall against state size (G = {MQAR_G}; Zoology's axis)")
    ax.legend(fontsize=8)
    save(fig, "memory-state.png")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, task in zip(axes, EXTRAPOLATE):
        for model in models:
            rs = rows.get((task, model), [])
            if rs and rs[0]["extrapolation"]:
                xs = [1, 10, 100]
                ys = [_mean(rs)[0]] + [sum(r["extrapolation"][str(f)]["recall"] for r in rs) / len(rs) for f in (10, 100)]
                ax.plot(xs, ys, marker="o", color=colour[model], label=f"{model} ({floats_text(rows, model)})")
        ax.set_xscale("log")
        ax.set_xlabel("evaluation distance / training distance")
        ax.set_ylabel("test recall")
        ax.set_title(task)
        ax.axhline(0.9, color="grey", ls=":")
        ax.axhline(0.5, color="grey", ls=":")
    axes[0].legend(fontsize=6)
    save(fig, "memory-extrapolation.png")
    return names


def floats_text(rows: dict, model: str) -> str:
    """The floats a model carries; for the full-attention ceiling the KV cache of one document, which depends on the task."""
    sizes = sorted({r["state_floats"] for (t, m), rs in rows.items() if m == model for r in rs})
    return f"{sizes[0]:,}" if len(sizes) == 1 else f"KV cache {sizes[0]:,}-{sizes[-1]:,}"


def facts_floors(knobs: dict) -> str:
    """What the fact task's text and answers give away without any memory: the share of the
    test questions whose answer is the commonest one (what one constant answer scores), and the
    <unk> share of the text with and without the word cap. Empty without PTB."""
    import collections
    import tempfile

    from crt.data import load_words
    from crt.data.load import load_corpus
    from crt.data.memory_tasks import most_frequent_words

    if not PTB.is_dir():
        return ""
    _, tcfg, _ = configs("facts", "transformer", knobs, 0, Path(tempfile.gettempdir()))
    docs = load_corpus(tcfg, knobs["segment"]).documents["test"]
    answers = collections.Counter(int(tokens[flags][0]) for tokens, flags in zip(docs.tokens, docs.answers, strict=True))
    common = max(answers.values())
    text = load_words(PTB)
    unk = text.vocab.stoi["<unk>"]
    capped = most_frequent_words(text, tcfg.facts_words)
    share = lambda corpus: float((corpus.train == corpus.vocab.stoi["<unk>"]).float().mean())  # noqa: E731
    return (
        f"Facts without a memory: the commonest answer is that of {common} of the {len(docs)} test questions, so one constant answer scores "
        f"{common / len(docs):.3f} (chance 1/6 = 0.167). `<unk>` is {share(capped):.1%} of the training text's tokens with the "
        f"{tcfg.facts_words:,} commonest words kept ({float((text.train == unk).float().mean()):.1%} in PTB as distributed)."
    )


def report(cells: dict[str, dict], knobs: dict, command: str) -> str:
    from crt.analysis.machine import describe
    from crt.analysis.results import header

    mine = [r for r in cells.values() if r["knobs"] == knobs]
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in mine:
        rows.setdefault((r["task"], r["model"]), []).append(r)
    out = CELLS.parent
    plots = _plots(rows, out) if rows else []
    grid = {cell_key(t, m, knobs, s) for t, m, s in plan(knobs, [], [])}
    done = [r for r in mine if r["key"] in grid]
    extra = len(mine) - len(done)
    machines = sorted({r["machine"] for r in mine})
    lines = [
        *header("Memory capacity: how much a memory holds, and for how long", command, f"{describe()} (this report); the cells ran on {'; '.join(machines)}"),
        f"Written from {len(done)} finished cells of the {len(grid)} in the grid (`docs/results/memory-cells.jsonl`; `--plan` lists the missing ones)"
        + (f" and {extra} kept cell{'s' * (extra > 1)} outside it, from an earlier grid, shown where they fall" if extra else "")
        + f"; {sum(r['train_s'] for r in done) / 60:.0f} cell-minutes of training for the grid's cells (two cells at a time with `--jobs 2`). "
        "What the numbers say, against Zoology's and the RMT/ARMT papers' findings: README, section Memory capacity; how the benchmark was made: `memory-notes.md`.",
        "",
        f"Every cell: width {knobs['d_model']}, {knobs['n_layer']} layers, {knobs['n_head']} heads, feed-forward {knobs['d_ff']}, segments of {knobs['segment']} tokens, "
        f"{knobs['steps']} steps of {knobs['batch']} documents ({knobs['train_docs']} training documents), loss on the answers, no dropout, constant lr after 50 warm-up steps "
        "(3e-3; RMT 1e-3, as its synthetic preset), a fixed-step curriculum (a quarter of the steps at a warm-up distance, a quarter at half the distance, "
        f"half at the cell's own), test recall on {knobs['eval_docs']} unseen documents. Single seed unless the cell says `n=3`: the spread is max - min over seeds.",
        "",
        "## Recall (test), chance in brackets",
        "",
        "| model | floats carried | " + " | ".join(t for t in TASKS) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in TASKS) + " |",
    ]
    for model in MODELS:
        have = [rows[(t, model)] for t in TASKS if (t, model) in rows]
        if not have:
            lines.append(f"| {model} | not run | " + " | ".join("" for _ in TASKS) + " |")
            continue
        cells_txt = []
        for t in TASKS:
            rs = rows.get((t, model))
            if not rs:
                cells_txt.append("–")
                continue
            mean, spread, n = _mean(rs)
            cells_txt.append(f"{mean:.2f}" + (f" ±{spread / 2:.2f} n={n}" if n > 1 else ""))
        lines.append(f"| {model} | {floats_text(rows, model)} | " + " | ".join(cells_txt) + " |")
    lines.append("| chance | | " + " | ".join(f"({CHANCE[TASKS[t][0]](TASKS[t][1]):.3f})" for t in TASKS) + " |")
    lines.append(
        "| values without keys (H_P / P) | | "
        + " | ".join(f"({elimination_floor(TASKS[t][1]['mqar_pairs']):.3f})" if TASKS[t][0] == "mqar" else "" for t in TASKS)
        + " |"
    )
    floors = facts_floors(knobs) if any(r["data"] == "facts" for r in mine) else ""
    lines += [
        *(["", floors] if floors else []),
        "",
        "MQAR's second floor: a model that has kept which values a document holds, but not which key each belongs to, answers the first of P "
        "queries with probability 1/P and the last one always, by elimination: recall H_P / P (0.75 at P = 2). Recall above it needs the key-value binding. "
        "Recall by query (first and last query of each document, test):",
        "",
        "| model | " + " | ".join(f"{t} first, last" for t in TASKS if TASKS[t][0] == "mqar") + " |",
        "| --- | " + " | ".join("---" for t in TASKS if TASKS[t][0] == "mqar") + " |",
    ]
    for model in MODELS:
        txt = []
        for t in (t for t in TASKS if TASKS[t][0] == "mqar"):
            rs = [r for r in rows.get((t, model), []) if "recall_by_query" in r]
            txt.append(f"{sum(r['recall_by_query'][0] for r in rs) / len(rs):.2f}, {sum(r['recall_by_query'][-1] for r in rs) / len(rs):.2f}" if rs else "–")
        if any(x != "–" for x in txt):
            lines.append(f"| {model} | " + " | ".join(txt) + " |")
    lines += [
        "",
        "## The capacity table",
        "",
        f"Largest P solved (test recall >= 0.9) at G = {MQAR_G}, largest G solved at P = {MQAR_P}, and where recall falls below 0.9 and 0.5 when the trained "
        "model reads 10x and 100x the training distance with its state carried (passkey D = 32 -> 320 -> 3,200 tokens; MQAR G = 1 -> 10 -> 100 segments). "
        "P values of 16 possible ones need at least 4P bits; `floats / pair` is the state size over the largest P solved. Since no model, full attention "
        f"included, binds keys to values at this budget (recall by query above), `G kept` is the largest G at which P = {MQAR_P} recall stays >= 0.7: "
        "the values are still held across G + 1 boundaries (the elimination floor is 0.75).",
        "",
        "| model | floats carried | largest P | floats / pair | largest G | G kept | passkey ×10, ×100 | MQAR ×10, ×100 | passkey below 0.9 / 0.5 at |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for model in MODELS:
        if not any(m == model for (_, m) in rows):
            continue
        state = next(r[0]["state_floats"] for (t, m), r in rows.items() if m == model)
        solved_p = [p for p in PAIRS if (f"mqar-p{p}-g{MQAR_G}", model) in rows and _mean(rows[(f"mqar-p{p}-g{MQAR_G}", model)])[0] >= 0.9]
        solved_g = [g for g in GAPS if (f"mqar-p{MQAR_P}-g{g}", model) in rows and _mean(rows[(f"mqar-p{MQAR_P}-g{g}", model)])[0] >= 0.9]
        run_p = [p for p in PAIRS if (f"mqar-p{p}-g{MQAR_G}", model) in rows]
        run_g = [g for g in GAPS if (f"mqar-p{MQAR_P}-g{g}", model) in rows]

        def extra(task):
            rs = rows.get((task, model))
            if not rs or not rs[0]["extrapolation"]:
                return "–"
            return ", ".join(f"{sum(r['extrapolation'][f]['recall'] for r in rs) / len(rs):.2f}" for f in ("10", "100"))

        def falls(task):
            rs = rows.get((task, model))
            if not rs or not rs[0]["extrapolation"]:
                return "–"
            curve = [(1, _mean(rs)[0])] + [(int(f), sum(r["extrapolation"][f]["recall"] for r in rs) / len(rs)) for f in ("10", "100")]
            where = [next((f"×{f}" for f, v in curve if v < th), "not by ×100") for th in (0.9, 0.5)]
            return " / ".join(where)

        lp = (max(solved_p) if solved_p else "none") if run_p else "–"
        lg = (max(solved_g) if solved_g else "none") if run_g else "–"
        kept = [g for g in run_g if _mean(rows[(f"mqar-p{MQAR_P}-g{g}", model)])[0] >= 0.7]
        kept_g = (max(kept) if kept else "none") if run_g else "–"
        per_pair = f"{state / max(solved_p):,.0f}" if solved_p and state and model != "full" else "–"
        lines.append(
            f"| {model} | {floats_text(rows, model)} | {lp} (of {run_p}) | {per_pair} | {lg} (of {run_g}) | {kept_g} | {extra('passkey')} | {extra(f'mqar-p{MQAR_P}-g{MQAR_G}')} | {falls('passkey')} |"
        )
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE", help=f"change a knob of every cell (repeatable): {', '.join(KNOBS)}")
    parser.add_argument("--only", action="append", default=[], help="models whose name contains this (repeatable)")
    parser.add_argument("--tasks", action="append", default=[], help="tasks whose name contains this (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="cells trained at once (torch threads are split between them)")
    parser.add_argument("--max-minutes", type=float, default=0, help="start no new cell after this many minutes (finished cells are kept); 0: no limit")
    parser.add_argument("--plan", action="store_true", help="list the cells, done or not, and exit")
    parser.add_argument("--runs-dir", default="runs/memory-bench")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the finished cells")
    parser.add_argument("--rescore", action="store_true", help="add recall by query to finished MQAR cells that lack it (needs their run folders)")
    args = parser.parse_args()
    knobs = dict(KNOBS)
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in KNOBS:
            parser.error(f"unknown knob {name!r}: use one of {', '.join(KNOBS)}")
        knobs[name] = type(KNOBS[name])(value)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    cells = read_cells()
    todo = [c for c in plan(knobs, args.only, args.tasks) if cell_key(c[0], c[1], knobs, c[2]) not in cells]
    blocked = [c for c in todo if c[0] == "facts" and not PTB.is_dir()]
    if blocked:
        print(f"{len(blocked)} facts cells cannot run: no PTB text at {PTB} (`crt data download ptb --dir {PTB}`)", file=sys.stderr)
        todo = [c for c in todo if c not in blocked]
    if args.plan:
        for task, model, seed in plan(knobs, args.only, args.tasks):
            done = "done" if cell_key(task, model, knobs, seed) in cells else "needs PTB" if (task, model, seed) in blocked else "todo"
            print(f"{done}  {task:<14} {model:<15} seed {seed}{'' if task in SEEDS and model not in WIDE else '  (single seed)'}")
        print(f"{len(todo)} to run")
        return
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if knobs["device"] == "cpu" else 1
    started = time.monotonic()
    if not args.report_only and todo:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            pending: dict = {}
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < args.jobs and not (args.max_minutes and time.monotonic() - started > 60 * args.max_minutes):
                    task, model, seed = queue.pop(0)
                    pending[pool.submit(run_cell, task, model, knobs, seed, args.runs_dir, threads)] = (task, model, seed)
                if not pending:
                    break
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    task, model, seed = pending.pop(fut)
                    r = fut.result()
                    cells[r["key"]] = r
                    write_cells(cells)
                    print(
                        f"{task:<14} {model:<15} seed {seed}: test recall {r['test_recall']:.3f} (chance {r['chance']:.3f}), "
                        f"{r['state_floats']:,} floats, {r['train_s']:.0f} s",
                        flush=True,
                    )
    if args.rescore:
        rescore(cells, knobs, Path(args.runs_dir))
    from crt.analysis.results import write_results

    whole = [a for a in sys.argv[1:] if a not in ("--report-only", "--rescore")]
    text = report(cells, knobs, shlex.join(["python", "benchmarks/memory.py", *[a for a in whole if not a.startswith("--max-minutes")]]))
    write_results(CELLS.parent / "memory.md", text.split("\n"))
    print(f"written to {CELLS.parent / 'memory.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
