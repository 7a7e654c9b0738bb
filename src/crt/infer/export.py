"""Export one segment step for other runtimes: ONNX (onnxruntime, ...) or a torch.export program
(.pt2: the input of ExecuTorch and AOTInductor).

The exported function is pure, with a fixed structure and no optional inputs:

    (tokens [B, L], *state) -> (logits [B, L, V], *next_state)

where `state` is the model's state flattened to tensors (CRT: memory [B, d_m], positions
[B, D]; Transformer-XL: its per-layer cache and mask; ...), so a runtime loops it over segments
feeding each call's state outputs back in. The initial state is written beside the program
(FILE.state.safetensors). Every export is checked before it is kept: the runtime must reproduce
PyTorch's logits and state over `check_segments` consecutive segments within `tolerance`, else
nothing is written and the command fails.

The tokenizer is written beside it too (FILE-stem.tokenizer.json), so an app can turn text into
the program's token ids and back: for bpe the HF `tokenizers` JSON itself (`Tokenizer.from_file`
in Python, Rust or JavaScript), for word, char and byte {"kind": ..., "vocab": [id -> string]}.

The int8 model is written beside it (FILE.int8.onnx or FILE.int8.pt2), with dynamic int8
quantization of the linear layers (int8 weights, activations quantized per call): for ONNX,
onnxruntime's quantizer rewrites the checked fp32 graph; for pt2, torchao quantizes the model
(linear layers, and embeddings to int8 rows) before torch.export (torch's own dynamic
quantization, `crt.infer.quantize_int8`, keeps packed weights that torch.export cannot save).
The int8 pt2 program must reproduce the int8 model it was made from within `tolerance`; the
difference of either int8 file from fp32 is reported, not bounded.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from crt.data.tokenizer import Tokenizer
from crt.errors import CRTError
from crt.files import umask_mode
from crt.layers import NCGRU

TOLERANCE = 1e-4  # max |difference| of fp32 logits and state, runtime vs PyTorch


class SegmentStep(nn.Module):
    """`model` as (tokens, *state tensors) -> (logits, *next state tensors), one segment per call."""

    def __init__(self, model: nn.Module, batch_size: int = 1):
        super().__init__()
        self.model, self.batch_size = model.eval(), batch_size
        leaves, self.spec = tree_flatten(model.init_state(batch_size, evaluation=True))
        self.initial = [s.detach().clone() for s in leaves]  # the state before the first segment

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, next_state = self.model(tokens, tree_unflatten(list(state), self.spec))
        leaves, spec = tree_flatten(next_state)
        if spec != self.spec:
            raise CRTError(f"{self.model.cfg.arch}'s state changes structure between segments: it cannot be exported as a fixed step")
        return (logits, *leaves)


def _freeze_cayley(model: nn.Module) -> None:
    """NCGRU's recurrent matrices are Cayley transforms (a linear solve) of its parameters; ONNX
    has no solver, and at inference they are constants: compute them once, in place."""
    for module in model.modules():
        if isinstance(module, NCGRU):
            U_c, U_r = module.recurrent_matrix().detach(), module.reset_matrix().detach()
            module.recurrent_matrix = lambda U=U_c: U  # instance attributes shadow the methods
            module.reset_matrix = lambda U=U_r: U


def _segments(step: SegmentStep, n: int, vocab_size: int, segment_len: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab_size, (step.batch_size, segment_len), generator=g) for _ in range(n)]


def _max_difference(ours: list[torch.Tensor], theirs: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(ours, theirs):
        b = torch.from_numpy(np.asarray(b))
        worst = max(worst, float((a.float() - b.float()).abs().max()) if a.numel() else 0.0)
    return worst


@torch.no_grad()
def _reference(step: SegmentStep, segments: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """PyTorch's outputs for each consecutive segment, the state fed back in."""
    state, outs = list(step.initial), []
    for tokens in segments:
        out = list(step(tokens, *state))
        outs.append(out)
        state = out[1:]
    return outs


def _run_loop(run, step: SegmentStep, segments: list[torch.Tensor]) -> list[list]:
    """A runtime's outputs for each segment, its own state outputs fed back in."""
    state, outs = [s.numpy() for s in step.initial], []
    for tokens in segments:
        out = run(tokens.numpy(), state)
        outs.append(out)
        state = out[1:]
    return outs


def _check(name: str, reference: list[list[torch.Tensor]], runtime: list[list], tolerance: float) -> float:
    worst = max(_max_difference(r, o) for r, o in zip(reference, runtime))
    if not worst <= tolerance:  # also catches NaN
        raise CRTError(f"{name} does not reproduce PyTorch over {len(reference)} segments: max |difference| {worst:.2e} > {tolerance:.0e}; nothing was written")
    return worst


def _int8_report(reference: list[list[torch.Tensor]], runtime: list[list]) -> dict[str, float]:
    """How far an int8 model's outputs are from fp32: max |difference| and the share of
    positions whose argmax (next-token prediction) is the same."""
    worst = max(_max_difference(r, o) for r, o in zip(reference, runtime))
    if not np.isfinite(worst):
        raise CRTError("the int8 model produced non-finite logits; nothing was written")
    agree = [float((torch.as_tensor(np.asarray(o[0])).argmax(-1) == r[0].argmax(-1)).float().mean()) for r, o in zip(reference, runtime)]
    return {"int8_max_difference": worst, "int8_agreement": sum(agree) / len(agree)}


def _torchao_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` for an int8 program, as `crt.infer.quantize_int8` does for eager torch:
    torchao's int8 dynamic quantization of the linear layers (int8 weights per output channel,
    activations quantized per token) and int8 embeddings (one scale per row, weight only), the
    weights unwrapped into plain int8 and float tensors so the exported program holds them as
    such. Loading the program needs `import torchao` (its quantize ops), as ExecuTorch's
    XNNPACK lowering does. GRUs stay fp32 (torchao quantizes linear layers and embeddings)."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # torchao logs every optional GPU kernel it cannot load, at import
        logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerAxis
        from torchao.utils import unwrap_tensor_subclass

        quantized = copy.deepcopy(model)
        quantize_(quantized, Int8DynamicActivationInt8WeightConfig())  # nn.Linear (tied heads get their own int8 copy)
        is_embedding = lambda module, _name: isinstance(module, nn.Embedding)  # noqa: E731
        quantize_(quantized, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)), filter_fn=is_embedding)
        return unwrap_tensor_subclass(quantized)
    except ImportError:
        raise CRTError('an int8 pt2 program needs torchao (the edge extra): pip install -e ".[edge]", or pass --no-int8') from None
    except Exception as e:  # one line for the user, whatever torchao raised
        raise CRTError(f"torchao could not quantize {model.cfg.arch} to int8 ({str(e).splitlines()[0][:200]}): try --no-int8; nothing was written") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _write_pt2(step: SegmentStep, example: tuple[torch.Tensor, ...], path: Path, what: str = ""):
    """torch.export `step` to `path`; return the saved program, loaded back, as a runtime.
    what: how the failure message names the model ("" or "the int8 copy of ")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(step, example)
        except Exception as e:  # one line for the user, whatever torch.export raised
            hint = ": try --no-int8" if what else ""
            raise CRTError(f"torch.export could not export {what}{step.model.cfg.arch} ({str(e).splitlines()[0][:200]}){hint}; nothing was written") from None
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path)).module()

    @torch.no_grad()
    def run(tokens: np.ndarray, state: list[np.ndarray]) -> list[np.ndarray]:
        return [o.numpy() for o in loaded(torch.from_numpy(tokens), *[torch.from_numpy(np.asarray(s)) for s in state])]

    return run


def _onnx_session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise CRTError('checking an ONNX export needs onnxruntime (the edge extra): pip install -e ".[edge]"') from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(tokens: np.ndarray, state: list[np.ndarray]) -> list[np.ndarray]:
        return session.run(None, dict(zip(names, [tokens, *state])))

    return run


def write_onnx(module: nn.Module, example: tuple, path: Path, purpose: str, what: str, hint: str = "", **names) -> None:
    """torch.onnx.export of `module` traced on `example` into one self-contained file at `path`.

    purpose: what needs the exporter, for the missing-extra error; what: the model part named when
    the export fails (with the exporter's reason in one line, then `hint`); names: input_names,
    output_names and opset_version, passed on."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise CRTError(f'{purpose} needs onnx and onnxscript (the edge extra): pip install -e ".[edge]"') from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, example, str(path), dynamo=True, verbose=False, external_data=False, **names)  # external_data=False: one file
        except CRTError:  # the model's own refusal, already one line
            raise
        except Exception as e:  # the exporter raises many types; the user needs the reason in one line
            reason = next((line.strip() for line in str(e).splitlines() if "Error" in line or "Cannot" in line), type(e).__name__)
            raise CRTError(f"torch.onnx could not export {what} ({reason[:200]}){hint}") from None


def _write_onnx(step: SegmentStep, example: tuple[torch.Tensor, ...], path: Path) -> None:
    n_state = len(example) - 1
    write_onnx(
        step,
        example,
        path,
        "ONNX export",
        step.model.cfg.arch,
        ": try --format pt2; nothing was written",
        input_names=["tokens"] + [f"state_in_{i}" for i in range(n_state)],
        output_names=["logits"] + [f"state_out_{i}" for i in range(n_state)],
    )


def export(
    model: nn.Module,
    fmt: str,
    out: str | Path,
    batch_size: int = 1,
    check_segments: int = 4,
    tolerance: float = TOLERANCE,
    int8: bool = True,
    tokenizer: Tokenizer | None = None,
) -> dict[str, object]:
    """Write the segment step of `model` to `out` as onnx or pt2, checked against PyTorch.

    Also writes OUT.state.safetensors (the initial state, in input order) and, with int8=True,
    OUT with suffix .int8.onnx or .int8.pt2 (dynamic int8 quantization of the linear layers;
    its difference from fp32 is reported, not bounded), and with a tokenizer OUT-stem.tokenizer.json.
    Returns {path, int8_path, max_difference, int8_max_difference, int8_agreement, state_path, tokenizer_path}.
    """
    from safetensors.torch import save_file

    if fmt not in ("onnx", "pt2"):
        raise CRTError(f"unknown export format {fmt!r}: use onnx or pt2")
    out = Path(out)
    if out.is_dir():
        raise CRTError(f"{out} is a folder: give --out a file name (e.g. model.{fmt})")
    tokenizer_path = out.parent / f"{out.stem}.tokenizer.json" if tokenizer is not None else None
    targets = [out, out.parent / (out.name + ".state.safetensors")] + ([out.parent / f"{out.stem}.int8.{fmt}"] if int8 else [])
    targets += [tokenizer_path] if tokenizer_path else []
    for target in targets:  # a file we write may replace an earlier export, never a device, a pipe or a link
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise CRTError(f"{target} exists and is not a regular file (a device, a pipe, a link?): export writes only files; give --out another path")
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise CRTError(f"cannot write to {out.parent} ({e.strerror}): give --out a path in a folder you can write to") from None
    try:
        model = copy.deepcopy(model).cpu().eval()  # the caller's model stays as it was
        _freeze_cayley(model)
        step = SegmentStep(model, batch_size)
        cfg = model.cfg
        segment_len = cfg.eval_segment
        segments = _segments(step, check_segments, cfg.vocab_size, segment_len)
        reference = _reference(step, segments)
        example = (segments[0], *step.initial)
        result: dict[str, object] = {"path": out, "int8_path": None}
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_out = Path(tmp) / out.name
            if fmt == "onnx":
                _write_onnx(step, example, tmp_out)
                result["max_difference"] = _check("the ONNX export (onnxruntime)", reference, _run_loop(_onnx_session(tmp_out), step, segments), tolerance)
                if int8:
                    import onnx
                    from onnxruntime.quantization import QuantType, quantize_dynamic

                    # the exporter's intermediate shape annotations trip onnxruntime's own shape
                    # inference; without them it infers every shape afresh
                    graph = onnx.load(str(tmp_out))
                    del graph.graph.value_info[:]
                    stripped, tmp_int8 = Path(tmp) / "stripped.onnx", Path(tmp) / (out.stem + ".int8.onnx")
                    onnx.save(graph, str(stripped))
                    root = logging.getLogger()
                    level = root.level
                    root.setLevel(logging.ERROR)  # the quantizer logs advice on the root logger
                    try:
                        quantize_dynamic(str(stripped), str(tmp_int8), weight_type=QuantType.QInt8)
                    except Exception as e:  # one line for the user, whatever onnxruntime raised
                        raise CRTError(
                            f"onnxruntime could not quantize the ONNX step to int8 ({str(e).splitlines()[0][:200]}): try --no-int8; nothing was written"
                        ) from None
                    finally:
                        root.setLevel(level)
                    stripped.unlink()
                    result.update(_int8_report(reference, _run_loop(_onnx_session(tmp_int8), step, segments)))
            else:
                result["max_difference"] = _check(
                    "the torch.export program", reference, _run_loop(_write_pt2(step, example, tmp_out), step, segments), tolerance
                )
                if int8:
                    int8_step = SegmentStep(_torchao_int8(model), batch_size)
                    runtime = _run_loop(_write_pt2(int8_step, example, Path(tmp) / (out.stem + ".int8.pt2"), "the int8 copy of "), step, segments)
                    _check("the int8 torch.export program", _reference(int8_step, segments), runtime, tolerance)
                    result.update(_int8_report(reference, runtime))
            state_path = Path(tmp) / (out.name + ".state.safetensors")
            save_file({f"state_in_{i}": s.contiguous() for i, s in enumerate(step.initial)}, str(state_path))
            if tokenizer is not None:
                (Path(tmp) / tokenizer_path.name).write_text(tokenizer_json(tokenizer), encoding="utf-8")
            # every file checked: move them into place (rename is atomic on one filesystem)
            for f in Path(tmp).iterdir():
                umask_mode(f)
                os.replace(f, out.parent / f.name)
    except BaseException:
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)  # the folders this export made: a failure leaves none
        raise
    if int8:
        result["int8_path"] = out.parent / f"{out.stem}.int8.{fmt}"
    result["state_path"] = out.parent / (out.name + ".state.safetensors")
    result["tokenizer_path"] = tokenizer_path
    return result


def tokenizer_json(tokenizer: Tokenizer) -> str:
    """What an app needs to tokenize: for bpe the HF tokenizers JSON, else the kind and the vocab."""
    meta = tokenizer.to_meta()
    return meta["hf"] if tokenizer.kind == "bpe" else json.dumps({**meta, "vocab": tokenizer.labels()}, ensure_ascii=False)
