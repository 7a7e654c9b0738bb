"""Diagonal Batching (Sivtsov et al. 2025): ARMT inference in S + L - 1 grouped steps.

ARMT's cell (segment n, layer l) needs only cell (n, l-1) (its input) and cell (n-1, l) (its
layer's memory). So every cell on an anti-diagonal n + l = i can run at the same time:

    step i:   active layers  l = lo..hi,  lo = max(0, i - S + 1),  hi = min(i, L - 1)
              input of layer l = output of layer l-1 at step i-1    (layer 0: segment i's embedding)
              memory of layer l = what layer l wrote at step i-1    (segment n - 1)

S segments through L layers take S + L - 1 steps instead of S * L. The layers' weights are
stacked along a new leading dimension once (`torch.func.stack_module_state`), and one step runs
`ARMTLayer.forward` under `torch.func.vmap` over the active layers: every linear map becomes
one batched matmul over those layers, not a Python loop. It is the very code the sequential
model runs, so the logits and the final memory equal it up to the order of float sums (and
the attention kernel: the step uses the math attention, which vmap can batch).

Only whole segments go through the diagonal; a shorter last segment runs after it through the
ordinary forward, which is exact because it is last. Inference only: the stacked weights are a
copy (rebuild the executor after changing the model), and dropout is not supported.
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from crt.errors import CRTError
from crt.models.armt import ARMT, ARMTState


class DiagonalARMT:
    """Run an ARMT over a long input with diagonal batching.

    model: a trained ARMT in eval mode; its layers' weights are stacked at construction.
    __call__(tokens [B, N], state) -> (logits [B, N, V], state after the last segment), the same
    as running `model` segment by segment over tokens with segments of `segment_len`
    (default: the model's segment_len).
    """

    def __init__(self, model: ARMT):
        if not isinstance(model, ARMT):
            raise CRTError(f"diagonal batching runs ARMT models, not {type(model).__name__}")
        self.model = model
        self.params, self.buffers = stack_module_state(list(model.layers))  # each [L, ...]
        self.cell = copy.deepcopy(model.layers[0]).to("meta")  # the structure functional_call fills

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, state: ARMTState, segment_len: int = 0) -> tuple[torch.Tensor, ARMTState]:
        model = self.model
        if model.training:
            raise CRTError("diagonal batching is an inference schedule: call model.eval() first")
        T = segment_len or model.cfg.segment_len
        B, N = tokens.shape
        S, L = N // T, model.cfg.n_layer  # whole segments, layers
        if S == 0:
            return model(tokens, state)
        A = list(state.A.unbind(dim=1))  # L x [B, H, d_phi, d_v]  memory of each layer
        z = list(state.z.unbind(dim=1))  # L x [B, H, d_phi]
        logits = []
        prev_out, prev_lo = None, 0  # outputs of the last step's active layers [G, B, T+k, D]
        for i in range(S + L - 1):
            lo, hi = max(0, i - S + 1), min(i, L - 1)
            inputs = []
            if lo == 0:
                h0, attn_kwargs = model.embed(tokens[:, i * T : (i + 1) * T])  # [B, T+k, D]
                inputs.append(h0.unsqueeze(0))
            if hi >= 1:
                inputs.append(prev_out[max(lo, 1) - 1 - prev_lo : hi - prev_lo])  # layers max(lo,1)-1 .. hi-1 of step i-1
            h = torch.cat(inputs, dim=0)  # [G, B, T+k, D], G = hi - lo + 1
            out, A_new, z_new = self._cells(lo, hi, h, torch.stack(A[lo : hi + 1]), torch.stack(z[lo : hi + 1]), attn_kwargs)
            A[lo : hi + 1], z[lo : hi + 1] = A_new.unbind(0), z_new.unbind(0)
            if hi == L - 1:
                logits.append(model.head(out[-1]))  # segment i - L + 1 is done: [B, T, V]
            prev_out, prev_lo = out, lo
        state = ARMTState(torch.stack(A, dim=1), torch.stack(z, dim=1))
        if S * T < N:  # the shorter last segment, after every whole one
            tail, state = model(tokens[:, S * T :], state)
            logits.append(tail)
        return torch.cat(logits, dim=1), state  # [B, N, V]

    def _cells(self, lo: int, hi: int, h: torch.Tensor, A: torch.Tensor, z: torch.Tensor, attn_kwargs: dict):
        """ARMTLayer.forward of layers lo..hi at once, each on its own input and memory."""
        params = {name: p[lo : hi + 1] for name, p in self.params.items()}
        buffers = {name: b[lo : hi + 1] for name, b in self.buffers.items()}

        def one(p, b, h, A, z):
            return functional_call(self.cell, (p, b), (h, A, z), attn_kwargs)

        # The math attention decomposes into matmuls and softmax, which vmap batches over the
        # layers; the fused CPU/CUDA kernels have no batching rule and would loop over them.
        with sdpa_kernel(SDPBackend.MATH):
            return vmap(one)(params, buffers, h, A, z)
