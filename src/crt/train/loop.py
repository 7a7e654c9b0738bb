"""The training loop: truncated BPTT over K segments, AdamW, warmup + cosine, checkpoints."""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from crt.checkpoint import Checkpoint, save_checkpoint
from crt.config import ModelConfig, Stage, TrainConfig, stage_config, stages_from_list, stages_to_list, to_dict
from crt.data import Corpus, batchify
from crt.data.load import load_corpus
from crt.data.tokenizer import from_meta as tokenizer_from_meta
from crt.errors import CRTError
from crt.models import VIDEO_ARCHS, build_model
from crt.runtime import autocast, describe_precision, keep_freed_memory, resolve_device
from crt.state import detach
from crt.train.distributed import (
    Micro,
    all_reduce_sum,
    anchor,
    broadcast_from_main,
    describe_processes,
    drop_unused_grads,
    gather_to_main,
    join,
    micro_rows,
    on_main,
    reached,
    replicate,
    seed_process,
    world,
)
from crt.train.documents import document_batch, document_loss, evaluate_documents
from crt.train.evaluate import IGNORE, evaluate
from crt.train.metrics import plot_curves
from crt.train.rundir import FollowerRun, RunFolder
from crt.train.segments import training_window, window_loss


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, norms, gains or m_0)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


# Training fields a resumed run keeps: they decide its data, its batches and its carried state.
FIXED_ON_RESUME = (
    "task",
    "data",
    "tokenizer",
    "seed",
    "batch_size",
    "protocol",
    "synth_pairs",
    "synth_keys",
    "synth_values",
    "synth_filler",
    "synth_filler_vocab",
    "synth_query_rounds",
    "synth_train_docs",
    "synth_valid_docs",
    "synth_test_docs",
    "task_segment",
    "mqar_pairs",
    "mqar_gap",
    "mqar_vocab",
    "passkey_digits",
    "passkey_distance",
    "facts_count",
    "facts_length",
    "facts_words",
    "video_normalise",
    "video_motion",
    "video_size",
    "video_protocol",
    "video_classes",
    "video_noise",
)


def _check_unchanged(tcfg: TrainConfig, resume: Checkpoint) -> None:
    was = resume.train_config(in_stage=False)
    for name in FIXED_ON_RESUME:
        if getattr(tcfg, name) != getattr(was, name):
            raise CRTError(
                f"--{name.replace('_', '-')} {getattr(tcfg, name)} differs from the run's {getattr(was, name)}: a resumed run keeps its data, "
                f"batches and carried state, which depend on it; resume without it, or start a new run"
            )


_TRAINER_KEYS = {"optimizer": dict, "scheduler": dict, "step": int, "tokens_seen": int, "rng": dict, "stage": int, "stage_start": int}


def _check_trainer(trainer: Any, path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, its keys and their types checked (a valid pickle of
    the wrong content is a damaged checkpoint, not a KeyError later)."""
    if not isinstance(trainer, dict):
        raise CRTError(f"{path / 'trainer.pt'} holds a {type(trainer).__name__}, not a trainer state: the checkpoint is damaged; use another")
    trainer = {"stage": 0, "stage_start": 0, **trainer}  # written before curricula existed: one stage
    wrong = sorted(k for k, typ in _TRAINER_KEYS.items() if not isinstance(trainer.get(k), typ) or isinstance(trainer.get(k), bool))
    if wrong:
        raise CRTError(f"{path / 'trainer.pt'} lacks or mangles {wrong}: the checkpoint is damaged; use another")
    return trainer


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LMTask:
    """What the training loop needs to train a language model: one step's loss, validation
    perplexity and recall, what a checkpoint records. Two protocols (SPEC §8) share it:
    `StreamTask` and `DocumentTask`; `make_task` picks one."""

    unit = "tokens"
    valid_key, valid_label = "ppl", "perplexity"

    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device, corpus: Corpus | None = None):
        if mcfg.arch in VIDEO_ARCHS:
            raise CRTError(f"{mcfg.arch} classifies frame sequences: train it with --task video")
        if tcfg.loss not in ("all", "answers"):
            raise CRTError(f"unknown loss {tcfg.loss!r}: use all (every token) or answers (the answer tokens the task marks)")
        self.tcfg, self.device = tcfg, device
        self.corpus = corpus = corpus or load_corpus(tcfg, mcfg.segment_len, mcfg.vocab_size)
        if tcfg.loss == "answers" and not corpus.answers:
            raise CRTError(f"--loss answers needs a task that marks its answers, and {corpus.name} marks none: use --loss all")
        for split, n in corpus.unk_mapped.items() if world().main else ():
            print(f"{n:,} {split} tokens unseen in train were mapped to <unk>", flush=True)
        if (corpus.tokenizer.kind != "word" or tcfg.tokenizer != "auto") and world().main:
            print(f"tokenizer: {corpus.tokenizer.describe()} (--tokenizer {tcfg.tokenizer})", flush=True)
        if world().size > 1 and broadcast_from_main(corpus.tokenizer.to_meta()) != corpus.tokenizer.to_meta():
            raise CRTError(
                f"rank {world().rank} built another {corpus.tokenizer.kind} tokenizer than rank 0 from the same text: give every process the same files"
            )
        self.mcfg = dataclasses.replace(mcfg, vocab_size=len(corpus.vocab)).validate()
        self.meta = {"vocab": corpus.tokenizer.labels(), "tokenizer": corpus.tokenizer.to_meta(), "data": corpus.name}

    def check_resume(self, meta: dict[str, Any], path: Path) -> None:
        if tokenizer_from_meta(meta) != self.corpus.tokenizer:
            raise CRTError(f"checkpoint {path} was trained with another vocabulary than {self.tcfg.data} {self.tcfg.data_dir}: resume on the same data")

    def test(self, model: nn.Module) -> dict[str, float] | None:
        """Test scores at the end of a run, for tasks that mark answers (memory tasks); else None."""
        return self.score(model, "test") if self.corpus.answers else None

    @staticmethod
    def describe(r: dict[str, float]) -> str:
        recall = f"  recall {r['recall']:.3f} of {r['answers']:,} answers (their loss {r['answer_loss']:.3f})" if not math.isnan(r["recall"]) else ""
        bpb = f"  bpb {r['bpb']:.4f}" if not math.isnan(r["bpb"]) else ""
        return f"loss {r['loss']:.4f}  ppl {r['ppl']:.2f}" + bpb + recall

    @staticmethod
    def train_record(avg_loss: float) -> dict[str, float]:
        return {"ppl": math.exp(min(avg_loss, 700.0))}

    @staticmethod
    def summary(r: dict[str, float], prefix: str = "valid") -> dict[str, Any]:
        return {f"{prefix}_loss": r["loss"], f"{prefix}_ppl": r["ppl"], f"{prefix}_recall": r["recall"], f"{prefix}_answers": r["answers"]}


class StreamTask(LMTask):
    """The stream protocol: the next window of K segments of the batchified training stream,
    the state carried from window to window and restarted each epoch; evaluation streams the
    whole split with the state carried.

    This process trains its micro-batches of the global batch (`crt.train.distributed`): groups
    of contiguous rows, each with its own carried state, the same rows at any world size."""

    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device, corpus: Corpus | None = None):
        super().__init__(mcfg, tcfg, device, corpus)
        B, K, L = tcfg.batch_size, tcfg.bptt_segments, self.mcfg.segment_len
        if K < 1:
            raise CRTError(f"bptt_segments={K}: the stream protocol needs K >= 1 segments per update (0 means a whole document, under --protocol document)")
        stream = batchify(self.corpus.train, B)  # [B, n]
        marks = batchify(self.corpus.answers["train"], B) if tcfg.loss == "answers" else None  # [B, n]
        self.rows = micro_rows(B, tcfg.grad_accum)
        self.streams = [stream[r].to(device) for r in self.rows]  # per micro-batch [b, n]
        self.marks = [marks[r].to(device) for r in self.rows] if marks is not None else None
        self.window = K * L
        self.n_windows = (stream.shape[1] - 1) // self.window
        if self.n_windows < 1:
            raise CRTError(
                f"the training split ({len(self.corpus.train)} tokens) is too short for batch_size * bptt_segments * segment_len = {B * self.window}: lower one of them"
            )

    def start(self, model: nn.Module) -> None:
        self.states = [model.init_state(r.stop - r.start) for r in self.rows]

    def load(self, trainer: dict[str, Any]) -> None:
        """The carried state of every row of the global batch [B, ...], this process's rows taken."""
        whole = trainer["state"]
        self.states = [type(self.states[0])(*(t[r].to(self.device) for t in whole)) for r in self.rows]

    def dump(self) -> dict[str, Any]:
        """The carried state of every row of the global batch, in row order (on rank 0; collective)."""
        mine = [torch.cat(parts) for parts in zip(*([t.detach().cpu() for t in s] for s in self.states))]
        ranks = gather_to_main(mine)
        return {"state": [torch.cat(parts) for parts in zip(*ranks)]} if ranks is not None else {}

    def micro_batches(self, model: nn.Module, step: int) -> list[Micro]:
        w = step % self.n_windows
        if w == 0 and step > 0:
            self.start(model)  # a new epoch starts the streams over
        out = []
        for a, stream in enumerate(self.streams):
            x, y = training_window(stream, w, self.window)  # [b, K*L] each
            scored = training_window(self.marks[a], w, self.window)[1] if self.marks is not None else None  # [b, K*L]: targets that are answers

            def run(total: int, a=a, x=x, y=y, scored=scored) -> torch.Tensor:
                loss, self.states[a] = window_loss(model, x, y, self.states[a], self.mcfg.segment_len, self.tcfg.bptt_segments, scored, total=total)
                return loss

            out.append(Micro(int(scored.sum()) if scored is not None else y.numel(), x.numel(), run))
        return out

    def after_step(self) -> None:
        self.states = [detach(s) for s in self.states]

    def score(self, model: nn.Module, split: str, max_tokens: int = 0) -> dict[str, float]:
        t = self.tcfg
        return evaluate(
            model,
            self.corpus.split(split),
            t.eval_batch_size,
            answers=self.corpus.answers.get(split),
            precision=t.precision,
            max_tokens=max_tokens,
            token_bytes=self.corpus.token_bytes,
        )

    def validate(self, model: nn.Module) -> dict[str, float]:
        return self.score(model, "valid", self.tcfg.eval_max_tokens)


class DocumentTask(LMTask):
    """The document protocol (`crt.train.documents`): each step a batch of training documents,
    one per row, each from a fresh state with its segment grid at its first token; every epoch
    a fresh permutation (seeded by seed and epoch, so a resumed run draws the same batches)."""

    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device, corpus: Corpus | None = None):
        super().__init__(mcfg, tcfg, device, corpus)
        if not self.corpus.documents:
            raise CRTError(f"--protocol document needs a corpus of separate documents, and {self.corpus.name} is running text: use --protocol stream")
        self.docs = self.corpus.documents["train"]
        self.per_epoch = len(self.docs) // tcfg.batch_size
        if self.per_epoch < 1:
            raise CRTError(f"batch_size={tcfg.batch_size} exceeds the {len(self.docs)} training documents: lower --batch-size or raise the document count")

    def start(self, model: nn.Module) -> None:
        pass  # every document starts from init_state: nothing is carried between steps

    def load(self, trainer: dict[str, Any]) -> None:
        pass

    def dump(self) -> dict[str, Any]:
        return {}

    def micro_batches(self, model: nn.Module, step: int) -> list[Micro]:
        """The global batch is the step's slice of this epoch's permutation, the same at any world
        size; this process takes its micro-batches of it (a distributed sampler over whole batches)."""
        t = self.tcfg
        epoch, i = divmod(step, self.per_epoch)
        order = torch.randperm(len(self.docs), generator=torch.Generator().manual_seed(t.seed * 100_003 + epoch))
        batch = order[i * t.batch_size : (i + 1) * t.batch_size]
        out = []
        for rows in micro_rows(t.batch_size, t.grad_accum):
            inputs, targets, is_answer = (x.to(self.device) for x in document_batch(self.docs, batch[rows]))
            inside = targets.ne(IGNORE)  # [b, n]
            count = int((inside & is_answer).sum()) if t.loss == "answers" else int(inside.sum())

            def run(total: int, inputs=inputs, targets=targets, is_answer=is_answer) -> torch.Tensor:
                return document_loss(model, inputs, targets, is_answer, self.mcfg.segment_len, t.bptt_segments, t.loss, total=total)[0]

            out.append(Micro(count, int(inside.sum()), run))
        return out

    def after_step(self) -> None:
        pass

    def score(self, model: nn.Module, split: str) -> dict[str, float]:
        return evaluate_documents(model, self.corpus.documents[split], self.tcfg.eval_batch_size, precision=self.tcfg.precision)

    def validate(self, model: nn.Module) -> dict[str, float]:
        return self.score(model, "valid")


def resolve_protocol(tcfg: TrainConfig, corpus: Corpus) -> str:
    """`tcfg.protocol` with auto resolved: document for a corpus of documents, else stream."""
    if tcfg.protocol not in ("auto", "stream", "document"):
        raise CRTError(f"unknown protocol {tcfg.protocol!r}: use auto, stream or document")
    if tcfg.protocol == "auto":
        return "document" if corpus.documents else "stream"
    return tcfg.protocol


def make_task(mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device, data=None):
    """The task object `tcfg` names: StreamTask or DocumentTask (language models), or VideoTask."""
    if tcfg.task == "lm":
        if mcfg.arch in VIDEO_ARCHS:
            raise CRTError(f"{mcfg.arch} classifies frame sequences: train it with --task video")
        corpus = data or load_corpus(tcfg, mcfg.segment_len, mcfg.vocab_size)
        return (DocumentTask if resolve_protocol(tcfg, corpus) == "document" else StreamTask)(mcfg, tcfg, device, corpus)
    if tcfg.task == "video":
        from crt.train.video import VideoTask

        return VideoTask(mcfg, tcfg, device, data)
    raise CRTError(f"unknown task {tcfg.task!r}: use lm or video")


def _silent(*args, **kwargs) -> None:
    """print() on the ranks that do not print (every rank but 0)."""


def train(
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    stages: list[Stage] | None = None,
    resume: Checkpoint | None = None,
    corpus: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one model through its curriculum; return a summary (run_dir, params, steps, the
    task's validation scores, test scores for tasks that mark answers, and elapsed_s: the run's
    wall seconds, over all its resumes, not counting steps an interruption made it redo).

    stages: the curriculum (`crt.config.load_curriculum`, with the user's explicit fields taken
        out by `without_fields`); None or []: one plain stage of max_steps. When resuming, None
        takes the stages recorded in the checkpoint. `max_steps` caps the whole run.
    resume: continue a checkpoint's run so that the loss trajectory equals that of an
        uninterrupted run, in the stage it had reached. The fields in FIXED_ON_RESUME must not
        change. In the run's own folder, unless tcfg.out_dir differs from the run's: then in
        that new folder (`crt.train.rundir.RunFolder`), the original left as it was.
    corpus: the data of the first stage, if already loaded (a Corpus for task lm, VideoData for
        task video; else from tcfg).
    progress: a tqdm bar on a terminal (tqdm leaves it out when stderr is not one).

    Summary["curriculum"]: stages (count), reached (1-based), passed (False when a stage ran out
    of steps before its condition held), message. Scores are on the last stage's data.
    """
    started = time.perf_counter()  # wall time of the run; a resume adds the seconds its checkpoint had run
    tcfg.validate()
    if stages is None:
        stages = stages_from_list(resume.meta.get("stages", [])) if resume is not None else []
    for i, s in enumerate(stages):
        try:
            stage_config(tcfg, stages, i).validate()
        except CRTError as e:
            raise CRTError(f"stage {i + 1} ({s.label}): {e}") from None
    if tcfg.patience and stages:
        raise CRTError(
            f"--patience {tcfg.patience} stops a run without a curriculum, and this one has {len(stages)} stages: add --no-stages, or let each stage's advance condition end it"
        )
    device = join(resolve_device(tcfg.device))
    w = world()
    if device.type == "cpu":
        keep_freed_memory()
    say = print if w.main else _silent  # rank 0 alone prints, logs and writes
    stage, stage_start = 0, 0
    if resume is not None:
        _check_unchanged(tcfg, resume)
        trainer = _check_trainer(resume.load_trainer(), resume.path)
        stage, stage_start = trainer["stage"], trainer["stage_start"]
        if stage >= max(1, len(stages)):
            raise CRTError(
                f"checkpoint {resume.path} is in stage {stage + 1}, but the run has {len(stages)} stages: resume with the curriculum it was trained with"
            )
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    base = tcfg
    tcfg = stage_config(base, stages, stage)
    task = make_task(mcfg, tcfg, device, corpus if stage == 0 else None)
    if resume is not None:
        task.check_resume(resume.meta, resume.path)
    mcfg = task.mcfg
    module = build_model(mcfg).to(device)  # the same initial weights on every rank (same seed; DDP checks)
    seed_process(tcfg.seed, w.rank)
    model = replicate(module, device)  # what the losses call; `module` is what is scored and saved
    say(describe_precision(tcfg.precision, device) + describe_processes(model), flush=True)
    optimizer = make_optimizer(module, base)
    params = [p for p in module.parameters() if p.requires_grad]
    # read at every step: a stage may change lr, min_lr or warmup_steps (`tcfg` is rebound when it starts)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, tcfg) / base.lr)

    step, tokens_seen = 0, 0
    # the loss, tokens, seconds and steps since the last train record: saved with a checkpoint,
    # so the first record after a resume averages the same steps as an uninterrupted run's
    interval_loss, interval_tokens, interval_time, interval_steps = 0.0, 0, 0.0, 0
    best_loss, since_best = math.inf, 0  # early stopping (--patience): the best valid loss, validations since it
    task.start(model)
    if resume is not None:
        resume.load_weights(module)
        try:
            optimizer.load_state_dict(trainer["optimizer"])
            scheduler.load_state_dict(trainer["scheduler"])
            task.load(trainer)
            saved_world = trainer.get("world", 1)
            if saved_world == w.size:
                _set_rng_state(trainer["rank_rng"][w.rank] if w.rank else trainer["rng"])
            else:
                if w.rank == 0:
                    _set_rng_state(trainer["rng"])
                say(
                    f"crt: warning: {resume.path} was written by {saved_world} process{'es' if saved_world > 1 else ''} and resumes on {w.size}: "
                    "the carried state and the data position continue exactly (they belong to the rows of the global batch, not to a process), "
                    "but the other ranks' random streams (dropout) start afresh, so the run is not bit-identical to one that kept its world size",
                    file=sys.stderr,
                    flush=True,
                )
            interval_loss, interval_tokens, interval_time, interval_steps = trainer.get("interval", (0.0, 0, 0.0, 0))
            best_loss, since_best = trainer.get("early", (math.inf, 0))
            started -= trainer.get("elapsed_s", 0.0)  # work redone after an interruption counts once
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CRTError(
                f"{resume.path / 'trainer.pt'} does not hold this run's trainer state ({type(e).__name__}: {str(e).splitlines()[0][:120]}): the checkpoint is damaged; use another"
            ) from None
        step, tokens_seen = trainer["step"], trainer["tokens_seen"]
    run = on_main(lambda: RunFolder.open(base, resume, step)) or FollowerRun()  # rank 0 claims the folder; its failure is every rank's
    run.path = run_dir = broadcast_from_main(run.path)
    metrics = run.metrics
    meta = {"model": to_dict(mcfg), "train": to_dict(base), "stages": stages_to_list(stages), **task.meta}
    n_params = count_parameters(module)
    n_stages = max(1, len(stages))

    def save() -> None:
        """A checkpoint of the whole run (collective: every rank's carried state and random
        streams are gathered; rank 0 writes it, atomically)."""
        rank_rng = gather_to_main(_rng_state())
        dumped = task.dump()
        on_main(lambda: write_checkpoint(rank_rng, dumped))

    def write_checkpoint(rank_rng: list, dumped: dict) -> None:
        trainer = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "tokens_seen": tokens_seen,
            "rng": rank_rng[0],
            "world": w.size,
            "rank_rng": rank_rng,
            "stage": stage,
            "stage_start": stage_start,
            "ended": status if decided else None,
            "interval": (interval_loss, interval_tokens, interval_time, interval_steps),
            "early": (best_loss, since_best),
            "elapsed_s": time.perf_counter() - started,
            **dumped,
        }
        run.saved = True
        save_checkpoint(run_dir, step, module, {**meta, "stage": stage}, trainer, keep=tcfg.keep_checkpoints)

    def validate() -> dict[str, float]:
        result = task.validate(module)
        metrics.log({"step": step, "split": "valid", "stage": stage + 1, **result})
        if tcfg.eval_test and tcfg.task == "lm":
            metrics.log({"step": step, "split": "test", "stage": stage + 1, **task.score(module, "test")})
        return result

    def capped() -> bool:
        return step >= base.max_steps or (base.max_tokens > 0 and tokens_seen >= base.max_tokens)

    def stage_label() -> str:
        return f"stage {stage + 1} of {n_stages} ({stages[stage].label})" if stages else "training"

    with run:  # on an error before the first checkpoint, a new run folder is removed again
        if stages:
            verb = "resuming" if step > stage_start else "from"
            say(f"-- {stage_label()}, {verb} step {step + 1}" + (f", until valid {stages[stage].advance}" if stages[stage].advance else ""), flush=True)
        model.train()
        bar = tqdm(total=base.max_steps, initial=step, disable=None if progress and w.main else True, desc=run_dir.name, dynamic_ncols=True)
        write = bar.write if w.main else _silent
        last_valid: dict[str, float] = {}
        status = {"passed": True, "message": ""}
        finished = capped()
        decided = False  # the run ended itself (its curriculum passed or failed, or --patience stopped it); not a --max-steps cap
        if resume is not None and trainer.get("ended"):  # it had already passed or failed: report it again
            status, finished, decided = trainer["ended"], True, True
        elif finished and stages:
            status = {"passed": False, "message": f"stopped at max_steps = {base.max_steps} in {stage_label()}: the curriculum was not completed"}
        while not finished:
            t0 = time.perf_counter()
            micros = task.micro_batches(model, step)
            # the global count of targets the step's mean divides by, and of tokens trained on
            total, n_items = (int(v) for v in all_reduce_sum([sum(m.count for m in micros), sum(m.tokens for m in micros)]))
            optimizer.zero_grad(set_to_none=True)
            step_loss, used = 0.0, [False] * len(params)
            for a, micro in enumerate(micros):
                last = a == len(micros) - 1
                # DDP averages the gradients of the processes, so each loss is scaled by the world size;
                # only the last micro-batch's backward reduces them (the others accumulate locally)
                with nullcontext() if last or w.size == 1 else model.no_sync():
                    with autocast(device, tcfg.precision):
                        loss = micro.run(max(total, 1))
                    step_loss += loss.item()
                    loss = loss * w.size
                    if w.size > 1:
                        here = reached(loss, params)
                        used = [u or h for u, h in zip(used, here)]
                        if last:
                            loss = loss + anchor(params, here)
                    loss.backward()
            # the global batch's mean loss, the same on every rank, and the parameters any rank used
            step_loss, *used = all_reduce_sum([step_loss, *used] if w.size > 1 else [step_loss])
            if not math.isfinite(step_loss):
                bar.close()
                kept = (
                    f"the checkpoints in {run_dir} are intact"
                    if run.saved or not run.claimed
                    else "no checkpoint had been saved, so the new run folder was removed"
                )
                raise CRTError(f"the training loss became {step_loss} at step {step + 1}: lower --lr or use --precision fp32; {kept}")
            if w.size > 1:
                drop_unused_grads(params, used)
            if tcfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(module.parameters(), tcfg.grad_clip)
            optimizer.step()
            scheduler.step()
            task.after_step()
            step += 1
            tokens_seen += n_items
            interval_loss += step_loss
            interval_tokens += n_items
            interval_steps += 1
            interval_time += time.perf_counter() - t0
            bar.update(1)
            limit = stages[stage].steps if stages else base.max_steps
            stage_over = step - stage_start >= limit
            if step % tcfg.log_every == 0 or capped() or stage_over:
                avg = interval_loss / interval_steps
                rate = interval_tokens / max(interval_time, 1e-9)
                extra = task.train_record(avg)
                metrics.log(
                    {
                        "step": step,
                        "split": "train",
                        "loss": avg,
                        **extra,
                        "lr": scheduler.get_last_lr()[0],
                        f"{task.unit}_per_s": rate,
                        f"{task.unit}_seen": tokens_seen,
                    }
                )
                bar.set_postfix(loss=f"{avg:.3f}", **{k: f"{v:.1f}" for k, v in extra.items()}, **{f"{task.unit[:3]}_s": f"{rate:,.0f}"})
                interval_loss, interval_tokens, interval_time, interval_steps = 0.0, 0, 0.0, 0
            at_eval = tcfg.eval_every > 0 and step % tcfg.eval_every == 0
            if at_eval or capped() or stage_over:
                last_valid = validate()
                write(f"step {step}: valid {task.describe(last_valid)}")
                best_loss, since_best = (last_valid["loss"], 0) if last_valid["loss"] < best_loss else (best_loss, since_best + 1)
                if tcfg.patience and since_best >= tcfg.patience and not capped():
                    status = {
                        "passed": True,
                        "message": f"stopped early at step {step}: valid loss has not improved on {best_loss:.4f} for {since_best} validations (--patience)",
                    }
                    finished = decided = True  # recorded: a resume reports it again rather than train on
            # the curriculum: pass on the measured condition, fail at the step limit
            condition = stages[stage].advance if stages else ""
            passed = bool(condition) and (at_eval or stage_over or capped()) and stages[stage].passed(last_valid)
            switched = False
            if passed or stage_over:
                if condition and not passed:
                    metric = condition.split()[0]
                    status = {
                        "passed": False,
                        "message": (
                            f"{stage_label()} failed: valid {metric} {last_valid[metric]:.3f} did not reach {condition.split(None, 1)[1]} "
                            f"within its {limit} steps; give the stage more steps (its `steps` in the preset) or change --lr"
                        ),
                    }
                    finished = decided = True
                elif stage + 1 < len(stages):
                    why = f"valid {condition} held" if passed else f"its {limit} steps are done"
                    stage, stage_start, switched = stage + 1, step, True
                    tcfg = stage_config(base, stages, stage)
                    task = make_task(mcfg, tcfg, device)
                    task.start(model)
                    write(f"-- {stage_label()}, from step {step + 1}: {why}" + (f"; until valid {stages[stage].advance}" if stages[stage].advance else ""))
                    metrics.log({"step": step, "split": "stage", "stage": stage + 1, "label": stages[stage].label})
                    last_valid = {}
                else:
                    finished, decided = True, bool(stages)
            if capped() and not finished:
                if stages:
                    status = {"passed": False, "message": f"stopped at max_steps = {base.max_steps} in {stage_label()}: the curriculum was not completed"}
                finished = True
            if at_eval or finished or switched or (tcfg.checkpoint_every > 0 and step % tcfg.checkpoint_every == 0):
                save()  # a checkpoint at a stage boundary starts the next stage
        bar.close()
        if status["message"]:
            say(f"crt: {status['message']}", file=sys.stderr, flush=True)
        # scores on the last stage's data, whichever stage the run ended in
        final = task if stage == len(stages) - 1 or not stages else make_task(mcfg, stage_config(base, stages, len(stages) - 1), device)
        if not last_valid or final is not task:
            last_valid = final.validate(module)
        test = final.test(module)
        if w.main:
            plot_curves(metrics.path, run_dir / "curves.png", title=f"{mcfg.arch} on {meta['data']}", valid_key=task.valid_key, valid_label=task.valid_label)
    return {
        "run_dir": str(run_dir),
        "arch": mcfg.arch,
        "params": n_params,
        "step": step,
        "tokens_seen": tokens_seen,
        "elapsed_s": time.perf_counter() - started,
        **task.summary(last_valid),
        **(task.summary(test, "test") if test else {}),
        "curriculum": {"stages": n_stages, "reached": stage + 1, **status},
    }
