"""NCGRU: orthogonality by construction, the equations, the calling contract, and that it learns."""

import pytest
import torch
import torch.nn.functional as F

from crt.layers.init import init_weights
from crt.layers.ncgru import NCGRU, modrelu


def skew_matrix(vec: torch.Tensor, H: int) -> torch.Tensor:
    """Full skew-symmetric A from its strict upper triangle (row-major, as torch.triu_indices)."""
    i, j = torch.triu_indices(H, H, offset=1)
    A = torch.zeros(H, H, dtype=vec.dtype)
    A[i, j] = vec
    return A - A.T


def cayley64(vec: torch.Tensor, d: torch.Tensor, H: int) -> torch.Tensor:
    """Independent float64 U = (I + A)^{-1} (I - A) D, with an explicit inverse."""
    A = skew_matrix(vec.detach().double(), H)
    eye = torch.eye(H, dtype=torch.float64)
    return torch.linalg.inv(eye + A) @ (eye - A) @ torch.diag(d.double())


def orth_error(U: torch.Tensor) -> float:
    return (U.T @ U - torch.eye(U.shape[0], dtype=U.dtype)).abs().max().item()


@pytest.mark.parametrize("orthogonal_reset", [False, True])
def test_orthogonal_at_init_and_after_training(orthogonal_reset):
    torch.manual_seed(0)
    H = 32
    m = NCGRU(4, H, orthogonal_reset=orthogonal_reset)
    mats = [m.recurrent_matrix] + ([m.reset_matrix] if orthogonal_reset else [])
    for mat in mats:
        U = mat()
        assert U.dtype == torch.float32
        assert orth_error(U) < 1e-5
    skews = [m.skew_c] + ([m.skew_r] if orthogonal_reset else [])
    skews0 = [p.detach().clone() for p in skews]
    x = torch.randn(16, 10, 4)
    y = x.cumsum(1)[..., :1]  # [B, T, 1] a running sum to regress
    head = torch.nn.Linear(H, 1)
    opt = torch.optim.AdamW([*m.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for _ in range(20):
        out, _ = m(x, torch.zeros(16, H))
        loss = F.mse_loss(head(out), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for p, p0 in zip(skews, skews0):  # A really moved, so the check below means something
        assert (p.detach() - p0).abs().max() > 1e-2
    for mat in mats:
        assert orth_error(mat().detach()) < 1e-5


@pytest.mark.parametrize("H,n_negative", [(8, 0), (8, 3), (8, 8), (7, None), (9, 4)])
def test_d_count_and_determinant(H, n_negative):
    torch.manual_seed(1)
    m = NCGRU(3, H, n_negative=n_negative, orthogonal_reset=True)
    n = H // 2 if n_negative is None else n_negative
    assert m.n_negative == n
    for d, U in [(m.d_c, m.recurrent_matrix()), (m.d_r, m.reset_matrix())]:
        assert int((d == -1).sum()) == n
        assert int((d == 1).sum()) == H - n
        # det((I + A)^{-1}(I - A)) = 1 because det(I - A) = det((I + A)ᵀ), so det(U) = det(D)
        assert torch.linalg.det(U.detach().double()).item() == pytest.approx((-1.0) ** n, abs=1e-5)


@pytest.mark.parametrize("H", [8, 9])
def test_initial_skew_is_block_diagonal(H):
    torch.manual_seed(2)
    m = NCGRU(3, H, n_negative=0)
    A = skew_matrix(m.skew_c.detach(), H)
    blocks = torch.zeros(H, H, dtype=torch.bool)
    for k in range(H // 2):
        blocks[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = True
    assert (A[~blocks] == 0).all()
    s = torch.stack([A[2 * k, 2 * k + 1] for k in range(H // 2)])
    assert torch.equal(s, -torch.stack([A[2 * k + 1, 2 * k] for k in range(H // 2)]))
    assert ((s >= -1) & (s <= 0)).all()  # s = -tan(θ/2), θ ∈ [0, π/2]
    assert s.std() > 0  # drawn, not constant
    if H % 2:
        assert (A[-1] == 0).all() and (A[:, -1] == 0).all()
    # with D = I the Cayley transform of each block is the rotation by θ = -2 atan(s)
    theta = -2 * torch.atan(s)
    R = torch.eye(H)
    for k, t in enumerate(theta):
        R[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = torch.tensor([[t.cos(), t.sin()], [-t.sin(), t.cos()]])
    torch.testing.assert_close(m.recurrent_matrix().detach(), R, atol=1e-6, rtol=0)


def test_forward_shapes_and_last_state():
    torch.manual_seed(3)
    m = NCGRU(5, 12)
    out, h_last = m(torch.randn(3, 7, 5), torch.randn(3, 12))
    assert out.shape == (3, 7, 12)
    assert h_last.shape == (3, 12)
    assert torch.equal(out[:, -1], h_last)


@pytest.mark.parametrize("orthogonal_reset", [False, True])
def test_stepwise_equals_full_sequence(orthogonal_reset):
    torch.manual_seed(4)
    m = NCGRU(5, 16, orthogonal_reset=orthogonal_reset)
    x, h0 = torch.randn(2, 12, 5), torch.randn(2, 16)
    out, h_last = m(x, h0)
    h, steps = h0, []
    for t in range(12):
        o, h = m(x[:, t : t + 1], h)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, 1), out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h, h_last, atol=1e-6, rtol=1e-6)


def test_modrelu_hand_computed():
    z = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5, 0.0, -0.25])
    b = torch.tensor([-1.0, -1.0, -1.0, 0.5, 0.2, 0.5, 0.0])
    # -2: |z|+b = 1 -> -1;  -0.5: -0.5 -> 0;  0: sign 0 -> 0;  0.3: 0.8;  1.5: 1.7;  0 with b>0: 0;  b=0: identity
    expected = torch.tensor([-1.0, 0.0, 0.0, 0.8, 1.7, 0.0, -0.25])
    torch.testing.assert_close(modrelu(z, b), expected)


@pytest.mark.parametrize("orthogonal_reset", [False, True])
def test_matches_slow_reference(orthogonal_reset):
    torch.manual_seed(5)
    I, H, B, T = 4, 6, 3, 9
    m = NCGRU(I, H, n_negative=2, orthogonal_reset=orthogonal_reset)
    with torch.no_grad():  # move every parameter off its init so nothing is checked at a special point
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
        m.bias_mod.uniform_(-0.4, 0.1)  # some units in the dead zone
    x, h0 = torch.randn(B, T, I), torch.randn(B, H)
    out, h_last = m(x, h0)

    P = {k: v.detach().double() for k, v in m.named_parameters()}
    W_r, W_u, W_c = P["weight_x"].split(H)
    b_r, b_u = P["bias_ru"].split(H)
    U_c = cayley64(P["skew_c"], m.d_c, H)
    if orthogonal_reset:
        U_r, U_u = cayley64(P["skew_r"], m.d_r, H), P["weight_u"]
    else:
        U_r, U_u = P["weight_ru"].split(H)
    b = P["bias_mod"]
    ref = torch.zeros(B, T, H, dtype=torch.float64)
    for i in range(B):
        h = h0[i].double()
        for t in range(T):
            xt = x[i, t].double()
            r = torch.sigmoid(W_r @ xt + U_r @ h + b_r)
            u = torch.sigmoid(W_u @ xt + U_u @ h + b_u)
            z = W_c @ xt + U_c @ (r * h)
            c = torch.sign(z) * torch.clamp(z.abs() + b, min=0)
            h = u * h + (1 - u) * c
            ref[i, t] = h
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_last.double(), ref[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("orthogonal_reset", [False, True])
def test_gradients_reach_every_parameter(orthogonal_reset):
    torch.manual_seed(6)
    m = NCGRU(4, 8, orthogonal_reset=orthogonal_reset)
    h0 = torch.randn(3, 8, requires_grad=True)
    out, _ = m(torch.randn(3, 6, 4), h0)
    out.pow(2).sum().backward()
    for name, p in [*m.named_parameters(), ("h0", h0)]:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    # the gradient of the skew parameters is dense, not only on the initial 2x2 blocks
    assert (m.skew_c.grad != 0).float().mean() > 0.9


@pytest.mark.parametrize("orthogonal_reset", [False, True])
def test_one_solve_per_forward(orthogonal_reset, monkeypatch):
    torch.manual_seed(7)
    m = NCGRU(4, 8, orthogonal_reset=orthogonal_reset)
    calls = []
    solve = torch.linalg.solve
    monkeypatch.setattr(torch.linalg, "solve", lambda *a, **k: calls.append(1) or solve(*a, **k))
    m(torch.randn(2, 20, 4), torch.zeros(2, 8))
    assert len(calls) == (2 if orthogonal_reset else 1)  # per call, not per step


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(8)
    H = 32
    m = NCGRU(16, H, orthogonal_reset=True)
    x, h0 = torch.randn(4, 20, 16), 0.5 * torch.randn(4, H)
    out32, h32 = m(x, h0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, h16 = m(x, h0)
        U = m.recurrent_matrix()
    assert U.dtype == torch.float32 and orth_error(U.detach()) < 1e-5  # the Cayley transform escapes autocast
    assert h16.dtype == h0.dtype  # the state is carried in its own dtype
    assert torch.isfinite(out16).all()
    # bf16 keeps 8 mantissa bits: each matmul operand is off by up to 2^-9 relatively, so a
    # pre-activation (a sum of 16-32 terms, |z| ~ 1) is off by ~1e-2 at worst and ~1e-3 typically.
    # Gates pass that on shrunk (σ' <= 1/4, h' is a convex mix) and U_c is orthogonal, so the
    # error does not grow over the 20 steps; states are O(1). Seen: 8e-3 max, 9e-4 mean. A
    # wrong Cayley transform or gate would be off by O(0.1-1).
    err = (out16.float() - out32).abs()
    assert err.max() < 3e-2
    assert err.mean() < 4e-3


def test_bf16_module_keeps_fp32_cayley():
    torch.manual_seed(11)
    m = NCGRU(8, 24, orthogonal_reset=True).to(torch.bfloat16)
    for U in (m.recurrent_matrix(), m.reset_matrix()):
        assert U.dtype == torch.float32 and orth_error(U.detach()) < 1e-5
    out, h = m(torch.randn(2, 5, 8, dtype=torch.bfloat16), torch.zeros(2, 24, dtype=torch.bfloat16))
    assert out.dtype == h.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("n_negative", [-1, 9, 2.5])
def test_bad_n_negative(n_negative):
    with pytest.raises(ValueError, match="n_negative.*between 0 and 8"):
        NCGRU(4, 8, n_negative=n_negative)


def test_model_wide_init_weights_leaves_the_cell_alone():
    # CRT may run model.apply(init_weights) after building its memory cell
    torch.manual_seed(12)
    m = NCGRU(4, 8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.apply(init_weights)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_learns_copy_first_token():
    # the first step shows one of K symbols, then T-1 distractor steps; the class must be read
    # from h_last, so it has to survive the whole sequence in the recurrent state
    torch.manual_seed(9)
    K, N, T, H, B = 4, 8, 16, 32, 64  # classes, alphabet size, length, width, batch

    def batch(n):
        first = torch.randint(K, (n,))
        rest = torch.randint(K, N, (n, T - 1))  # distractors never repeat the class symbols
        return F.one_hot(torch.cat([first[:, None], rest], 1), N).float(), first

    m = NCGRU(N, H)
    head = torch.nn.Linear(H, K)
    opt = torch.optim.Adam([*m.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(300):  # seeds 0-4 converge in 55-81 steps; stop early to keep the test fast
        x, y = batch(B)
        _, h = m(x, torch.zeros(B, H))
        loss = F.cross_entropy(head(h), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    x, y = batch(512)
    with torch.no_grad():
        acc = (head(m(x, torch.zeros(512, H))[1]).argmax(-1) == y).float().mean().item()
    assert acc > 0.9, f"accuracy {acc:.2f}, chance is {1 / K:.2f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(10)
    m = NCGRU(4, 16, orthogonal_reset=True)
    x, h0 = torch.randn(2, 8, 4), torch.randn(2, 16)
    out, _ = m(x, h0)
    out_cuda, _ = m.cuda()(x.cuda(), h0.cuda())
    torch.testing.assert_close(out_cuda.cpu(), out, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_bf16, _ = m(x.cuda(), h0.cuda())
    assert torch.isfinite(out_bf16).all()
