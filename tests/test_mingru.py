"""minGRU (crt.layers.MinGRU): its segment call is the recurrence of Feng et al., step by step."""

import pytest
import torch

from crt.layers import MinGRU


def reference(cell: MinGRU, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The equations one step at a time: z = σ(W_z x + b_z), h̃ = W_h x + b_h, h' = (1 − z) h + z h̃."""
    H = cell.hidden_size
    W, b = cell.gates.weight, cell.gates.bias
    outs = []
    for t in range(x.shape[1]):
        z = torch.sigmoid(x[:, t] @ W[:H].T + b[:H])
        candidate = x[:, t] @ W[H:].T + b[H:]
        h = (1 - z) * h + z * candidate
        outs.append(h)
    return torch.stack(outs, dim=1), h


def make(seed: int = 0, I: int = 6, H: int = 5, B: int = 3, T: int = 11, dtype=torch.float32):
    torch.manual_seed(seed)
    cell = MinGRU(I, H).to(dtype)
    x = torch.randn(B, T, I, dtype=dtype, requires_grad=True)
    h0 = torch.randn(B, H, dtype=dtype, requires_grad=True)  # any sign: the scan does not need h > 0
    return cell, x, h0


def test_scan_equals_the_sequential_recurrence_with_gradients():
    cell, x, h0 = make()
    out, h_last = cell(x, h0)
    ref_out, ref_last = reference(cell, x, h0)
    assert out.shape == (3, 11, 5) and h_last.shape == (3, 5)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(h_last, ref_last, rtol=0, atol=1e-6)
    g = torch.randn_like(out)
    ours = torch.autograd.grad((out * g).sum() + h_last.sum(), [x, h0, *cell.parameters()])
    theirs = torch.autograd.grad((ref_out * g).sum() + ref_last.sum(), [x, h0, *cell.parameters()])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_gradcheck_in_float64():
    cell, x, h0 = make(I=3, H=2, B=2, T=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, h: cell(x, h), (x, h0))


@pytest.mark.parametrize("split", [1, 4])
def test_a_segment_in_pieces_equals_it_in_one_call(split):
    """Token by token (split 1, the streaming step) or in chunks, carrying h_last."""
    cell, x, h0 = make()
    with torch.no_grad():
        whole, last = cell(x, h0)
        h, pieces = h0, []
        for start in range(0, x.shape[1], split):
            out, h = cell(x[:, start : start + split], h)
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(h, last, rtol=0, atol=1e-6)


def test_keep_bias_sets_the_forget_rate():
    """With zero weights and keep bias b the state decays by σ(b) per step towards the candidate bias."""
    cell, _, _ = make(H=4)
    with torch.no_grad():
        cell.gates.weight.zero_()
        cell.gates.bias.zero_()
        cell.set_keep_bias(torch.tensor([0.0, 1.0, 2.0, 3.0]))
        h0 = torch.ones(1, 4)
        _, h = cell(torch.zeros(1, 1, 6), h0)
    torch.testing.assert_close(h, torch.sigmoid(torch.tensor([[0.0, 1.0, 2.0, 3.0]])))


def test_bf16_autocast_scans_in_fp32():
    cell, x, h0 = make()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, h_last = cell(x, h0)
    assert out.dtype == torch.float32 and h_last.dtype == torch.float32
    torch.testing.assert_close(out, reference(cell, x, h0)[0].detach(), rtol=0, atol=0.05)
