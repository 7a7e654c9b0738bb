"""Per-token generation outside Python's per-op dispatch: the model's own stream methods,
exported to ONNX with a fixed-size segment cache and run by onnxruntime.

`crt.infer.Stream` calls `model.open_segment / step / close_segment` in eager PyTorch, where
each of the few hundred small ops of one token costs a Python dispatch. Here the same three
methods are traced, once each, into graphs over flat tensors:

    open   (*state)            -> (*segment)             model.open_segment (CRT: the memory token W_m m + b_m)
    step   (tokens [B], *segment) -> (logits [B, V], *segment)   model.step, one position
    close  (*segment)          -> (*state)               model.close_segment (CRT: m_n, r_n)

`segment` is the model's `SegmentCache` flattened: every layer's keys and values in a
`FixedKVCache` of S positions (all the segment ever uses: CRT's memory token and L tokens) with
the count written so far, the position offset as a tensor, the opening state, and whatever the
model keeps beside them (CRT: the memory RNN's running state, the positional GRU's r). The maths
stays the model's: the runtime only changes the cache its attention writes to, so a model is
supported when its stream keeps the same tensors at every position. One that does not
(Transformer-XL, whose step re-reads a growing list of layer inputs) is refused with the reason,
and `open_stream(..., runtime="auto")` falls back to the eager `Stream` and says so.

Before use the three graphs are checked: onnxruntime, looping them over `check_segments`
consecutive segments of random tokens, must give the logits and states of the PyTorch segment
path (`model(tokens [B, L], state)`, state carried) within `TOLERANCE`, else nothing is used.
Exported graphs are cached on disk (CACHE_DIR, keyed by the weights, the config and the
versions of torch and onnxruntime), so only a model's first stream pays for the export.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import register_pytree_node, tree_flatten, tree_unflatten

from crt.errors import CRTError
from crt.infer.export import SegmentStep, _freeze_cayley, _write_onnx, write_onnx
from crt.layers import FixedKVCache, KVCache, SegmentCache

TOLERANCE = 1e-4  # max |difference| of fp32 logits and state, onnxruntime vs the PyTorch segment path
CHECK_SEGMENTS = 3  # consecutive segments (so 2 boundaries and more) the graphs must reproduce
CACHE_DIR = Path(os.environ.get("CRT_CACHE_DIR", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crt")) / "token-runtime"
GRAPHS = ("open", "step", "close")


# A segment as a pytree: its attributes in name order (models add their own), each FixedKVCache
# as (k, v, length). KVCache stays a leaf: an eager segment is never flattened into a graph.
def _flatten_segment(segment: SegmentCache):
    names = sorted(vars(segment))
    return [getattr(segment, n) for n in names], names


def _unflatten_segment(values, names) -> SegmentCache:
    segment = SegmentCache.__new__(SegmentCache)  # its attributes come from the leaves, not __init__
    for n, v in zip(names, values):
        setattr(segment, n, v)
    return segment


register_pytree_node(SegmentCache, _flatten_segment, _unflatten_segment)
register_pytree_node(FixedKVCache, lambda c: ([c.k, c.v, c.length], None), lambda leaves, _: FixedKVCache(*leaves))


class Layout:
    """What the graphs of `model` exchange, found by streaming one eager segment from the initial
    state: the flat state and segment structures, the cache size S and, for what a segment opens
    without (an empty cache, CRT's latest output), the tensor a step puts there.

    Raises CRTError, with the reason, for a model whose stream cannot be a fixed-size graph."""

    def __init__(self, model: nn.Module, batch_size: int):
        name = type(model).__name__
        if not all(callable(getattr(model, m, None)) for m in ("open_segment", "step", "close_segment")):
            raise CRTError(f"{name} has no token-by-token stream")
        self.segment_len, self.batch_size = model.cfg.eval_segment, batch_size
        initial = model.init_state(batch_size, evaluation=True)
        leaves, self.state_spec = tree_flatten(initial)
        self.state_leaves = [t.detach() for t in leaves]  # a learned m_0 needs no gradient here
        with torch.no_grad():
            segment = model.open_segment(initial)
            if not isinstance(segment, SegmentCache) or not all(isinstance(c, KVCache) for c in segment.layers):
                raise CRTError(f"{name}'s stream keeps no per-layer KVCache to fix in size")
            unset = {n for n, v in vars(segment).items() if v is None}  # what a step sets (CRT: its latest output)
            structures = []
            for _ in range(min(2, self.segment_len)):
                model.step(segment, torch.zeros(batch_size, dtype=torch.long))
                structures.append(tree_flatten({n: v for n, v in vars(segment).items() if n != "layers"})[1])
            if len(structures) == 2 and structures[0] != structures[1]:
                raise CRTError(f"{name}'s stream changes what it keeps from one token to the next (a growing list): it has no fixed-size step")
            self.like = {n: v for n, v in vars(segment).items() if n in unset and isinstance(v, torch.Tensor)}
            self.keys = [c.k for c in segment.layers]  # [B, H, t, hd] per layer: shape and dtype of its buffers
            for _ in range(self.segment_len - len(structures)):
                model.step(segment, torch.zeros(batch_size, dtype=torch.long))
            model.close_segment(segment)
        self.size = max((len(c) for c in segment.layers), default=0)  # S: every position a segment uses, closing included
        self.segment_spec = tree_flatten(self.fixed(model.open_segment(initial)))[1]
        # a model that carries nothing (the Transformer) has no close graph: a boundary only opens
        self.graphs = GRAPHS if self.state_leaves else GRAPHS[:2]

    def fixed(self, segment: SegmentCache) -> SegmentCache:
        """An opened eager segment with fixed-size caches, its offset a tensor and every attribute
        it opens without (None) set to zeros of what a step puts there."""
        segment.layers = [FixedKVCache.of(c, self.size, like) for c, like in zip(segment.layers, self.keys)]
        segment.offset = torch.tensor(segment.offset, dtype=torch.long)
        for n, like in self.like.items():
            if getattr(segment, n) is None:
                setattr(segment, n, torch.zeros_like(like))
        return segment


class _Graph(nn.Module):
    """One of the model's stream methods over flat tensors (what torch.onnx traces)."""

    def __init__(self, model: nn.Module, layout: Layout, method: str):
        super().__init__()
        self.model, self.layout, self.method = model, layout, method
        self.eval()  # the model is; the wrapper too, so the exporter traces inference

    def _segment_leaves(self, segment: SegmentCache) -> list[torch.Tensor]:
        leaves, spec = tree_flatten(segment)
        if spec != self.layout.segment_spec:
            raise CRTError(f"{type(self.model).__name__}'s segment changes structure in {self.method}: it has no fixed-size step")
        return leaves

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layout = self.layout
        if self.method == "open":  # (*state) -> (*segment)
            return tuple(self._segment_leaves(layout.fixed(self.model.open_segment(tree_unflatten(list(inputs), layout.state_spec)))))
        if self.method == "step":  # (tokens [B], *segment) -> (logits [B, V], *segment)
            segment = tree_unflatten(list(inputs[1:]), layout.segment_spec)
            logits = self.model.step(segment, inputs[0])  # [B, V]
            return (logits, *self._segment_leaves(segment))
        leaves, spec = tree_flatten(self.model.close_segment(tree_unflatten(list(inputs), layout.segment_spec)))  # (*segment) -> (*state)
        if spec != layout.state_spec:
            raise CRTError(f"{type(self.model).__name__}'s state changes structure between segments: it has no fixed-size step")
        return tuple(leaves)


def _examples(graph: _Graph, layout: Layout) -> tuple[torch.Tensor, ...]:
    """Inputs to trace `graph` with: the initial state, its opened segment, one token. Each a
    copy of its own: the exporter would trace two inputs that are one tensor (CRT's segment
    opens with memory = state.memory) as one input."""
    with torch.no_grad():
        segment = [t.clone() for t in _Graph(graph.model, layout, "open")(*layout.state_leaves)]
    if graph.method == "open":
        return tuple(t.clone() for t in layout.state_leaves)
    tokens = torch.zeros(layout.batch_size, dtype=torch.long)  # [B]
    return (tokens, *segment) if graph.method == "step" else tuple(segment)


def _export(graph: _Graph, example: tuple[torch.Tensor, ...], path: Path) -> None:
    write_onnx(
        graph,
        example,
        path,
        "the onnxruntime per-token step",
        f"{graph.model.cfg.arch}'s {graph.method}",
        opset_version=23,  # SDPA as one Attention op
        input_names=[f"in_{i}" for i in range(len(example))],
    )


@contextlib.contextmanager
def _quiet():
    """The exporter logs what it skips (torchvision's ops, initializers it cannot deduplicate) as
    warnings, and warns about its own internals: none of it concerns the user of a checked graph."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _session(path: Path):
    """An onnxruntime session as edge inference runs it: one thread, ops in sequence, every graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # one line for the user, whatever onnxruntime raised
        raise CRTError(f"onnxruntime could not load {path.name} ({str(e).splitlines()[0][:200]})") from None


def _cache_key(model: nn.Module, batch_size: int, kind: str) -> str:
    """The weights, the config, the batch size, the kind of graphs and the code and versions that made them."""
    import onnxruntime as ort

    import crt

    meta = [dataclasses.asdict(model.cfg), batch_size, kind, torch.__version__, ort.__version__]
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for source in sorted(Path(crt.__file__).parent.rglob("*.py")):
        h.update(source.read_bytes())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


class _Binding:
    """One graph's run with every input and output bound to numpy buffers of its own: a step
    reads the segment the last call wrote, with no per-call conversion (numpy in and out of
    session.run costs more than CRT's whole step)."""

    def __init__(self, session, inputs: list[np.ndarray], outputs: list[np.ndarray], input_names: list[str] | None = None):
        import onnxruntime as ort

        self.session, self.binding = session, session.io_binding()
        self.keep = (inputs, outputs)  # the buffers the OrtValues point into
        names = {meta.name for meta in session.get_inputs()}  # an input the graph never reads may be pruned
        for name, buffer in zip(input_names or [f"in_{i}" for i in range(len(inputs))], inputs):
            if name in names:
                self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buffer))
        for meta, buffer in zip(session.get_outputs(), outputs):
            self.binding.bind_ortvalue_output(meta.name, ort.OrtValue.ortvalue_from_numpy(buffer))

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)  # writes the output buffers in place


class TokenRuntime:
    """`Stream`'s interface, `feed(tokens [B]) -> logits [B, V]`, run by onnxruntime: the model's
    open_segment / step / close_segment exported with fixed-size caches (see the module doc).

    Raises CRTError when the model cannot run this way (the reason in one line); open_stream's
    runtime="auto" then falls back to the eager Stream.
    model: a crt language model on the CPU; batch_size: parallel streams B, fixed in the graphs.
    check_segments: consecutive segments onnxruntime must reproduce the PyTorch segment path over.
    cache: keep the exported graphs in CACHE_DIR (False: export every time).
    """

    def __init__(self, model: nn.Module, batch_size: int = 1, check_segments: int = CHECK_SEGMENTS, cache: bool = True):
        _require_cpu_fp32(model)
        self.model, self.cfg = model.eval(), model.cfg
        frozen = _frozen(model)
        self.layout = layout = Layout(frozen, batch_size)

        def write(folder: Path) -> None:
            for g in layout.graphs:
                graph = _Graph(frozen, layout, g)
                _export(graph, _examples(graph, layout), folder / f"{g}.onnx")

        self.sessions, source = _sessions(_cache_key(frozen, batch_size, "token") if cache else None, layout.graphs, write)
        with torch.no_grad():
            self._bind([t.numpy() for t in _Graph(frozen, layout, "open")(*layout.state_leaves)])
        self.segment_len = layout.segment_len
        self.max_difference = self._check(check_segments)
        self.runtime = (
            f"onnxruntime per-token step ({source}, checked against PyTorch over {check_segments} segments: max |difference| {self.max_difference:.1e})"
        )

    def _bind(self, segment: list[np.ndarray]) -> None:
        """Buffers for the state, two segments (a step reads one and writes the other) and the
        token and logits, and each graph's run bound to them."""
        layout = self.layout
        self.initial = [t.detach().numpy().copy() for t in layout.state_leaves]
        self.state_buffers = [a.copy() for a in self.initial]
        segments = [[a.copy() for a in segment] for _ in range(2)]
        self.tokens = np.zeros(layout.batch_size, dtype=np.int64)  # [B]
        self.logits = np.zeros((layout.batch_size, self.cfg.vocab_size), dtype=np.float32)  # [B, V]
        run = self.sessions
        self.open = _Binding(run["open"], self.state_buffers, segments[0])
        self.steps = [_Binding(run["step"], [self.tokens, *segments[i]], [self.logits, *segments[1 - i]]) for i in range(2)]
        self.closes = [_Binding(run["close"], segments[i], self.state_buffers) if "close" in run else (lambda: None) for i in range(2)]
        self.reset()

    def reset(self) -> None:
        """Back to the initial state, a segment opened from it."""
        for buffer, initial in zip(self.state_buffers, self.initial):
            buffer[...] = initial
        self.open()
        self.current, self.fed = 0, 0  # the segment buffers holding the open segment; its tokens so far

    @property
    def state(self) -> tuple:
        """The state the current segment opened from, as the model's state type (as Stream.state)."""
        return tree_unflatten([torch.from_numpy(b.copy()) for b in self.state_buffers], self.layout.state_spec)

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> logits [B, V] for the next token."""
        self.tokens[...] = tokens.view(-1).cpu().numpy()
        self.steps[self.current]()
        self.current, self.fed = 1 - self.current, self.fed + 1
        logits = torch.from_numpy(self.logits.copy())  # [B, V]; the buffer is overwritten by the next step
        if self.fed == self.segment_len:  # close the segment, open the next from its state
            self.closes[self.current]()
            self.open()
            self.current, self.fed = 0, 0
        return logits

    @torch.no_grad()
    def _check(self, n: int) -> float:
        """Max |difference| of this runtime's logits and states from the PyTorch segment path,
        `model(tokens [B, L], state)` with the state carried, over n segments of seeded random
        tokens. Raises CRTError beyond TOLERANCE. Leaves the runtime reset."""
        g = torch.Generator().manual_seed(0)
        state, worst = self.model.init_state(self.layout.batch_size, evaluation=True), 0.0
        for _ in range(n):
            tokens = torch.randint(self.cfg.vocab_size, (self.layout.batch_size, self.segment_len), generator=g)  # [B, L]
            logits, state = self.model(tokens, state)  # [B, L, V]
            ours = torch.stack([self.feed(tokens[:, t]) for t in range(self.segment_len)], dim=1)  # [B, L, V]
            worst = max(worst, _worst([(ours, logits), *zip(tree_flatten(self.state)[0], tree_flatten(state)[0])]))
        if not worst <= TOLERANCE:  # also catches NaN
            raise CRTError(f"the onnxruntime per-token step does not reproduce PyTorch over {n} segments: max |difference| {worst:.2e} > {TOLERANCE:.0e}")
        self.reset()
        return worst


def _sessions(key: str | None, graphs: tuple[str, ...], write: Callable[[Path], None]) -> tuple[dict, str]:
    """onnxruntime sessions of `graphs` (NAME.onnx) from the cache folder `key` names, or written
    now by write(folder) (and then kept in the cache when it can be written), and where they
    came from. key None: no cache."""
    folder = None if key is None else CACHE_DIR / key
    if folder is not None and all((folder / f"{g}.onnx").is_file() for g in graphs):
        return {g: _session(folder / f"{g}.onnx") for g in graphs}, f"cached in {folder}"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crt-runtime-") as tmp:
        made = Path(tmp) / "graphs"
        made.mkdir()
        with _quiet():
            write(made)
        sessions = {g: _session(made / f"{g}.onnx") for g in graphs}
        source = f"exported on the fly in {time.perf_counter() - start:.1f}s"
        if folder is None:
            return sessions, source
        try:  # a cache that cannot be written is skipped: the next run exports again
            staging = folder.parent / f".{folder.name}.{os.getpid()}"
            folder.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(made, staging)
            os.replace(staging, folder)  # whole or not at all
            return sessions, f"{source}, cached in {folder}"
        except OSError:
            return sessions, f"{source} (the cache {CACHE_DIR} could not be written)"


def _require_cpu_fp32(model: nn.Module) -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise CRTError('onnxruntime is not installed (the edge extra: pip install -e ".[edge]")') from None
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise CRTError(f"onnxruntime runs on the CPU here; the model is on {device}")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise CRTError("the onnxruntime graphs are exported from fp32 models (this one has other weights, e.g. int8)")


def _frozen(model: nn.Module) -> nn.Module:
    """A CPU copy to export (the caller's model stays as it was), NCGRU's Cayley matrices constants."""
    frozen = copy.deepcopy(model).cpu().eval()
    _freeze_cayley(frozen)
    return frozen


def _worst(pairs) -> float:
    """max |a - b| over (ours, PyTorch's) tensor pairs; NaN propagates."""
    return max([0.0, *(float((torch.as_tensor(a).float() - b.float()).abs().max()) for a, b in pairs if b.numel())])


class SegmentRuntime:
    """`crt score`'s whole segments through onnxruntime: crt.infer.export's segment step
    (tokens [B, L], *state) -> (logits [B, L, V], *state), exported once (cached like the
    token graphs) and checked against PyTorch. Calling it with tokens [B, T] returns logits
    [B, T, V] with the state carried; a shorter last segment (T < L) runs in PyTorch.
    """

    def __init__(self, model: nn.Module, batch_size: int = 1, check_segments: int = CHECK_SEGMENTS, cache: bool = True):
        _require_cpu_fp32(model)
        self.model, self.cfg = model.eval(), model.cfg
        frozen, L = _frozen(model), model.cfg.eval_segment
        self.segment_len, self.batch_size = L, batch_size
        step = SegmentStep(frozen, batch_size)
        self.initial, self.spec = [t.detach().numpy().copy() for t in step.initial], step.spec
        example = (torch.zeros(batch_size, L, dtype=torch.long), *step.initial)
        key = _cache_key(frozen, batch_size, "segment") if cache else None
        sessions, source = _sessions(key, ("segment",), lambda folder: _write_onnx(step, example, folder / "segment.onnx"))
        self.tokens = np.zeros((batch_size, L), dtype=np.int64)  # [B, L]
        self.logits = np.zeros((batch_size, L, self.cfg.vocab_size), dtype=np.float32)  # [B, L, V]
        states = [[a.copy() for a in self.initial] for _ in range(2)]  # a call reads one and writes the other
        names = ["tokens"] + [f"state_in_{i}" for i in range(len(self.initial))]
        self.runs = [_Binding(sessions["segment"], [self.tokens, *states[i]], [self.logits, *states[1 - i]], names) for i in range(2)]
        self.states = states
        self.max_difference = self._check(check_segments)
        self.runtime = (
            f"onnxruntime segment step ({source}, checked against PyTorch over {check_segments} segments: max |difference| {self.max_difference:.1e})"
        )

    def reset(self) -> None:
        self.current = 0  # the state buffers holding the state
        for buffer, initial in zip(self.states[0], self.initial):
            buffer[...] = initial

    @property
    def state(self) -> tuple:
        """The state after the segments so far, as the model's state type."""
        return tree_unflatten([torch.from_numpy(b.copy()) for b in self.states[self.current]], self.spec)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T], T <= L -> logits [B, T, V]; the state moves on by T tokens."""
        if tokens.shape[1] != self.segment_len:  # a shorter last segment: PyTorch, from the same state
            with torch.no_grad():
                logits, state = self.model(tokens, self.state)
            for buffer, t in zip(self.states[self.current], tree_flatten(state)[0]):
                buffer[...] = t.numpy()
            return logits
        self.tokens[...] = tokens.cpu().numpy()
        self.runs[self.current]()
        self.current = 1 - self.current
        return torch.from_numpy(self.logits.copy())  # [B, L, V]; the buffer is overwritten by the next call

    @torch.no_grad()
    def _check(self, n: int) -> float:
        """As TokenRuntime._check, for whole segments."""
        g = torch.Generator().manual_seed(0)
        state, worst = self.model.init_state(self.batch_size, evaluation=True), 0.0
        self.reset()
        for _ in range(n):
            tokens = torch.randint(self.cfg.vocab_size, (self.batch_size, self.segment_len), generator=g)  # [B, L]
            logits, state = self.model(tokens, state)  # [B, L, V]
            worst = max(worst, _worst([(self(tokens), logits), *zip(tree_flatten(self.state)[0], tree_flatten(state)[0])]))
        if not worst <= TOLERANCE:  # also catches NaN
            raise CRTError(f"the onnxruntime segment step does not reproduce PyTorch over {n} segments: max |difference| {worst:.2e} > {TOLERANCE:.0e}")
        self.reset()
        return worst
