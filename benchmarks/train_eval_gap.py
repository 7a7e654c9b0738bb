"""Does a trained run score its own training text as well as its training log says?

    python benchmarks/train_eval_gap.py runs/ptb-bench/ptb-armt-35-2 --windows 200
    python benchmarks/train_eval_gap.py runs/ptb-bench/ptb-armt-35-2 --windows 200 --dropout
    python benchmarks/train_eval_gap.py runs/ptb-bench/ptb-armt-35-2 --windows 60 --online-lr 2e-4
    python benchmarks/train_eval_gap.py runs/ptb-bench/ptb-armt-35-2 --windows 60 --online-lr 2e-4 --dropout

Re-reads the first `--windows` training windows of the run's corpus exactly as `crt train`
feeds them (B streams, windows of K segments, state carried from the start of the epoch), with
the final weights, in evaluation mode and without updates, and prints the mean loss per block
of 20 windows beside the training loss the run logged over its last 100 steps. A model whose
evaluation loss on its own training text is far above its logged training loss is not
overfitting; something in training (the weights changing from window to window, dropout, the
carried state) helps it that evaluation does not have. With --online-lr the weights are also
updated after every window (AdamW at that rate, like the end of training; dynamic evaluation),
and each window is scored before its own update, as the training log scores it. --dropout
runs the model in training mode (dropout on, as the training log saw it) with or without
updates, so the two differences between training and evaluation can be told apart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from crt.checkpoint import load_model
from crt.data import batchify
from crt.data.load import load_corpus
from crt.state import detach
from crt.train.metrics import read_metrics
from crt.train.segments import training_window, window_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (or a checkpoint in it)")
    parser.add_argument("--windows", type=int, default=200, help="training windows to re-score from the start of the epoch")
    parser.add_argument("--online-lr", type=float, default=0.0, help="also update the weights after each window at this learning rate (0: no updates)")
    parser.add_argument("--dropout", action="store_true", help="dropout on (training mode) while re-scoring; default off (evaluation mode)")
    args = parser.parse_args()
    model, ckpt = load_model(args.run, "cpu")
    mcfg, tcfg = model.cfg, ckpt.train_config()
    model.train(args.dropout)  # dropout on or off, independently of the updates
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.online_lr, weight_decay=tcfg.weight_decay) if args.online_lr > 0 else None
    corpus = load_corpus(tcfg)
    B, L, K = tcfg.batch_size, mcfg.segment_len, tcfg.bptt_segments
    window = K * L
    stream = batchify(corpus.train, B)  # [B, n] as the training loop cuts it
    state, losses = model.init_state(B), []
    for w in range(min(args.windows, (stream.shape[1] - 1) // window)):
        x, y = training_window(stream, w, window)  # [B, K*L] each
        with torch.set_grad_enabled(optimizer is not None):
            loss, state = window_loss(model, x, y, state, L, K)
        losses.append(loss.item())
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            state = detach(state)
    logged = [r["loss"] for r in read_metrics(Path(ckpt.path).parents[1] / "metrics.jsonl") if r["split"] == "train"]
    tail = logged[-max(1, 100 // tcfg.log_every) :]
    print(f"{args.run}: step {ckpt.meta['step']}, {mcfg.arch}")
    print(f"logged training loss, last 100 steps: {sum(tail) / len(tail):.3f}")
    blocks = [sum(losses[i : i + 20]) / len(losses[i : i + 20]) for i in range(0, len(losses), 20)]
    mode = (f"online (AdamW lr {args.online_lr:g}, scored before each update)" if optimizer else "no updates") + (
        ", dropout on" if args.dropout else ", dropout off"
    )
    print(f"{mode}: loss on the training text, per 20 windows from the epoch start: " + ", ".join(f"{b:.3f}" for b in blocks))


if __name__ == "__main__":
    main()
