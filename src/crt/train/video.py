"""Frame-sequence classification: run clips segment by segment, score them, train on them.

A clip of T frames runs through the model in segments of F frames with the state carried
(`classify`); the logits after its last segment are its prediction. Padding at the end of
shorter clips in a batch is marked invalid and changes no prediction (the models keep a row's
state once its clip has ended).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from crt.config import ModelConfig, TrainConfig
from crt.data.clips import ClipSet, VideoData, pad_clips, sample_frames
from crt.data.load import load_video_data
from crt.data.skeletons import augment_skeleton
from crt.errors import CRTError
from crt.models import VIDEO_ARCHS
from crt.state import detach
from crt.train.distributed import Micro, broadcast_from_main, micro_rows, world


def classify(model: nn.Module, frames: torch.Tensor, lengths: torch.Tensor, segment_len: int, bptt_segments: int = 0) -> torch.Tensor:
    """Class logits of padded clips, run F = segment_len frames at a time with the state carried.

    frames: [B, T, *frame]; lengths: [B] valid frames per clip (>= 1)  ->  logits [B, C]
    bptt_segments: K >= 1 lets gradients reach only the last K segments; 0: all.
    """
    B, T = frames.shape[:2]
    steps = torch.arange(T, device=frames.device)  # [T]
    valid = steps.unsqueeze(0) < lengths.to(frames.device).unsqueeze(1)  # [B, T]
    n_segments = math.ceil(T / segment_len)
    state = model.init_state(B)
    for n, start in enumerate(range(0, T, segment_len)):
        if bptt_segments and n == n_segments - bptt_segments and n > 0:
            state = detach(state)
        logits, state = model(frames[:, start : start + segment_len], state, valid[:, start : start + segment_len])  # [B, C]
    return logits


def batches(clips: ClipSet, batch_size: int, max_frames: int):
    """(frames, lengths, labels) of consecutive batches of a split, clips sampled without augmentation."""
    for i in range(0, len(clips), batch_size):
        chunk = [sample_frames(clips.clips[j], max_frames) for j in range(i, min(i + batch_size, len(clips)))]
        frames, lengths = pad_clips(chunk)
        yield frames, lengths, clips.labels[i : i + len(chunk)]


@torch.no_grad()
def evaluate_clips(model: nn.Module, clips: ClipSet, n_classes: int, batch_size: int = 32, max_frames: int = 64, precision: str = "fp32") -> dict[str, Any]:
    """loss (mean cross-entropy), acc (top-1), mean_class_acc (mean of per-class recalls over
    the classes present), confusion [true, predicted] counts, clips."""
    from crt.runtime import autocast

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    loss = 0.0
    for frames, lengths, labels in batches(clips, batch_size, max_frames):
        with autocast(device, precision):
            logits = classify(model, frames.to(device), lengths, model.cfg.eval_segment).float().cpu()  # [B, C]
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        confusion += torch.bincount(labels * n_classes + logits.argmax(-1), minlength=n_classes**2).view(n_classes, n_classes)
    model.train(was_training)
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)  # [C] recall of each class
    present = confusion.sum(1) > 0
    return {
        "loss": loss / len(clips),
        "acc": confusion.diag().sum().item() / len(clips),
        "mean_class_acc": per_class[present].mean().item(),
        "clips": len(clips),
        "confusion": confusion,
    }


def plot_confusion(confusion: torch.Tensor, classes: list[str], out_png: Path, title: str = "") -> None:
    """Row-normalised confusion matrix (true class down, predicted across) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1)  # [C, C]
    n = len(classes)
    fig, ax = plt.subplots(figsize=(2 + 0.35 * n, 1.5 + 0.35 * n))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)


class VideoTask:
    """What the training loop needs to train a frame-sequence classifier: one step's loss on a
    batch of augmented training clips, validation scores, what a checkpoint records.

    Batches: every epoch a fresh permutation of the training clips (seeded by seed and epoch,
    so a resumed run draws the same batches), cut into full batches of batch_size clips.
    """

    unit = "frames"
    valid_key, valid_label = "mean_class_acc", "mean per-class accuracy"

    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device, data: VideoData | None = None):
        if mcfg.arch not in VIDEO_ARCHS:
            raise CRTError(f"--task video needs --arch crvit or video_transformer, not {mcfg.arch}")
        self.tcfg, self.device = tcfg, device
        self.data = data or load_video_data(tcfg, mcfg.segment_len)
        if self.data.name == "msr-action3d" and self.data.frame_shape[-1] != (6 if tcfg.video_motion else 3):
            raise CRTError(
                f"the MSR Action3D clips given have {self.data.frame_shape[-1]} values per joint but video_motion={tcfg.video_motion}: load them with motion={tcfg.video_motion}"
            )
        if self.data.note and world().main:
            print(
                f"{self.data.name}: {len(self.data.train)} train / {len(self.data.valid)} valid / {len(self.data.test)} test clips; {self.data.note}",
                flush=True,
            )
        shape = "x".join(str(s) for s in self.data.frame_shape)
        self.mcfg = dataclasses.replace(mcfg, num_classes=len(self.data.classes), frame_shape=shape).validate()
        self.meta = {"classes": self.data.classes, "data": self.data.name}
        self.per_epoch = len(self.data.train) // tcfg.batch_size
        if self.per_epoch < 1:
            raise CRTError(f"batch_size={tcfg.batch_size} exceeds the {len(self.data.train)} training clips: lower --batch-size")

    def check_resume(self, meta: dict[str, Any], path: Path) -> None:
        if meta.get("classes") != self.data.classes:
            raise CRTError(f"checkpoint {path} was trained on other classes than {self.tcfg.data} {self.tcfg.data_dir}: resume on the same data")

    def start(self, model: nn.Module) -> None:
        pass  # nothing is carried from one batch to the next

    def load(self, trainer: dict[str, Any]) -> None:
        pass

    def dump(self) -> dict[str, Any]:
        return {}

    def micro_batches(self, model: nn.Module, step: int) -> list[Micro]:
        """The step's clips; this process takes its micro-batches of them (`crt.train.distributed`)."""
        t = self.tcfg
        epoch, i = divmod(step, self.per_epoch)
        order = torch.randperm(len(self.data.train), generator=torch.Generator().manual_seed(t.seed * 100_003 + epoch))
        batch = order[i * t.batch_size : (i + 1) * t.batch_size]
        out = []
        for rows in micro_rows(t.batch_size, t.grad_accum):
            chosen = batch[rows]
            clips = []
            for j in chosen.tolist():
                clip = sample_frames(self.data.train.clips[j], t.video_max_frames, t.video_crop)
                if clip.dim() == 3 and (t.video_rotate or t.video_scale):  # skeleton joints [T, J, 3 or 6]
                    clip = augment_skeleton(clip, t.video_rotate, t.video_scale)
                clips.append(clip)
            frames, lengths = pad_clips(clips)

            def run(total: int, frames=frames, lengths=lengths, chosen=chosen) -> torch.Tensor:
                logits = classify(model, frames.to(self.device), lengths, self.mcfg.segment_len, t.bptt_segments)  # [b, C]
                labels = self.data.train.labels[chosen].to(self.device)  # [b]
                return F.cross_entropy(logits.float(), labels, reduction="sum") / total  # the mean over the global batch's clips

            out.append(Micro(len(chosen), int(lengths.sum()), run))
        return out

    def after_step(self) -> None:
        pass

    def validate(self, model: nn.Module) -> dict[str, float]:
        # every rank scores all clips (not split), and takes rank 0's scores, so that stage decisions agree
        r = broadcast_from_main(
            evaluate_clips(model, self.data.valid, len(self.data.classes), self.tcfg.eval_batch_size, self.tcfg.video_max_frames, self.tcfg.precision)
        )
        return {k: v for k, v in r.items() if k != "confusion"}

    def test(self, model: nn.Module) -> None:
        return None  # `crt eval --split test` scores the test clips

    @staticmethod
    def describe(r: dict[str, float]) -> str:
        return f"loss {r['loss']:.4f}  acc {r['acc']:.3f}  mean per-class acc {r['mean_class_acc']:.3f}"

    @staticmethod
    def train_record(avg_loss: float) -> dict[str, float]:
        return {}

    @staticmethod
    def summary(r: dict[str, float], prefix: str = "valid") -> dict[str, Any]:
        return {f"{prefix}_loss": r["loss"], f"{prefix}_acc": r["acc"], f"{prefix}_mean_class_acc": r["mean_class_acc"]}
