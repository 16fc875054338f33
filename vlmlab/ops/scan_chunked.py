"""Chunked selective scan in pure PyTorch (CPU and GPU), with a hand-written backward.

The recurrence h_t = a_t * h_{t-1} + x_t (a_t = exp(delta_t * A), x_t = delta_t * u_t * B_t) is
linear, so it splits into chunks of T steps. Tensors are laid out (chunks, T, b, d, n):

1. every chunk is scanned from a zero state, all chunks at once: T vectorized steps, each
   touching one time step of every chunk;
2. the chunk-end states are chained by a short sequential pass over the chunks, using each
   chunk's total decay (the product of its a_t, i.e. exp of the sum of delta*A over the chunk,
   formed as a product: nothing but delta*A itself is ever exponentiated, so strong decays
   underflow to zero and nothing overflows);
3. every position gets the previous chunk's end state times its decay since its chunk's start
   (T more vectorized steps).

With T ~ sqrt(L) this is 2T + L/T Python steps instead of L, and O(b*d*n*L) memory. Time moves
to the front of the layout by 2-D transposes, which the CPU does several times faster than
general permutations. The backward pass is the same scan run backwards in time (the adjoint
recurrence g_t = C_t dy_t + a_{t+1} g_{t+1}); it recomputes the states instead of storing them,
so the autograd graph holds only the inputs. The gradients are the definition in
`vlmlab.ops.scan` (mamba-ssm's `selective_scan_ref`) differentiated by hand.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def chunk_length(L: int) -> int:
    """Chunk length T ~ sqrt(L), a power of two in [1, 128]: minimizes the T + L/T steps."""
    if L <= 1:
        return 1
    return min(128, 2 ** round(math.log2(math.sqrt(L))))


def _to_chunks(x: Tensor, T: int, nc: int, flip: bool = False) -> Tensor:
    """(..., L) -> contiguous (nc, T, ...), zero-padded at the end of time (flipped: at the start).

    Time moves to the front with one 2-D transpose ((M, L) -> (L, M)): on the CPU that is several
    times faster than a general permutation of the same tensor.
    """
    lead = x.shape[:-1]
    pad = nc * T - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    if flip:
        x = x.flip(-1)
    return x.reshape(-1, nc * T).t().contiguous().view(nc, T, *lead)


def _from_chunks(x: Tensor, L: int) -> Tensor:
    """(nc, T, ...) -> (..., L): inverse of `_to_chunks` (without flip)."""
    lead = x.shape[2:]
    return x.reshape(x.shape[0] * x.shape[1], -1).t().contiguous()[:, :L].view(*lead, L)


def _scan_(a: Tensor, x: Tensor) -> Tensor:
    """h_t = a_t h_{t-1} + x_t with h_{-1} = 0, in place on x; both (nc, T, ...) in time order."""
    nc, T = a.shape[:2]
    for t in range(1, T):  # 1. each chunk from a zero state, all chunks at once
        x[:, t].addcmul_(a[:, t], x[:, t - 1])
    if nc == 1:
        return x
    total = a[1:].prod(dim=1)  # decay across each of the chunks 1..nc-1
    last = x[:, T - 1]  # (nc, ...): chunk-end states
    for c in range(1, nc):  # 2. chain the chunk ends: they become the true states
        last[c].addcmul_(total[c - 1], last[c - 1])
    carry = last[:-1].clone()  # 3. the previous chunk's end state, decayed step by step
    for t in range(T - 1):
        x[1:, t].add_(carry.mul_(a[1:, t]))
    return x


def _group(x: Tensor, g: int) -> Tensor:
    """(..., d, n) -> (..., g, d/g, n): channels of one B/C group side by side."""
    return x.unflatten(-2, (g, x.shape[-2] // g))


def _sum_n(x: Tensor) -> Tensor:
    """Sum over the trailing state axis (a squeeze for n = 1: no reduction kernel)."""
    return x.squeeze(-1) if x.shape[-1] == 1 else x.sum(-1)


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        y, _ = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, keep=False)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        grads = _backward(dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus)
        return (*grads, None)


def _acc_dtype(u: Tensor) -> torch.dtype:
    # fp32 accumulation (as mamba-ssm); float64 inputs stay float64 (high-precision references)
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _delta(
    delta: Tensor, delta_bias: Tensor | None, softplus: bool, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(raw delta + bias, effective step size), both in the accumulation dtype."""
    raw = delta.to(acc)
    if delta_bias is not None:
        raw = raw + delta_bias.to(acc)[:, None]
    return raw, (F.softplus(raw) if softplus else raw)


def _bc(M: Tensor, acc: torch.dtype) -> Tensor:
    """B or C as (b, g, n, L) in the accumulation dtype (shared B/C: g = 1)."""
    M = M.to(acc)
    return M.unsqueeze(1) if M.dim() == 3 else M


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, keep: bool):
    """y (u's dtype); with keep, also the pieces the backward reuses."""
    acc = _acc_dtype(u)
    b, d, L = u.shape
    n = A.shape[1]
    Bg, Cg = _bc(B, acc), _bc(C, acc)
    g = Bg.shape[1]
    T = chunk_length(L)
    nc = -(-L // T)
    _, dt = _delta(delta, delta_bias, delta_softplus, acc)
    u32 = u.to(acc)
    dt_c = _to_chunks(dt, T, nc)  # (nc, T, b, d)
    dtu_c = _to_chunks(dt * u32, T, nc)
    a = (dt_c.unsqueeze(-1) * A.to(acc)).exp_()  # (nc, T, b, d, n)
    Bc = _to_chunks(Bg, T, nc).unsqueeze(-2)  # (nc, T, b, g, 1, n)
    Cc = _to_chunks(Cg, T, nc).unsqueeze(-2)
    x = _group(dtu_c.unsqueeze(-1), g) * Bc  # (nc, T, b, g, d/g, n)
    h = _scan_(a, x.view(nc, T, b, d, n))
    y = _from_chunks(_sum_n(_group(h, g) * Cc).view(nc, T, b, d), L)  # sum over n of C h
    if D is not None:
        y = y.addcmul_(D.to(acc)[:, None], u32)
    pre_gate = y
    if z is not None:
        y = y * F.silu(z.to(acc))
    extras = (h, a, dt_c, dtu_c, Bc, Cc, T, nc, pre_gate) if keep else None
    return y.to(u.dtype), extras


def _backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Gradients w.r.t. (u, delta, A, B, C, D, z, delta_bias), each in its input's dtype (None if absent)."""
    acc = _acc_dtype(u)
    b, d, L = u.shape
    n = A.shape[1]
    _, extras = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, keep=True)
    h, a, dt_c, dtu_c, Bc, Cc, T, nc, pre_gate = extras
    g = Bc.shape[3]
    u32 = u.to(acc)
    A32 = A.to(acc)
    dout = dout.to(acc)
    raw, dt = _delta(delta, delta_bias, delta_softplus, acc)

    dz = None
    if z is not None:
        z32 = z.to(acc)
        sig = torch.sigmoid(z32)
        dz = dout * pre_gate * sig * (1 + z32 * (1 - sig))  # d silu(z) / dz
        dy = dout * z32 * sig  # gradient reaching y before the gate
    else:
        dy = dout
    dD = (dy * u32).sum((0, 2)) if D is not None else None

    # adjoint scan, backwards in time: g_t = C_t dy_t + a_{t+1} g_{t+1}. Run it forwards on the
    # time-reversed sequence; the decay at reversed step s is a at original time t+1.
    dt_next = F.pad(F.pad(dt, (0, nc * T - L)).flip(-1), (1, -1))  # reversed, shifted by one step
    a_rev = (_to_chunks(dt_next, T, nc).unsqueeze(-1) * A32).exp_()
    dy_rev = _to_chunks(dy, T, nc, flip=True)  # (nc, T, b, d)
    C_rev = _to_chunks(_bc(C, acc), T, nc, flip=True).unsqueeze(-2)  # (nc, T, b, g, 1, n)
    gx = _scan_(a_rev, (_group(dy_rev.unsqueeze(-1), g) * C_rev).view(nc, T, b, d, n))
    gx = gx.flip(0, 1)  # back to time order: dLoss/dx_t = dLoss/dh_t (total)
    dy_c = dy_rev.flip(0, 1)
    del a_rev, dy_rev, C_rev

    # dC[g, n] = sum over the group's channels of dy * h;  dB likewise with g * delta * u
    dC = _from_chunks((_group(dy_c.unsqueeze(-1), g) * _group(h, g)).sum(-2), L)  # (b, g, n, L)
    dB = _from_chunks((_group(dtu_c.unsqueeze(-1), g) * _group(gx, g)).sum(-2), L)
    ddtu = _from_chunks(_sum_n(_group(gx, g) * Bc).view(nc, T, b, d), L)  # dLoss/d(delta u)

    # dLoss/d(delta*A)_t = g_t * a_t * h_{t-1}; h_{t-1} is h shifted by one step across chunks
    h_prev = torch.empty_like(h)
    h_prev[:, 1:] = h[:, :-1]
    h_prev[1:, 0] = h[:-1, T - 1]
    h_prev[0, 0] = 0
    q = h_prev.mul_(a).mul_(gx)  # (nc, T, b, d, n)
    del h, a, gx
    dA = (q * dt_c.unsqueeze(-1)).sum((0, 1, 2))
    ddt = _from_chunks(_sum_n(q * A32), L).addcmul_(ddtu, u32)
    du = ddtu * dt
    if D is not None:
        du = du.addcmul_(D.to(acc)[:, None], dy)
    if delta_softplus:
        ddt = ddt.mul_(torch.sigmoid(raw))
    ddelta_bias = ddt.sum((0, 2)) if delta_bias is not None else None
    if B.dim() == 3:
        dB, dC = dB.squeeze(1), dC.squeeze(1)

    def cast(grad, like):
        return None if grad is None else grad.to(like.dtype)

    return (
        cast(du, u),
        cast(ddt, delta),
        cast(dA, A),
        cast(dB, B),
        cast(dC, C),
        cast(dD, D),
        cast(dz, z),
        cast(ddelta_bias, delta_bias),
    )


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Chunked selective scan (pure PyTorch); same arguments and result as the reference."""
    return _ChunkedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
