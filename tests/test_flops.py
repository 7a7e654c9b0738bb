"""The analytic FLOP count equals torch's FlopCounterMode on the same models (SPEC §6)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from crt.analysis.flops import count_flops
from crt.config import ModelConfig
from crt.models import build_model

CONFIGS = [
    dict(arch="crt"),
    dict(arch="crt", memory_cell="ncgru", d_memory=48),
    dict(arch="crt", memory_cell="mingru", position_cell="mingru", d_memory=48),
    dict(arch="crt", positions="learned", memory_reads="last_token"),
    dict(arch="crt", memory_position="none", positions="rotary"),
    dict(arch="crt", memory_position="append", memory_reads="memory_token"),
    dict(arch="transformer"),
    dict(arch="transformer_xl"),
    dict(arch="transformer_xl", mem_len=20, clamp_len=5),
    dict(arch="rmt", mem_tokens=3),
    dict(arch="rmt", mem_tokens=2, rmt_placement="write"),
    dict(arch="armt", mem_tokens=3),
    dict(arch="armt", mem_tokens=2, assoc_heads=2, assoc_nu=1, assoc_dim=16),
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("evaluation", [False, True])
def test_analytic_flops_match_flop_counter(kw, evaluation):
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layer=2, n_head=4, d_ff=64, segment_len=12, eval_segment_len=7, eval_mem_len=9, **kw)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    T = 7 if evaluation else 12
    x = torch.randint(0, 300, (1, T))
    # The fused CPU attention kernel is invisible to FlopCounterMode; the math kernel is made of
    # counted matmuls. (The counter also fails under no_grad; forward alone adds no backward FLOPs.)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, model.init_state(1, evaluation=evaluation))
    measured = counter.get_total_flops()
    analytic = count_flops(cfg, evaluation=evaluation).forward_per_segment
    assert analytic == pytest.approx(measured, rel=0.03)


def test_crt_overhead_is_its_rnns_and_one_memory_token():
    """CRT minus the Transformer at the same segment length: the two RNNs, the memory projection
    and one more attended token; Transformer-XL's extra is attention over its memory."""
    base = dict(vocab_size=10_000, d_model=256, n_layer=3, n_head=4, d_ff=1024, segment_len=35)
    crt = count_flops(ModelConfig(arch="crt", **base))
    tr = count_flops(ModelConfig(arch="transformer", positions="learned", **base))
    D, F, L, S = 256, 1024, 35, 36
    one_token = 3 * 2 * (4 * D * D + 2 * D * F) + 3 * 2 * 2 * D * (S * S - L * L)
    rnns = crt.parts["memory RNN"] + crt.parts["positional RNN"] + crt.parts["memory projection"]
    assert crt.forward_per_segment - tr.forward_per_segment == pytest.approx(rnns + one_token)
    xl = count_flops(ModelConfig(arch="transformer_xl", mem_len=35, **base))
    assert xl.forward_per_segment > crt.forward_per_segment > tr.forward_per_segment


def test_cli_flops_table(capsys):
    from crt.cli.main import main

    assert main(["flops", "--preset", "ptb-crt-35", "--preset", "ptb-xl-70", "--d-model", "64"]) == 0
    out = capsys.readouterr().out
    assert "ptb-crt-35" in out and "ptb-xl-70" in out and "Not counted" in out
    expected = count_flops(ModelConfig(arch="crt", vocab_size=10_000, d_model=64, n_layer=3, n_head=4, d_ff=512, segment_len=35))
    assert f"{expected.forward_per_token / 1e6:.2f}" in out
