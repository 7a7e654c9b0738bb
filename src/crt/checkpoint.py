"""Checkpoints: safetensors weights, a JSON of config and vocabulary, and the trainer state.

A run directory holds `checkpoints/step-000100/` folders and a `checkpoints/latest` file
naming the newest. Each folder is written under a temporary name and renamed when complete,
and `latest` is replaced atomically, so an interrupted save never damages what is on disk.
config.json records the SHA-256 of the other two files, so a truncated or corrupted
checkpoint is reported as such instead of loading garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from crt.errors import CRTError
from crt.files import umask_mode, write_atomic

WEIGHTS, CONFIG, TRAINER, LATEST = "model.safetensors", "config.json", "trainer.pt", "latest"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _labels_sha256(labels: list[str] | dict[str, Any]) -> str:
    """SHA-256 of a vocabulary or class list, in order, or of a tokenizer's record: a permuted
    or edited list (or BPE) is caught."""
    return hashlib.sha256(json.dumps(labels, ensure_ascii=False).encode("utf-8")).hexdigest()


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of the state dict grouped by tensor: tied weights (embedding and head) share one."""
    groups: dict[tuple, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault((t.data_ptr(), t.dtype, tuple(t.shape), t.stride()), []).append(name)
    return list(groups.values())


def save_weights(model: nn.Module, path: Path) -> None:
    """The weights as safetensors, on the CPU, a tied tensor once (under its first name).

    Not safetensors' save_model: on CUDA, cuDNN packs each GRU's four weights into one buffer,
    and save_model refuses views that share a buffer without covering it."""
    state = model.state_dict()
    save_file({group[0]: state[group[0]].detach().cpu().contiguous() for group in _tied_groups(model)}, str(path))


def load_weights(model: nn.Module, path: Path) -> tuple[list[str], list[str]]:
    """Load what save_weights wrote (or safetensors' save_model) into `model`, on any device;
    a tied tensor is filled from whichever of its names the file has. -> (missing, unexpected)."""
    saved, state, full, missing, untied = load_file(str(path)), model.state_dict(), {}, [], set()
    for group in _tied_groups(model):
        found = [name for name in group if name in saved]
        if not found:
            missing += group
            continue
        full.update(dict.fromkeys(group, saved[found[0]]))
        untied.update(name for name in found[1:] if not torch.equal(saved[found[0]], saved[name]))  # this model cannot hold them
    unexpected = sorted(set(saved) - set(full) | untied)
    if missing or unexpected:
        return missing, unexpected
    for name, t in full.items():
        if t.shape != state[name].shape:
            raise CRTError(f"{path} does not fit this model: {name} is {list(t.shape)} there and {list(state[name].shape)} here (another width or vocabulary?)")
    model.load_state_dict(full)
    return [], []


def remove_debris(ckpt_root: Path, keep: Path | None = None) -> None:
    """Remove what interrupted saves left in checkpoints/: `.step-N.*.tmp` folders (each a full
    copy of the weights and the optimizer), `step-N.old` folders and `.latest.*.tmp` files.
    Only the process holding the run's lock calls this, so none of them is being written."""
    if not ckpt_root.is_dir():
        return
    for p in ckpt_root.iterdir():
        stale = (
            (p.name.startswith(".step-") and p.name.endswith(".tmp"))
            or (p.name.startswith("step-") and p.name.endswith(".old"))
            or (p.name.startswith(".latest.") and p.name.endswith(".tmp"))
        )
        if stale and p != keep:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, meta: dict[str, Any], trainer: dict[str, Any], keep: int = 2) -> Path:
    """Save model weights, `meta` (config, vocab, ...) and `trainer` (optimizer, RNG, ...)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_weights(model, tmp / WEIGHTS)
        torch.save(trainer, tmp / TRAINER)
        labels = {k: _labels_sha256(meta[k]) for k in ("vocab", "classes", "tokenizer") if k in meta}
        meta = {**meta, "step": step, "sha256": {WEIGHTS: _sha256(tmp / WEIGHTS), TRAINER: _sha256(tmp / TRAINER), **labels}}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=1))
        for f in (tmp, *tmp.iterdir()):
            umask_mode(f)
        if final.exists():  # re-saving a step (after a resume): swap, then remove the old copy
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(ckpt_root / LATEST, final.name + "\n")
    remove_debris(ckpt_root)  # what an earlier, interrupted save left
    for stale in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and p.suffix == "")[: -max(keep, 1)]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a run directory or its checkpoints/ folder."""
    path = Path(path)
    if not path.exists():
        raise CRTError(f"checkpoint {path} does not exist: pass a run directory or a checkpoints/step-N folder")
    if (path / CONFIG).is_file():
        return path
    for root in (path / "checkpoints", path):
        if (root / LATEST).is_file():
            try:
                name = (root / LATEST).read_text(encoding="utf-8").strip()
            except (UnicodeDecodeError, OSError):
                name = ""
            if not name or "/" in name or name in (".", ".."):
                raise CRTError(f"{root / LATEST} does not name a checkpoint folder (it is damaged): pass a checkpoints/step-N folder directly")
            if (root / name / CONFIG).is_file():
                return root / name
            raise CRTError(f"{root / LATEST} names {name}, which is missing: pass a checkpoints/step-N folder directly")
    raise CRTError(f"no checkpoint in {path}: expected {CONFIG} or checkpoints/{LATEST} (was the run saved?)")


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]  # config.json: model, train, stages, stage, vocab and tokenizer (or classes), step, ...

    def train_config(self, in_stage: bool = True):
        """The run's TrainConfig: its [train] fields, plus (in_stage) the curriculum's changes up
        to the stage this checkpoint had reached, i.e. the config in force when it was saved."""
        from crt.config import TrainConfig, config_from_dict, stage_config, stages_from_list

        base = config_from_dict(TrainConfig, self.meta["train"])
        if "protocol" not in self.meta["train"]:
            base.protocol = "stream"  # written before the document protocol existed: trained as streams
        return stage_config(base, stages_from_list(self.meta.get("stages", [])), self.meta.get("stage", 0)) if in_stage else base

    def load_weights(self, model: nn.Module) -> None:
        self._verify(WEIGHTS)
        try:
            missing, unexpected = load_weights(model, self.path / WEIGHTS)
        except (SafetensorError, RuntimeError, OSError) as e:
            raise CRTError(f"cannot load weights from {self.path / WEIGHTS}: {str(e).splitlines()[0]}") from None
        if missing or unexpected:
            raise CRTError(
                f"checkpoint {self.path} does not fit this model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): it was trained with another architecture"
            )

    def load_trainer(self) -> dict[str, Any]:
        self._verify(TRAINER)
        try:
            return torch.load(self.path / TRAINER, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a damaged pickle/zip
            raise CRTError(f"cannot load {self.path / TRAINER}: {str(e).splitlines()[0]}") from None

    def _verify(self, name: str) -> None:
        f = self.path / name
        if not f.is_file():
            raise CRTError(f"checkpoint {self.path} lacks {name}: it is incomplete; use another checkpoint")
        if _sha256(f) != self.meta.get("sha256", {}).get(name):
            raise CRTError(f"{f} is corrupted or truncated (SHA-256 differs from {CONFIG}); use another checkpoint")


def load_checkpoint(path: str | Path) -> Checkpoint:
    folder = resolve(path)
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CRTError(f"{folder / CONFIG} is not valid JSON ({e}); the checkpoint is damaged") from None
    # a language model records its vocabulary, a classifier its class names
    if (
        not isinstance(meta, dict)
        or not {"model", "train", "sha256"} <= set(meta)
        or not {"vocab", "classes"} & set(meta)
        or not all(isinstance(meta[k], dict) for k in ("model", "train", "sha256"))
    ):
        raise CRTError(f"{folder / CONFIG} is not a crt checkpoint config (missing model/train/sha256/vocab or classes)")
    for key, size in (("vocab", "vocab_size"), ("classes", "num_classes")):
        if key not in meta:
            continue
        labels = meta[key]
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
            raise CRTError(f"{folder / CONFIG}: its {key} is not a list of distinct strings; the checkpoint is damaged")
        recorded = meta["sha256"].get(key)  # absent in checkpoints written before it was recorded
        if (recorded is not None and recorded != _labels_sha256(labels)) or len(labels) != meta["model"].get(size, len(labels)):
            raise CRTError(
                f"{folder / CONFIG}: its {key} ({len(labels)} entries) is not the one the model was trained with "
                f"({meta['model'].get(size)} entries, SHA-256 differs); the checkpoint is damaged or was edited"
            )
    if "tokenizer" in meta and meta["sha256"].get("tokenizer") != _labels_sha256(meta["tokenizer"]):
        raise CRTError(f"{folder / CONFIG}: its tokenizer is not the one the model was trained with (SHA-256 differs); the checkpoint is damaged or was edited")
    from crt.config import stages_from_list

    stages = stages_from_list(meta.get("stages", []))
    stage = meta.get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage < max(1, len(stages)):
        raise CRTError(f"{folder / CONFIG}: its stage {stage!r} is not one of its {len(stages)} stages; the checkpoint is damaged")
    return Checkpoint(folder, meta)


def load_model(source: str | Path | Checkpoint, device: str = "auto", mcfg=None) -> tuple[nn.Module, Checkpoint]:
    """(model in eval mode on `device`, its checkpoint) from a run directory, a checkpoint folder
    or a loaded Checkpoint. The one way every command and benchmark rebuilds a trained model.

    mcfg: the ModelConfig to build instead of the checkpoint's own, for evaluation-time fields
        (eval_segment_len, eval_mem_len); its weights must still fit.
    """
    from crt.config import ModelConfig, config_from_dict
    from crt.models import build_model
    from crt.runtime import resolve_device

    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    mcfg = mcfg or config_from_dict(ModelConfig, ckpt.meta["model"])
    model = build_model(mcfg).to(resolve_device(device))
    ckpt.load_weights(model)
    return model.eval(), ckpt
