"""The training loop: truncated BPTT over K segments, AdamW, warmup + cosine, checkpoints."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from crt.config import VIDEO_ARCHS, ModelConfig, TrainConfig, apply_overrides, to_dict
from crt.data import Corpus, Vocab, batchify, load_chars, load_words, make_synthetic
from crt.errors import CRTError
from crt.models import build_model
from crt.runtime import keep_freed_memory
from crt.state import detach
from crt.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from crt.train.evaluate import autocast, evaluate
from crt.train.metrics import MetricsLog, plot_curves
from crt.train.segments import training_window, window_loss


def load_corpus(t: TrainConfig) -> Corpus:
    """The corpus a TrainConfig names (data + data_dir + options)."""
    if t.data == "synthetic":
        return make_synthetic(
            pairs=t.synth_pairs, keys=t.synth_keys, values=t.synth_values, filler=t.synth_filler,
            filler_vocab=t.synth_filler_vocab, query_rounds=t.synth_query_rounds, train_docs=t.synth_train_docs, valid_docs=t.synth_valid_docs,
            test_docs=t.synth_test_docs, seed=t.seed,
        )
    if not t.data_dir:
        raise CRTError(f"data={t.data} needs --data-dir: the folder of the corpus files (or `crt data download {t.data} --dir DIR`)")
    if t.data in ("ptb", "wikitext-2", "wikitext-103", "words"):
        kind = {"ptb": "ptb", "words": "auto"}.get(t.data, "wikitext")
        return load_words(t.data_dir, kind=kind, map_unk=t.map_unk)
    if t.data == "chars":
        return load_chars(t.data_dir)
    raise CRTError(f"unknown data {t.data!r}: use synthetic, ptb, wikitext-2, wikitext-103, words or chars")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CRTError("--device cuda was asked for but no CUDA device is available: use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise CRTError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


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


def free_run_dir(out_dir: str) -> Path:
    """out_dir itself if it holds no run yet, else the first free out_dir-2, out_dir-3, ...

    A new run never writes into a folder that holds another run's checkpoints.
    """
    base = Path(out_dir)
    path, n = base, 1
    while (path / "checkpoints").exists() or (path / "metrics.jsonl").exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


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


def train_stages(mcfg: ModelConfig, tcfg: TrainConfig, stages: list[dict[str, Any]], progress: bool = True) -> dict[str, Any]:
    """Train, then each stage in turn: resume the run's last checkpoint with the stage's training
    fields changed (`crt.config.load_stages`). Returns the summary of the last stage."""
    summary = train(mcfg, tcfg, progress=progress)
    for i, overrides in enumerate(stages, 1):
        _, tcfg = apply_overrides(mcfg, tcfg, overrides)
        print(f"-- stage {i + 1}: " + ", ".join(f"{k} = {v}" for k, v in overrides.items()), flush=True)
        summary = train(mcfg, tcfg, resume=load_checkpoint(summary["run_dir"]), progress=progress)
    return summary


class LMTask:
    """What the training loop needs to train a language model: one step's loss on the next
    window of K segments of the batchified training stream (the state carried from window to
    window, restarted each epoch), validation perplexity and recall, what a checkpoint records."""

    unit = "tokens"
    valid_key, valid_label = "ppl", "perplexity"

    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device, corpus: Corpus | None = None):
        if mcfg.arch in VIDEO_ARCHS:
            raise CRTError(f"{mcfg.arch} classifies frame sequences: train it with --task video")
        self.tcfg = tcfg
        self.corpus = corpus = corpus or load_corpus(tcfg)
        for split, n in corpus.unk_mapped.items():
            print(f"{n:,} {split} tokens unseen in train were mapped to <unk>", flush=True)
        self.mcfg = dataclasses.replace(mcfg, vocab_size=len(corpus.vocab)).validate()
        self.meta = {"vocab": corpus.vocab.to_list(), "data": corpus.name}
        B, K, L = tcfg.batch_size, tcfg.bptt_segments, self.mcfg.segment_len
        self.stream = batchify(corpus.train, B).to(device)  # [B, n]
        self.window = K * L
        self.n_windows = (self.stream.shape[1] - 1) // self.window
        if self.n_windows < 1:
            raise CRTError(
                f"the training split ({len(corpus.train)} tokens) is too short for batch_size * bptt_segments * segment_len = {B * self.window}: lower one of them"
            )
        self.device = device

    def check_resume(self, meta: dict[str, Any], path: Path) -> None:
        if Vocab.from_list(meta["vocab"]).itos != self.corpus.vocab.itos:
            raise CRTError(f"checkpoint {path} was trained with another vocabulary than {self.tcfg.data} {self.tcfg.data_dir}: resume on the same data")

    def start(self, model: nn.Module) -> None:
        self.model = model
        self.state = model.init_state(self.tcfg.batch_size)

    def load(self, trainer: dict[str, Any]) -> None:
        self.state = type(self.state)(*(t.to(self.device) for t in trainer["state"]))

    def dump(self) -> dict[str, Any]:
        return {"state": [t.detach().cpu() for t in self.state]}

    def loss(self, model: nn.Module, step: int) -> tuple[torch.Tensor, int]:
        w = step % self.n_windows
        if w == 0 and step > 0:
            self.state = model.init_state(self.tcfg.batch_size)  # a new epoch starts the streams over
        x, y = training_window(self.stream, w, self.window)  # [B, K*L] each
        loss, self.state = window_loss(model, x, y, self.state, self.mcfg.segment_len, self.tcfg.bptt_segments)
        return loss, x.numel()

    def after_step(self) -> None:
        self.state = detach(self.state)

    def validate(self, model: nn.Module) -> dict[str, float]:
        t = self.tcfg
        return evaluate(model, self.corpus.valid, t.eval_batch_size, answers=self.corpus.answers.get("valid"), precision=t.precision, max_tokens=t.eval_max_tokens)

    @staticmethod
    def describe(r: dict[str, float]) -> str:
        return f"valid loss {r['loss']:.4f}  ppl {r['ppl']:.2f}" + (f"  recall {r['recall']:.3f}" if not math.isnan(r["recall"]) else "")

    @staticmethod
    def train_record(avg_loss: float) -> dict[str, float]:
        return {"ppl": math.exp(min(avg_loss, 700.0))}

    @staticmethod
    def summary(r: dict[str, float]) -> dict[str, Any]:
        return {"valid_loss": r["loss"], "valid_ppl": r["ppl"], "valid_recall": r["recall"]}


def make_task(mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device, data=None):
    """The task object `tcfg.task` names: LMTask (language modelling) or VideoTask."""
    if tcfg.task == "lm":
        return LMTask(mcfg, tcfg, device, data)
    if tcfg.task == "video":
        from crt.train.video import VideoTask

        return VideoTask(mcfg, tcfg, device, data)
    raise CRTError(f"unknown task {tcfg.task!r}: use lm or video")


def train(
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    resume: Checkpoint | None = None,
    corpus: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one model; return a summary (run_dir, params, steps, the task's validation scores).

    resume: continue a checkpoint's run so that the loss trajectory equals that of an
        uninterrupted run (same configs required; only the stopping budget may grow).
    corpus: the data, if already loaded (a Corpus for task lm, VideoData for task video; else from tcfg).
    progress: a tqdm bar on a terminal (tqdm leaves it out when stderr is not one).
    """
    device = resolve_device(tcfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    if tcfg.precision not in ("fp32", "bf16"):
        raise CRTError(f"unknown precision {tcfg.precision!r}: use fp32 or bf16")
    if tcfg.batch_size < 1 or tcfg.bptt_segments < 1:
        raise CRTError("batch_size and bptt_segments must be >= 1")
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    task = make_task(mcfg, tcfg, device, corpus)
    if resume is not None:
        task.check_resume(resume.meta, resume.path)
    mcfg = task.mcfg
    model = build_model(mcfg).to(device)
    optimizer = make_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, tcfg) / tcfg.lr)

    step, tokens_seen = 0, 0
    task.start(model)
    if resume is not None:
        run_dir = resume.path.parent.parent
        resume.load_weights(model)
        trainer = resume.load_trainer()
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        step, tokens_seen = trainer["step"], trainer["tokens_seen"]
        task.load(trainer)
        _set_rng_state(trainer["rng"])
    else:
        run_dir = free_run_dir(tcfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(run_dir, resume_step=step if resume is not None else None)
    meta = {"model": to_dict(mcfg), "train": to_dict(tcfg), **task.meta}
    n_params = count_parameters(model)

    def save() -> Path:
        trainer = {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
            "tokens_seen": tokens_seen, "rng": _rng_state(), **task.dump(),
        }
        return save_checkpoint(run_dir, step, model, meta, trainer, keep=tcfg.keep_checkpoints)

    def validate() -> dict[str, float]:
        result = task.validate(model)
        metrics.log({"step": step, "split": "valid", **result})
        return result

    def done() -> bool:
        return step >= tcfg.max_steps or (tcfg.max_tokens > 0 and tokens_seen >= tcfg.max_tokens)

    model.train()
    bar = tqdm(total=tcfg.max_steps, initial=step, disable=None if progress else True, desc=run_dir.name, dynamic_ncols=True)
    last_valid: dict[str, float] = {}
    interval_loss, interval_tokens, interval_time = 0.0, 0, 0.0
    while not done():
        t0 = time.perf_counter()
        with autocast(device, tcfg.precision):
            loss, n_items = task.loss(model, step)
        if not torch.isfinite(loss):
            bar.close()
            metrics.close()
            raise CRTError(
                f"the training loss became {loss.item()} at step {step + 1}: lower --lr or use --precision fp32; checkpoints saved before it in {run_dir} are intact"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        scheduler.step()
        task.after_step()
        step += 1
        tokens_seen += n_items
        interval_loss += loss.item()
        interval_tokens += n_items
        interval_time += time.perf_counter() - t0
        bar.update(1)
        if step % tcfg.log_every == 0 or done():
            n = (step - 1) % tcfg.log_every + 1
            avg = interval_loss / n
            rate = interval_tokens / max(interval_time, 1e-9)
            extra = task.train_record(avg)
            metrics.log({"step": step, "split": "train", "loss": avg, **extra, "lr": scheduler.get_last_lr()[0], f"{task.unit}_per_s": rate, f"{task.unit}_seen": tokens_seen})
            bar.set_postfix(loss=f"{avg:.3f}", **{k: f"{v:.1f}" for k, v in extra.items()}, **{f"{task.unit[:3]}_s": f"{rate:,.0f}"})
            interval_loss, interval_tokens, interval_time = 0.0, 0, 0.0
        at_eval = tcfg.eval_every > 0 and step % tcfg.eval_every == 0
        if at_eval or done():
            last_valid = validate()
            bar.write(f"step {step}: {task.describe(last_valid)}")
        if at_eval or done() or (tcfg.checkpoint_every > 0 and step % tcfg.checkpoint_every == 0):
            save()
    bar.close()
    metrics.close()
    if not last_valid:  # resumed a run that had already reached its budget
        last_valid = validate()
    plot_curves(metrics.path, run_dir / "curves.png", title=f"{mcfg.arch} on {meta['data']}", valid_key=task.valid_key, valid_label=task.valid_label)
    return {"run_dir": str(run_dir), "arch": mcfg.arch, "params": n_params, "step": step, "tokens_seen": tokens_seen, **task.summary(last_valid)}
