"""Configuration: one dataclass for the model, one for the run, presets from TOML files.

Field names are unique across both dataclasses, so the CLI can offer every field as a flat
`--field-name VALUE` flag. Every (choice) of SPEC §3 is a field here.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from crt.data.options import DATA, DATA_GROUPS, DataSource, MemoryTaskOptions, SyntheticOptions, VideoOptions, tokenizer_kind
from crt.errors import CRTError
from crt.runtime import PRECISIONS


@dataclass
class ModelConfig:
    arch: str = "crt"  # crt | transformer | transformer_xl | rmt | armt; video: crvit | video_transformer
    vocab_size: int = 0  # --tokenizer bpe: the BPE vocabulary to train (the model gets the size trained); other tokenizers: set from the data
    d_model: int = 128  # model width
    n_layer: int = 3  # transformer blocks
    n_head: int = 4  # attention heads
    d_ff: int = 512  # feed-forward hidden width
    segment_len: int = 70  # tokens per segment (training)
    dropout: float = 0.1  # residual branches and feed-forward
    emb_dropout: float = 0.1  # on the summed input embeddings
    attn_dropout: float = 0.0  # on the attention weights
    tie_weights: bool = True  # LM head shares the input embedding
    # transformer_xl always uses its relative positions
    positions: str = "auto"  # crt: recurrent | sinusoidal | learned | rotary | none; transformer, rmt, armt: learned | sinusoidal | rotary; auto: recurrent for crt, relative for transformer_xl, else learned
    # --- CRT (SPEC §3) ---
    memory_position: str = "prepend"  # prepend | append | none: where the memory token goes
    memory_init: str = "learned"  # learned | zeros: m_0
    memory_cell: str = "gru"  # gru | ncgru | mingru: the RNN that updates the memory
    memory_reads: str = "tokens"  # tokens | memory_token | last_token: what the memory RNN reads
    d_memory: int = 0  # memory width d_m; 0 means d_model
    carry_rpe: bool = True  # carry the recurrent positional GRU's state across segments
    position_cell: str = "gru"  # gru | mingru: the RNN of the recurrent positions
    ncgru_negative: int = -1  # number of -1 entries in the NCGRU's diagonal D; -1: d_memory // 2
    ncgru_orthogonal_reset: bool = False  # make the NCGRU's U_r orthogonal too
    # --- Transformer-XL (SPEC §4) ---
    mem_len: int = 0  # cached hidden states per layer; 0 means segment_len
    clamp_len: int = -1  # relative distances beyond this use the same encoding; -1: no clamp
    same_length: bool = False  # every query attends to the same number of keys
    # --- RMT and ARMT (SPEC §4) ---
    mem_tokens: int = 4  # memory tokens per segment (RMT: the memory; ARMT: what writes each layer's memory)
    rmt_placement: str = "read_write"  # read_write | read | write: where RMT's memory goes around the segment
    assoc_dim: int = 32  # ARMT key width before the DPFP feature map
    assoc_heads: int = 1  # ARMT memories per layer (split key and value widths)
    assoc_nu: int = 3  # ARMT DPFP order: feature width 2 * nu * assoc_dim
    assoc_correction: bool = True  # ARMT: count a key in the normaliser only as far as it is new
    assoc_floor: bool = True  # ARMT: divide reads by max(z.q, 1), not the original z.q + 1e-5 (PTB test ppl 3.7x and 1.5x worse without it, two seeds; docs/results/ptb-notes.md)
    # --- CR-ViT and the video transformer (SPEC §5; segment_len counts frames) ---
    num_classes: int = 0  # set from the data
    frame_shape: str = ""  # set from the data: JxC for skeleton joints (e.g. 20x3), CxHxW for RGB frames (e.g. 3x64x64)
    patch_size: int = 8  # RGB frames: ViT patch side in pixels (must divide the frame size)
    frame_layers: int = 1  # RGB frames: bidirectional transformer blocks over a frame's patches
    readout: str = "memory"  # crvit: memory | mean | both: what the classifier reads (final memory, mean of all frame outputs, or both)
    # --- evaluation lengths (0: same as training) ---
    eval_segment_len: int = 0  # segment length at evaluation
    eval_mem_len: int = 0  # Transformer-XL memory at evaluation
    eval_stride: int = 0  # Transformer: sliding-window stride at evaluation; 0: non-overlapping segments

    @property
    def position_encoding(self) -> str:
        """`positions` with auto resolved: the first choice the arch's model declares."""
        if self.positions == "auto":
            from crt.models import MODELS

            return MODELS[self.arch].POSITIONS[0] if self.arch in MODELS else "learned"
        return self.positions

    @property
    def memory_dim(self) -> int:
        """d_m: d_memory, or d_model when 0."""
        return self.d_memory or self.d_model

    @property
    def eval_segment(self) -> int:
        """Tokens (or frames) per segment at evaluation: eval_segment_len, or segment_len when 0."""
        return self.eval_segment_len or self.segment_len

    @property
    def memory_len(self) -> int:
        """Transformer-XL's M in training: mem_len, or segment_len when 0."""
        return self.mem_len or self.segment_len

    @property
    def eval_memory_len(self) -> int:
        """Transformer-XL's M at evaluation: eval_mem_len, or memory_len when 0."""
        return self.eval_mem_len or self.memory_len

    def validate(self) -> ModelConfig:
        """Check the fields every model shares here, then the arch's own options in its model
        file (`check_options` beside the model's maths); the first problem is a CRTError."""
        from crt.models import MODELS

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise CRTError(msg)

        need(self.arch in MODELS, f"unknown arch {self.arch!r}: use one of {', '.join(MODELS)}")
        need(self.segment_len >= 1, f"segment_len must be >= 1, got {self.segment_len}: set --segment-len to a positive length")
        need(self.d_model >= 1 and self.n_layer >= 1 and self.n_head >= 1, "d_model, n_layer and n_head must be >= 1")
        need(self.d_model % self.n_head == 0, f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        need(self.eval_segment_len >= 0 and self.eval_stride >= 0, "eval_segment_len and eval_stride must be >= 0 (0: the default)")
        need(self.mem_len >= 0 and self.eval_mem_len >= 0, f"mem_len={self.mem_len} and eval_mem_len={self.eval_mem_len} must be >= 0 (0: the default)")
        need(self.clamp_len >= -1, f"clamp_len={self.clamp_len}: use -1 (no clamp) or a distance >= 0")
        model = MODELS[self.arch]
        need(
            self.position_encoding in model.POSITIONS, f"positions={self.positions!r} is not available for {self.arch}: use one of {', '.join(model.POSITIONS)}"
        )
        for name, choices in _MODEL_CHOICES.items():  # a misspelt choice is an error whichever model reads it
            need(getattr(self, name) in choices, f"{name}={getattr(self, name)!r}: use {', '.join(choices[:-1])} or {choices[-1]}")
        need(
            self.eval_stride <= self.eval_segment,
            f"eval_stride={self.eval_stride} exceeds the evaluation segment length {self.eval_segment}: give --eval-stride <= it (0: non-overlapping segments)",
        )
        check_ranges(self, _MODEL_RANGES)
        for ok, msg in model.check_options(self):
            need(ok, msg)
        return self


@dataclass
class TrainConfig(VideoOptions, MemoryTaskOptions, SyntheticOptions, DataSource):
    """Training, evaluation and run fields. The data fields come first, from the option groups
    each data module declares beside its data (`crt.data.options`): flat names, so every field
    is one --flag and one TOML key."""

    # --- protocol (SPEC §8) ---
    protocol: str = "auto"  # auto | stream | document: one endless stream per batch row, or one document per row from a fresh state; auto: document for document corpora (synthetic), else stream
    loss: str = "all"  # all | answers: average the cross-entropy over every token, or over the answer tokens the task marks only
    # --- optimisation ---
    batch_size: int = 32  # parallel streams (document protocol: documents per step)
    bptt_segments: int = 2  # K: back-propagate through the last K segments; document protocol: 0 = through the whole document
    max_steps: int = 1000  # optimizer steps (each sees batch_size * K * segment_len tokens)
    max_tokens: int = 0  # stop after this many training tokens; 0: no token budget
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decay floor
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    grad_accum: int = 1  # micro-batches per step: the batch_size rows are trained in this many pieces, their gradients summed (same update, less memory)
    # --- run ---
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 (autocast); auto: bf16 where the device multiplies bf16 natively (crt.runtime)
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 200  # steps between validations; 0: only at the end
    eval_test: bool = False  # at every validation also score the whole test split (a test curve, e.g. test perplexity at matched training FLOPs)
    patience: int = 0  # stop early once valid loss has not improved for this many validations in a row; 0: never
    eval_batch_size: int = 10
    eval_max_tokens: int = 0  # cap on tokens scored at periodic validation; 0: whole split
    checkpoint_every: int = 0  # steps between checkpoints; 0: at validations and the end
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    log_every: int = 10

    def validate(self) -> TrainConfig:
        """Every field within its allowed range (a CRTError naming the field, its value and the
        range): the one place training values are checked, for flags, presets, stages and
        checkpoints alike."""
        choices = {
            **{name: allowed for group in DATA_GROUPS for name, allowed in getattr(group, "CHOICES", {}).items()},
            "protocol": ("auto", "stream", "document"),
            "loss": ("all", "answers"),
            "precision": PRECISIONS,
            "device": ("auto", "cpu", "cuda"),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise CRTError(f"unknown {name} {value!r} (--{name.replace('_', '-')}): use one of {', '.join(allowed)}")
        data = DATA[self.task]
        if self.data not in data:
            raise CRTError(f"unknown data {self.data!r} for task {self.task} (--data): use one of {', '.join(data)}")
        tokenizer_kind(self)  # a tokenizer that makes no sense for the data is refused here
        for group in DATA_GROUPS:
            check_ranges(self, group.RANGES)
        check_ranges(self, _TRAIN_RANGES)
        if self.min_lr > self.lr:
            raise CRTError(f"min_lr={self.min_lr} exceeds lr={self.lr}: the cosine decays from lr down to min_lr, so give --min-lr <= --lr")
        if not self.out_dir.strip():
            raise CRTError("out_dir is empty: give --out-dir a folder for the run")
        return self


# Allowed ranges: field -> (low, high, rule). A bound of None is open-ended; "(" / ")" exclude
# the bound, "[" / "]" include it. Floats must also be finite.
_MODEL_CHOICES = {
    "memory_position": ("prepend", "append", "none"),
    "memory_init": ("learned", "zeros"),
    "memory_cell": ("gru", "ncgru", "mingru"),
    "position_cell": ("gru", "mingru"),
    "memory_reads": ("tokens", "memory_token", "last_token"),
    "rmt_placement": ("read_write", "read", "write"),
    "readout": ("memory", "mean", "both"),
}
_MODEL_RANGES = {
    "vocab_size": "[0,",
    "d_model": "[1,",
    "n_layer": "[1,",
    "n_head": "[1,",
    "segment_len": "[1,",
    "d_ff": "[1,",
    "dropout": "[0,1)",
    "emb_dropout": "[0,1)",
    "attn_dropout": "[0,1)",
    "d_memory": "[0,",
    "ncgru_negative": "[-1,",
    "mem_tokens": "[0,",
    "num_classes": "[0,",
}
_TRAIN_RANGES = {  # the data fields' ranges are their option groups' (crt.data.options)
    "batch_size": "[1,",
    "bptt_segments": "[0,",
    "max_steps": "[1,",
    "max_tokens": "[0,",
    "lr": "(0,",
    "min_lr": "[0,",
    "warmup_steps": "[0,",
    "weight_decay": "[0,",
    "beta1": "[0,1)",
    "beta2": "[0,1)",
    "grad_clip": "[0,",
    "grad_accum": "[1,",
    "seed": "[0,4294967295]",
    "eval_every": "[0,",
    "patience": "[0,",
    "eval_batch_size": "[1,",
    "eval_max_tokens": "[0,",
    "checkpoint_every": "[0,",
    "keep_checkpoints": "[1,",
    "log_every": "[1,",
}


def check_ranges(cfg: Any, ranges: dict[str, str]) -> None:
    """Raise a CRTError for the first field of `cfg` outside its interval ("[0,1)"; "(0,": no upper bound)."""
    for name, interval in ranges.items():
        value = getattr(cfg, name)
        lo, hi = interval[1:-1].split(",") if interval[-1] in ")]" else (interval[1:-1], "")
        above = value > float(lo) if interval[0] == "(" else value >= float(lo)
        below = not hi or (value < float(hi) if interval[-1] == ")" else value <= float(hi))
        sane = math.isfinite(value) if isinstance(value, float) else abs(value) <= 2**53  # beyond, no count is meant (and floats lose it)
        if not (sane and above and below):
            rule = f"in {interval[0]}{lo}, {hi}{interval[-1]}" if hi else f"{'>' if interval[0] == '(' else '>='} {lo}"
            kind = "a finite number " if isinstance(value, float) else "at most 2**53 and "
            raise CRTError(f"{name}={value!r} (--{name.replace('_', '-')}) is out of range: it must be {kind}{rule}")


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """`value` as the field's type, strictly: a bool is not a number, a quoted "4" is not a
    number, a number is not a string, and a float only becomes an int if it has no fraction
    (TOML's 2.5 is not silently 2). The CLI's flags arrive typed (argparse parses them)."""
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise CRTError(f"{name} expects true or false, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise CRTError(f"{name} expects a string, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CRTError(f"{name} expects {'an integer' if typ is int else 'a number'}, got {value!r}")
    try:
        number = float(value) if typ is float else value
        if typ is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            number = int(value)
        return typ(number)
    except (TypeError, ValueError, OverflowError):
        raise CRTError(f"{name} expects {'an integer' if typ is int else 'a number'}, got {value!r}") from None


def field_help() -> dict[str, str]:
    """Each field's trailing comment where its class declares it: the one place a field is explained."""
    import inspect
    import re

    classes = [ModelConfig, *(c for c in TrainConfig.__mro__ if dataclasses.is_dataclass(c))]
    lines = [line for c in classes for line in inspect.getsource(c).splitlines()]
    found = (re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line) for line in lines)
    return {m.group(1): m.group(2) for m in found if m}


MODEL_FIELDS = {f.name: f for f in fields(ModelConfig)}
TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig)}


def parse_assignment(item: str) -> tuple[str, Any]:
    """A script's `--set FIELD=VALUE`: VALUE read as a TOML value (3e-3, 8, true), else as a string,
    so that apply_overrides' strict types accept `d_model=256` and refuse `d_model=wide`."""
    name, _, text = item.partition("=")
    try:
        return name, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return name, text


def apply_overrides(model: ModelConfig, train: TrainConfig, overrides: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """Return copies of both configs with `overrides` (field name -> value) applied and type-checked."""
    m, t = {}, {}
    for key, value in overrides.items():
        key = key.replace("-", "_")
        if key in MODEL_FIELDS:
            m[key] = _coerce(value, MODEL_FIELDS[key].type, key)
        elif key in TRAIN_FIELDS:
            t[key] = _coerce(value, TRAIN_FIELDS[key].type, key)
        else:
            raise CRTError(f"unknown config key {key!r}: see `crt train --help` for the fields")
    return dataclasses.replace(model, **m), dataclasses.replace(train, **t)


# Fields that are set from the data, never read from a flag; the data fields only some tasks
# read are their option groups' USED_BY, the model fields only some archs read each model's
# OPTIONS (`_model_options`).
_USED_BY = {
    "vocab_size": ("--tokenizer bpe (other tokenizers set the vocabulary from the data)", lambda m, t: t.task == "lm" and tokenizer_kind(t) == "bpe"),
    "num_classes": ("nothing: the classes are set from the data", lambda m, t: False),
    "eval_test": ("language models (--task lm)", lambda m, t: t.task == "lm"),
    "frame_shape": ("nothing: the frame shape is set from the data", lambda m, t: False),
    **{name: rule for group in DATA_GROUPS for name, rule in group.USED_BY.items()},
}


def _model_options() -> dict[str, tuple[str, Any]]:
    """field -> (who reads it, test on the configs), from the OPTIONS every model declares."""
    from crt.models import MODELS

    out = {}
    for name in {f for m in MODELS.values() for f in m.OPTIONS}:
        readers = [(arch, m.OPTIONS[name]) for arch, m in MODELS.items() if name in m.OPTIONS]
        when = readers[0][1]  # a condition ("memory_cell = ncgru", test) is the same for every reader
        who = " and ".join(a for a, _ in readers) + (f" with {when[0]}" if when else "")
        archs = {a for a, _ in readers}
        out[name] = (who, lambda m, t, archs=archs, when=when: m.arch in archs and (when is None or when[1](m)))
    return out


def unused_fields(model: ModelConfig, train: TrainConfig, names) -> list[str]:
    """Warnings for the fields in `names` (the user's explicit flags) that these configs never read."""
    used_by = {**_model_options(), **_USED_BY}

    def why(n: str) -> str:
        who = used_by[n][0]
        return who.split(": ", 1)[1] if who.startswith("nothing") else f"it is read by {who} only (this run: arch {model.arch}, data {train.data})"

    return [f"--{n.replace('_', '-')} does nothing here: {why(n)}" for n in names if n in used_by and not used_by[n][1](model, train)]


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("crt.configs").iterdir() if p.name.endswith(".toml"))


def _read_preset(name_or_path: str) -> dict[str, Any]:
    """The parsed TOML of a preset (a name in crt/configs/ or a path), its tables checked."""
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".toml" or "/" in name_or_path or path.is_file():  # a path, not a name
        if not path.is_file():
            raise CRTError(
                f"preset file {path} {'is not a file' if path.exists() else 'does not exist'}: give the path of a .toml file, or a preset name ({', '.join(preset_names())})"
            )
        try:
            text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not TOML
        except UnicodeDecodeError as e:
            raise CRTError(f"preset file {path} is not UTF-8 text (bad byte at offset {e.start}): save it as UTF-8") from None
        except OSError as e:
            raise CRTError(f"cannot read preset file {path} ({e.strerror})") from None
    else:
        res = resources.files("crt.configs") / f"{name_or_path}.toml"
        if not res.is_file():
            raise CRTError(f"unknown preset {name_or_path!r}: use one of {', '.join(preset_names())} or a path to a .toml file")
        text = res.read_text()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CRTError(f"preset {name_or_path!r} is not valid TOML: {e}") from None
    unknown = set(doc) - {"model", "train", "stage"}
    if unknown:
        raise CRTError(f"preset {name_or_path!r} has unknown tables {sorted(unknown)}: only [model], [train] and [[stage]] are allowed")
    stages = doc.get("stage", [])
    if not all(isinstance(doc.get(t, {}), dict) for t in ("model", "train")) or not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
        raise CRTError(f"preset {name_or_path!r}: [model] and [train] must be tables and each stage a [[stage]] table")
    tables = [("model", doc.get("model", {}), MODEL_FIELDS), ("train", doc.get("train", {}), TRAIN_FIELDS)]
    tables += [("stage", stage, {*TRAIN_FIELDS, "steps", "advance", "name"}) for stage in doc.get("stage", [])]
    for table, values, known in tables:
        bad = set(values) - set(known)
        if bad:
            hint = " (a stage changes training fields only)" if table == "stage" and set(values) & set(MODEL_FIELDS) else ""
            raise CRTError(f"preset {name_or_path!r} has unknown [{table}] keys {sorted(bad)}{hint}")
    return doc


def load_preset(name_or_path: str) -> tuple[ModelConfig, TrainConfig]:
    """A preset by name (a file in crt/configs/) or by path to a TOML file.

    The TOML has two tables, [model] and [train], whose keys are the dataclass fields, and
    optionally [[stage]] tables (see `load_curriculum`).
    """
    return _configs(_read_preset(name_or_path))


def _configs(doc: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    return apply_overrides(ModelConfig(), TrainConfig(), {**doc.get("model", {}), **doc.get("train", {})})


# Training fields a stage may not change: they define the run (its data, its seed, where it
# lives, its budget, its optimizer's groups) rather than the next difficulty.
_FIXED_IN_STAGES = (
    "task",
    "data",
    "data_dir",
    "tokenizer",
    "seed",
    "out_dir",
    "max_steps",
    "max_tokens",
    "device",
    "precision",
    "weight_decay",
    "beta1",
    "beta2",
)
# Validation scores a stage may advance on, and whether a higher score is better.
STAGE_METRICS = {"recall": True, "acc": True, "mean_class_acc": True, "ppl": False, "loss": False}


@dataclass(frozen=True)
class Stage:
    """One stage of a curriculum: a [[stage]] table of a preset.

    changes: training fields this stage sets (on top of [train] and every earlier stage).
    steps: the stage's step limit, counted from its first step.
    advance: "METRIC >= X" (or <=): the stage ends as soon as a validation passes it; a stage
        that reaches its step limit first has failed, and the run stops there. Empty: the stage
        simply runs `steps` steps. The last stage's condition ends the run early.
    name: a label for the logs (default: its changes).
    """

    changes: dict[str, Any]
    steps: int
    advance: str = ""
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or ", ".join(f"{k} = {v}" for k, v in self.changes.items()) or "no changes"

    def passed(self, scores: dict[str, float]) -> bool:
        metric, op, threshold = parse_condition(self.advance)
        value = scores.get(metric, float("nan"))
        return value >= threshold if op == ">=" else value <= threshold


def parse_condition(text: str) -> tuple[str, str, float]:
    """'recall >= 0.9' -> ('recall', '>=', 0.9); a CRTError names what is wrong."""
    parts = text.split()
    ok = len(parts) == 3 and parts[0] in STAGE_METRICS and parts[1] in (">=", "<=")
    try:
        threshold = float(parts[2]) if ok else math.nan
    except ValueError:
        ok = False
    if not ok or not math.isfinite(threshold):
        raise CRTError(f"stage condition {text!r}: write 'METRIC >= X' or 'METRIC <= X' with METRIC one of {', '.join(STAGE_METRICS)}")
    return parts[0], parts[1], threshold


def load_curriculum(name_or_path: str) -> list[Stage]:
    """The preset's [[stage]] tables, in order (empty: the run is one plain stage of max_steps)."""
    stages = []
    for i, table in enumerate(_read_preset(name_or_path).get("stage", []), 1):
        table = dict(table)
        steps, advance, name = table.pop("steps", None), table.pop("advance", ""), table.pop("name", "")
        where = f"preset {name_or_path!r}, stage {i}"
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise CRTError(f"{where}: give its step limit as steps = N (N >= 1)")
        if not isinstance(advance, str) or not isinstance(name, str):
            raise CRTError(f"{where}: advance and name are strings")
        if advance:
            parse_condition(advance)
        fixed = sorted(set(table) & set(_FIXED_IN_STAGES))
        if fixed:
            raise CRTError(f"{where} changes {fixed}, which a stage cannot change: set them in [train]")
        _, checked = apply_overrides(ModelConfig(), TrainConfig(), table)  # type-checks every value
        stages.append(Stage({k: getattr(checked, k) for k in table}, steps, advance, name))
    return stages


def without_fields(stages: list[Stage], pinned: set[str]) -> list[Stage]:
    """The stages with the fields in `pinned` (the user's explicit flags) taken out: what the
    user types wins over every stage."""
    return [dataclasses.replace(s, changes={k: v for k, v in s.changes.items() if k not in pinned}) for s in stages]


def stage_config(base: TrainConfig, stages: list[Stage], index: int) -> TrainConfig:
    """The training config in force during stage `index` (0-based): base plus stages 0..index."""
    changes: dict[str, Any] = {}
    for stage in stages[: index + 1]:
        changes.update(stage.changes)
    return dataclasses.replace(base, **changes)


def stages_to_list(stages: list[Stage]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(s) for s in stages]


def stages_from_list(items: Any) -> list[Stage]:
    """The stages a checkpoint recorded, checked (a damaged config.json is an error, not a crash later)."""
    keys = {f.name for f in fields(Stage)}
    ok = isinstance(items, list) and all(isinstance(i, dict) and set(i) <= keys and {"changes", "steps"} <= set(i) for i in items)
    stages = []
    for item in items if ok else []:
        ok = (
            ok
            and isinstance(item["changes"], dict)
            and isinstance(item["steps"], int)
            and not isinstance(item["steps"], bool)
            and item["steps"] >= 1
            and isinstance(item.get("advance", ""), str)
            and isinstance(item.get("name", ""), str)
            and set(item["changes"]) <= set(TRAIN_FIELDS)
        )
        if ok:
            if item.get("advance"):
                parse_condition(item["advance"])
            _, checked = apply_overrides(ModelConfig(), TrainConfig(), item["changes"])
            stages.append(Stage({k: getattr(checked, k) for k in item["changes"]}, item["steps"], item.get("advance", ""), item.get("name", "")))
    if not ok:
        raise CRTError("checkpoint config's stages are not a list of stages (changes, steps, advance, name): the checkpoint is damaged")
    return stages


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, d: Any) -> Any:
    """A ModelConfig or TrainConfig from a checkpoint's config.json section, every value
    type-checked (a damaged or hand-edited file is an error, not a crash later)."""
    if not isinstance(d, dict):
        raise CRTError(f"checkpoint config's {cls.__name__} section is {type(d).__name__}, not a table: the checkpoint is damaged")
    known = {f.name: f for f in fields(cls)}
    bad = set(d) - set(known)
    if bad:
        raise CRTError(f"checkpoint config has unknown {cls.__name__} keys {sorted(bad)}: it was written by another version of crt")
    try:
        return cls(**{k: _coerce(v, known[k].type, k) for k, v in d.items()})
    except CRTError as e:
        raise CRTError(f"checkpoint config: {e}; the checkpoint is damaged") from None
