"""The CPU sequence GRU computes exactly what torch's nn.GRU computes, forward and backward."""

import pytest
import torch

from crt.layers import GRU
from crt.layers.gru import _SequenceGRU


def reference(gru: GRU, x: torch.Tensor, h: torch.Tensor):
    out, h_last = gru.gru(x, h.unsqueeze(0))  # torch's own implementation
    return out, h_last.squeeze(0)


@pytest.mark.parametrize("B,T,I,H", [(3, 7, 5, 4), (2, 1, 8, 16), (4, 12, 16, 8)])
def test_sequence_gru_matches_torch_gru(B, T, I, H):
    torch.manual_seed(0)
    gru = GRU(I, H)
    with torch.no_grad():  # non-zero biases, so a bias mix-up cannot hide
        for p in gru.parameters():
            p.uniform_(-0.5, 0.5)
    x = torch.randn(B, T, I, requires_grad=True)
    h = torch.randn(B, H, requires_grad=True)
    w_out, w_last = torch.randn(B, T, H), torch.randn(B, H)  # use both outputs in the loss

    results = []
    for fn in (gru, lambda x, h: reference(gru, x, h)):
        gru.zero_grad()
        x.grad = h.grad = None
        out, last = fn(x, h)
        ((out * w_out).sum() + (last * w_last).sum()).backward()
        results.append((out.detach(), last.detach(), x.grad.clone(), h.grad.clone(), [p.grad.clone() for p in gru.parameters()]))
    ours, torchs = results
    torch.testing.assert_close(ours[0], torchs[0])
    torch.testing.assert_close(ours[1], torchs[1])
    torch.testing.assert_close(ours[2], torchs[2])
    torch.testing.assert_close(ours[3], torchs[3])
    for a, b in zip(ours[4], torchs[4], strict=True):
        torch.testing.assert_close(a, b)


def test_sequence_gru_gradcheck():
    torch.manual_seed(0)
    T, B, H = 4, 2, 3
    args = (torch.randn(T, B, 3 * H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64),
            torch.randn(3 * H, H, dtype=torch.float64) * 0.5, torch.randn(3 * H, dtype=torch.float64) * 0.5)
    args = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(_SequenceGRU.apply, args)


def test_no_grad_and_autocast_paths_match_torch():
    torch.manual_seed(0)
    gru = GRU(6, 5)
    x, h = torch.randn(2, 9, 6), torch.randn(2, 5)
    with torch.no_grad():
        out, last = gru(x, h)
    ref_out, ref_last = reference(gru, x, h)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(last, ref_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the recurrence runs in fp32 on CPU whatever autocast says
        out_ac, _ = gru(x.bfloat16(), h)
    ref_ac, _ = reference(gru, x.bfloat16().float(), h)
    assert out_ac.dtype == torch.float32
    torch.testing.assert_close(out_ac, ref_ac)
