"""Edge inference: segment-step export (ONNX, torch.export) checked against PyTorch, int8, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_helpers import in_process, one_line_error

from crt.errors import CRTError
from crt.infer.export import export
from crt.infer.quantize import quantize_int8
from crt.runtime import resolve_precision

V, L = 41, 6
TINY = dict(vocab_size=V, segment_len=L, dropout=0.1, emb_dropout=0.1)  # the conftest tiny_lm fields of this module


def torch_segments(model, segments: list[torch.Tensor]) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    from torch.utils._pytree import tree_flatten

    from crt.state import iter_segments

    with torch.no_grad():
        steps = iter_segments(model, torch.cat(segments, dim=1), model.init_state(segments[0].shape[0], evaluation=True), segments[0].shape[1])
        return [(logits, tree_flatten(state)[0]) for _, logits, state in steps]


def initial_state(path) -> list[np.ndarray]:
    from safetensors.numpy import load_file

    saved = load_file(str(path))
    return [saved[f"state_in_{i}"] for i in range(len(saved))]


ONNX_MODELS = [
    ("crt", {}),
    ("crt", {"memory_cell": "ncgru"}),
    ("crt", {"memory_cell": "mingru", "position_cell": "mingru"}),
    ("transformer", {}),
    ("transformer_xl", {}),
    ("transformer_xl", {"mem_len": 4, "same_length": True}),
    ("rmt", {}),
    ("armt", {}),
]


@pytest.mark.parametrize("arch,kw", ONNX_MODELS, ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()))
def test_onnx_step_loops_like_pytorch(tmp_path, arch, kw, tiny_lm):
    """onnxruntime, looping the exported step over 7 segments with its own state outputs fed back
    (more than the export's own check), reproduces the PyTorch segment path."""
    ort = pytest.importorskip("onnxruntime", reason="the edge extra: pip install -e '.[edge]'")
    pytest.importorskip("onnxscript", reason="the edge extra: pip install -e '.[edge]'")
    model = tiny_lm(arch, **kw)
    r = export(model, "onnx", tmp_path / "step.onnx", batch_size=2, int8=arch == "crt" and not kw)
    assert r["max_difference"] <= 1e-4
    segments = [torch.randint(V, (2, L), generator=torch.Generator().manual_seed(10 + i)) for i in range(7)]
    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    state = initial_state(r["state_path"])
    for tokens, (logits, next_state) in zip(segments, torch_segments(model, segments)):
        out = session.run(None, dict(zip(names, [tokens.numpy(), *state])))
        np.testing.assert_allclose(out[0], logits.numpy(), atol=1e-4, rtol=1e-4)
        for a, b in zip(out[1:], next_state):
            np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)
        state = out[1:]
    if r["int8_path"]:  # a valid model onnxruntime runs, with int8 weights (smaller than fp32)
        int8 = ort.InferenceSession(str(r["int8_path"]), providers=["CPUExecutionProvider"])
        out = int8.run(None, dict(zip(names, [segments[0].numpy(), *initial_state(r["state_path"])])))
        assert out[0].shape == (2, L, V) and np.isfinite(out[0]).all()
        assert any(i.data_type == 3 for i in __import__("onnx").load(str(r["int8_path"])).graph.initializer)  # INT8 tensors


def test_pt2_int8_program_has_int8_weights_and_tracks_fp32(tmp_path, tiny_lm):
    """The int8 pt2 program (torchao's dynamic quantization of the linear layers) loads, holds int8
    weights, reproduces the int8 model (checked inside export) and stays near fp32."""
    pytest.importorskip("torchao", reason="the edge extra: pip install -e '.[edge]'")
    model = tiny_lm("crt", d_model=64, d_ff=128)
    r = export(model, "pt2", tmp_path / "step.pt2")
    assert r["int8_path"] == tmp_path / "step.int8.pt2" and r["int8_path"].is_file()
    assert r["int8_agreement"] >= 0.9 and 0 < r["int8_max_difference"] < 0.5  # int8 differs from fp32, a little
    program = torch.export.load(str(r["int8_path"]))
    int8_weights = [k for k, t in program.state_dict.items() if k.endswith("weight.original0") and t.dtype == torch.int8]
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    assert len(int8_weights) == sum(isinstance(m, kinds) for m in model.modules()) == 11  # every linear layer and the embedding
    tokens = torch.randint(V, (1, L), generator=torch.Generator().manual_seed(0))
    state = [torch.from_numpy(s) for s in initial_state(r["state_path"])]
    with torch.no_grad():
        out = program.module()(tokens, *state)
        ref, _ = model(tokens, model.init_state(1, evaluation=True))
    assert (out[0].argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_pt2_int8_without_torchao_is_one_clear_error(tmp_path, monkeypatch, tiny_lm):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if torchao were absent
    with pytest.raises(CRTError, match=r"needs torchao .*pip install -e \"\.\[edge\]\", or pass --no-int8"):
        export(tiny_lm(), "pt2", tmp_path / "x" / "step.pt2")
    assert not (tmp_path / "x").exists()  # nothing written, not even the folder the export made


def test_onnx_exporter_failure_is_one_clear_error(tmp_path, monkeypatch, tiny_lm):
    """Whatever torch.onnx raises (here a many-line error, as its decomposition failures are), the
    export says in one line what failed, suggests pt2, and leaves nothing behind."""
    pytest.importorskip("onnxscript", reason="the edge extra: pip install -e '.[edge]'")

    def failing(*args, **kwargs):
        raise RuntimeError("Failed to decompose the FX graph.\n## Exception summary\nValueError: Cannot view a tensor\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", failing)
    with pytest.raises(
        CRTError, match=r"torch.onnx could not export transformer_xl \(ValueError: Cannot view a tensor\): try --format pt2; nothing was written"
    ) as e:
        export(tiny_lm("transformer_xl"), "onnx", tmp_path / "x" / "step.onnx")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()


def test_export_that_does_not_reproduce_fails_and_writes_nothing(tmp_path, monkeypatch, tiny_lm):
    pytest.importorskip("onnxruntime", reason="the edge extra: pip install -e '.[edge]'")
    pytest.importorskip("onnxscript", reason="the edge extra: pip install -e '.[edge]'")
    import crt.infer.export as ex

    real = ex._onnx_session

    def drifting(path):
        run = real(path)
        return lambda tokens, state: [o + 1e-3 for o in run(tokens, state)]  # a runtime that is slightly off

    monkeypatch.setattr(ex, "_onnx_session", drifting)
    out = tmp_path / "out"
    with pytest.raises(CRTError, match="does not reproduce PyTorch over 4 segments.*nothing was written"):
        export(tiny_lm(), "onnx", out / "step.onnx")
    assert not out.exists()


@pytest.mark.parametrize("arch", ["crt", "transformer", "transformer_xl", "rmt", "armt"])
def test_int8_quantizes_linear_gru_and_embedding_layers(arch, tiny_lm):
    model = tiny_lm(arch)
    from torch.ao.nn.quantized import Embedding, dynamic

    q = quantize_int8(model)
    assert any(isinstance(m, dynamic.Linear) for m in q.modules())
    assert not any(type(m) in (torch.nn.Linear, torch.nn.GRU, torch.nn.Embedding) for m in q.modules())  # every float one was replaced
    assert isinstance(q.tokens.embed, Embedding) and q.tokens.embed.weight().dtype == torch.quint8
    if arch == "crt":
        assert sum(isinstance(m, dynamic.GRU) for m in q.modules()) == 2  # memory RNN and recurrent positions
    tokens = torch.randint(V, (2, L), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, _ = model(tokens, model.init_state(2, evaluation=True))
        out, _ = q(tokens, q.init_state(2, evaluation=True))
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05  # 8-bit weights: about 1% relative error expected
    assert any(isinstance(m, torch.nn.Linear) for m in model.modules())  # the original is left fp32


def test_cli_generate_score_eval_int8_and_export(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = [
        "--d-model",
        "32",
        "--n-layer",
        "1",
        "--d-ff",
        "64",
        "--max-steps",
        "3",
        "--eval-every",
        "0",
        "--no-progress",
        "--no-stages",
        "--synth-train-docs",
        "60",
        "--synth-valid-docs",
        "5",
        "--synth-test-docs",
        "5",
    ]
    assert in_process(capsys, "train", "--preset", "synthetic-crt", *tiny, "--out-dir", "r").returncode == 0
    greedy = in_process(capsys, "generate", "--checkpoint", "r", "--prompt", "<doc> k3 v7", "--max-new-tokens", "9", "--temperature", "0")
    assert greedy.returncode == 0, greedy.stderr
    words = greedy.stdout.split()
    assert words[:3] == ["<doc>", "k3", "v7"] and len(greedy.stdout[:-1].replace("\n", " <eos> ").split()) == 12
    sampled = [in_process(capsys, "generate", "--checkpoint", "r", "--max-new-tokens", "20", "--seed", str(s)).stdout for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    (tmp_path / "text.txt").write_text("<doc> k1 v2 <sep> f3 <q> k1 v2\n" * 40)
    score = in_process(capsys, "score", "--checkpoint", "r", "text.txt", "--report-every", "100")
    assert score.returncode == 0, score.stderr
    lines = score.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("tokens 359 ") and "ppl" in lines[-1] and "peak RSS" in lines[-1]
    ev = in_process(capsys, "eval", "--checkpoint", "r", "--int8")
    auto = resolve_precision("auto", torch.device("cpu"))  # bf16 on a CPU with native bf16, else fp32
    assert ev.returncode == 0 and "int8 (dynamic, CPU)" in ev.stdout and f"% vs {auto}" in ev.stdout, ev.stderr
    exp = in_process(capsys, "export", "--checkpoint", "r", "--format", "pt2", "--out", "e/step.pt2")
    assert exp.returncode == 0, exp.stderr
    assert (tmp_path / "e" / "step.pt2").is_file() and (tmp_path / "e" / "step.pt2.state.safetensors").is_file()
    assert (tmp_path / "e" / "step.int8.pt2").is_file() and "same argmax at" in exp.stdout and "Failed to load" not in exp.stderr
    # bad input: one line, exit 2
    (tmp_path / "odd.txt").write_text("<doc> zebra\n")
    one_line_error(in_process(capsys, "score", "--checkpoint", "r", "odd.txt"), "odd.txt line 1", "zebra")
    one_line_error(in_process(capsys, "score", "--checkpoint", "r", "missing.txt"), "missing.txt")
    one_line_error(in_process(capsys, "generate", "--checkpoint", "r", "--prompt", "zebra"), "zebra")
    one_line_error(in_process(capsys, "generate", "--checkpoint", "r", "--top-p", "0"), "--top-p")
    assert in_process(capsys, "generate", "--checkpoint", "r", "--prompt", "  ", "--max-new-tokens", "2").returncode == 0  # blank: starts after <eos>
    (tmp_path / "empty.txt").write_text("")
    one_line_error(in_process(capsys, "score", "--checkpoint", "r", "empty.txt"), "nothing to score")
    one_line_error(in_process(capsys, "export", "--checkpoint", "r", "--format", "pt2", "--out", "e"), "is a folder")
