"""Chunked selective scan in pure PyTorch (CPU and GPU), with a hand-written backward.

The recurrence h_t = a_t h_{t-1} + x_t (a_t = exp(delta_t A), x_t = delta_t u_t B_t) is linear. Cut
time into chunks of T steps and let p_t = a_1 a_2 ... a_t = exp(S_t), S_t = sum_{k=1..t} delta_k A,
be the decay since a chunk's first step (p_0 = 1). Inside a chunk, with H the state entering it,

    h_t = p_t * m_t,    m_t = a_0 H + sum_{s <= t} x_s / p_s,

so a chunk costs two cumulative sums along time (S, which as A is constant in time is A times a
cumulative sum of delta, and m): single PyTorch kernels over many rows (batch x channel x state) at
once, in the tensors' own (..., L) layout, with no transposes and no Python loop over time steps.
The states entering the chunks follow from a short recurrence over the chunks (`_chain`).

Dividing by p_t is why there are chunks: T is the longest chunk length (a divisor of L) over which no
p_t can leave [e^-K, e^K] (`chunk_length`), so nothing overflows and no tiny number is divided by
another one. T = 1 divides by nothing (p = 1): a plain sequential scan, which handles decays of any
strength. On the CPU, cumsum accumulates fp32 in float64, so p_t = exp(A * sum dt) carries a couple
of roundings (relative error ~|S_t| 2^-24), where a running product would carry one per step.

The backward pass solves the adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} the same way,
backwards in time: n_t = p_t g_t is a reversed cumulative sum of p_s C_s dy_s within the chunk plus
the adjoint carried in from the next chunk. The forward saves dt (the step size), p and m, so the
backward runs no forward scan. The gradients are the definition in `vlmlab.ops.scan` (mamba-ssm's
`selective_scan_ref`) differentiated by hand; d loss / d(delta A)_t = g_t a_t h_{t-1} = n_t m_{t-1}
is a product, never a difference, so it stays exact when decays are strong.

Layout: channels are viewed as (pairs, c), a pair being one (batch item, B/C group) and c the
channels of the group; the state axis sits before time. So u, delta, dt are (pairs, c, L), B and C
(pairs, n, L), the scan rows (pairs, c, n, L): products broadcast B/C over the channels of their
group, never materializing them per channel. On the CPU the work runs in blocks of rows small
enough to stay in the L2 cache across the dozen passes made over them; rows are independent, so
each block is a complete scan.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# How far (natural log) a chunk's decay p_t may stray from 1: fp32 keeps x / p and p * c normal
# (e^60 ~ 1e26 leaves a margin of ~1e12 below fp32's largest number, e^-60 ~ 1e-26 is above its
# smallest normal one); float64 has a far wider range.
LOG_RANGE = {torch.float32: 60.0, torch.float64: 300.0}
# Values (of the (rows, L) scan tensors) per CPU block: a few such tensors (1 MiB each in fp32)
# mostly stay in a 1-2 MiB L2 cache, and each PyTorch call still has enough work to hide its few
# microseconds of overhead (measured: 2^16...2^19 within 10% of each other on VMamba shapes).
BLOCK = 1 << 18

Plan = tuple[int, bool]  # a call's chunk length, and whether a raw step exceeds softplus's threshold


def chunk_length(L: int, max_step: float, log_range: float) -> int:
    """Longest chunk T dividing L whose decay p_t = a_1...a_t (T - 1 steps) stays within e^+-log_range.

    Args:
        max_step: the largest |delta * A| of one step (a bound over all rows).
    """
    if not math.isfinite(max_step):  # inf/nan inputs: divide by nothing (nan propagates as usual)
        return 1
    limit = L if max_step * (L - 1) <= log_range else int(log_range / max_step) + 1
    return next(T for T in range(min(L, limit), 0, -1) if L % T == 0)


def _ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for positive integers."""
    return -(-a // b)


def _acc_dtype(u: Tensor) -> torch.dtype:
    # fp32 accumulation (as mamba-ssm); float64 inputs stay float64 (high-precision references)
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _chain(E: Tensor, F: Tensor, doubling: bool | None = None) -> Tensor:
    """States entering each chunk: H_0 = 0, H_{k+1} = E_k H_k + F_k, for E, F of shape (rows, nc).

    Sequential over chunks, or by recursive doubling (log2(nc) vectorized steps; products of decays
    may underflow to zero harmlessly); doubling=None picks the cheaper one.
    """
    rows, nc = F.shape
    E, F = E.t().contiguous(), F.t().contiguous()  # (nc, rows): each chunk's values contiguous
    H = torch.empty_like(F)
    H[0] = 0
    if doubling is None:  # rough CPU costs (us): ~3 a step, 15 a doubling, and per value 0.5 / 1.2 ns
        doubling = nc * (3 + 5e-4 * rows) > math.log2(nc) * (15 + 1.2e-3 * nc * rows)
    if not doubling:
        Es, Fs, Hs = E.unbind(), F.unbind(), H.unbind()  # views made at once: less per-step overhead
        for k in range(nc - 1):
            torch.addcmul(Fs[k], Es[k], Hs[k], out=Hs[k + 1])
        return H.t()
    # inclusive scan F_i <- E_i F_{i-1} + F_i by doubling: after the step of offset j, F_i sums the
    # last 2j chunks up to i and E_i is their decay (new values into a second buffer, then swapped)
    F2, E2 = torch.empty_like(F), torch.empty_like(E)
    j = 1
    while j < nc:
        torch.addcmul(F[j:], E[j:], F[:-j], out=F2[j:])
        F2[:j] = F[:j]
        F, F2 = F2, F
        if 2 * j < nc:
            torch.mul(E[j:], E[:-j], out=E2[j:])
            E2[:j] = E[:j]
            E, E2 = E2, E
        j *= 2
    H[1:] = F[:-1]
    return H.t()


class _Call:
    """One call's inputs in the block layout and accumulation dtype, its sizes and its chunk length.

    u, delta (pairs, c, L); A (pairs, c, n); B, C (pairs, n, L); D, delta_bias (pairs, c, 1).
    """

    def __init__(self, u, delta, A, B, C, D, delta_bias, softplus: bool, plan: Plan | None = None):
        self.acc = acc = _acc_dtype(u)
        self.b, self.d, self.L = b, d, L = u.shape
        self.n = n = A.shape[1]
        self.g = g = 1 if B.dim() == 3 else B.shape[1]
        self.c = c = d // g
        self.pairs = pairs = b * g
        self.softplus = softplus
        self.on_cpu = u.device.type == "cpu"
        # contiguous: elementwise results keep their inputs' strides, and the (rows, nc, T) views need
        # time innermost (MambaVision passes delta as a transposed view)
        self.u = u.to(acc).contiguous().view(pairs, c, L)
        self.delta = delta.to(acc).contiguous().view(pairs, c, L)
        self.B = B.to(acc).contiguous().view(pairs, n, L)
        self.C = C.to(acc).contiguous().view(pairs, n, L)

        def per_pair(x: Tensor) -> Tensor:  # (d, k) -> (pairs, c, k): one small copy
            return x.to(acc).reshape(1, g, c, -1).expand(b, g, c, -1).reshape(pairs, c, -1)

        self.A = per_pair(A)
        self.D = None if D is None else per_pair(D)
        self.delta_bias = None if delta_bias is None else per_pair(delta_bias)
        # plan: the chunk length, from the largest step, and whether some raw step passes softplus's
        # threshold 20 (else softplus is log1p(exp(x)) in place, what F.softplus computes below it)
        if plan is None:
            if softplus:
                top = self._raw(self.delta.amax(-1, keepdim=True))
                over = bool(top.max() > 20)
                top = F.softplus(top)
            else:
                lo, hi = torch.aminmax(self.delta, dim=-1, keepdim=True)
                top, over = torch.maximum(self._raw(hi), -self._raw(lo)), False
            T = chunk_length(L, (top[..., 0] * self.A.abs().amax(-1)).max().item(), LOG_RANGE[acc])
            plan = (T, over)
        self.plan = plan
        self.T, self.over_threshold = plan
        self.nc = L // self.T

    def _raw(self, x: Tensor) -> Tensor:
        return x if self.delta_bias is None else x + self.delta_bias

    def blocks(self) -> list[tuple[slice, slice]]:
        """(pairs, channels) index ranges of the blocks: whole pairs where one fits BLOCK, else channels.

        A GPU has no cache to fit and pays per kernel launch: one block.
        """
        pairs, c, n, L = self.pairs, self.c, self.n, self.L
        if not self.on_cpu:
            return [(slice(0, pairs), slice(0, c))]
        if c * n * L <= BLOCK:  # as many whole pairs per block as fit, spread evenly
            k = _ceil_div(pairs, _ceil_div(pairs, BLOCK // (c * n * L)))
            return [(slice(i, min(i + k, pairs)), slice(0, c)) for i in range(0, pairs, k)]
        k = _ceil_div(c, _ceil_div(c * n * L, BLOCK))  # one pair's channels in even parts
        return [(slice(i, i + 1), slice(j, min(j + k, c))) for i in range(pairs) for j in range(0, c, k)]

    def chunked(self, x: Tensor) -> Tensor:
        """(..., L) -> (rows, nc, T)."""
        return x.view(-1, self.nc, self.T)


# ----------------------------------------------------------------------------------------------
# forward


def _forward_block(k: _Call, P: slice, R: slice, y, dt=None, p=None, m=None, a0=None, a0H=None) -> None:
    """Scans block (pairs P, channels R) into y (P, c, L).

    The other arguments are buffers that receive what the backward needs (all or none): dt (P, c, L),
    p and m (P, c, n, L), and where there are several chunks a0 and a0 H (P, c, n, nc).
    """
    delta, A, u = k.delta[P, R], k.A[P, R], k.u[P, R]
    pairs, c, L = delta.shape
    if k.delta_bias is not None:
        dt = torch.add(delta, k.delta_bias[P, R], out=dt)
    elif dt is not None or k.softplus:
        dt = delta.clone() if dt is None else dt.copy_(delta)
    else:
        dt = delta
    if k.softplus and k.over_threshold:
        dt.copy_(F.softplus(dt))
    elif k.softplus:
        dt.exp_().log1p_()

    # p = exp(S), S = A sum dt since each chunk's first step (whose own decay is a0): A is constant in
    # time, so one cumulative sum of dt serves all n states
    first = k.chunked(dt)[..., :1]  # (P c, nc, 1)
    cum = k.chunked(dt).cumsum(-1).sub_(first).view(dt.shape)
    p = torch.mul(cum[:, :, None], A[..., None], out=p).exp_()  # (P, c, n, L)
    if k.nc > 1:
        a0 = torch.mul(first.view(pairs, c, 1, k.nc), A[..., None], out=a0).exp_().view(-1, k.nc)
    # m = sum x / p, x = dt u B (B broadcast over the group); then + a0 H, H the state entering a chunk
    if k.n == 1:
        x = torch.mul(dt, u, out=None if m is None else m.view(pairs, c, L)).mul_(k.B[P])
    else:
        x = torch.mul((dt * u)[:, :, None], k.B[P][:, None], out=m)
    mc = k.chunked(x.view(p.shape).div_(p)).cumsum_(-1)
    if k.nc > 1:
        p_end = k.chunked(p)[..., -1]
        H = _chain(a0 * p_end, p_end * mc[..., -1])  # chunk c ends at p_end (a0 H + m_end)
        a0H = torch.mul(a0, H, out=None if a0H is None else a0H.view(a0.shape))
        mc += a0H[..., None]
    # y = sum_n C h + D u, h = p m
    m, C = mc.view(p.shape), k.C[P]
    if k.n == 1:
        h = torch.mul(p, m, out=y.view(p.shape)).view(y.shape).mul_(C)
    else:
        h = torch.sum((p * m).mul_(C[:, None]), 2, out=y)
    if k.D is not None:
        h.addcmul_(u, k.D[P, R])


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save: bool):
    """y in u's dtype and, when save, what the backward needs."""
    k = _Call(u, delta, A, B, C, D, delta_bias, delta_softplus)
    y = torch.empty(k.pairs, k.c, k.L, dtype=k.acc, device=u.device)
    bufs = []  # dt, p, m (and a0, a0 H where there are several chunks): what the backward needs
    if save:
        rows = (k.pairs, k.c, k.n)
        bufs = [torch.empty_like(y)] + [
            torch.empty(*rows, size, dtype=k.acc, device=u.device) for size in (k.L, k.L, k.nc, k.nc)
        ]
        bufs = bufs if k.nc > 1 else bufs[:3]
    for P, R in k.blocks():
        _forward_block(k, P, R, y[P, R], *(buf[P, R] for buf in bufs))
    y = pre_gate = y.view(u.shape)
    if z is not None:
        y = y * F.silu(z.to(k.acc).contiguous())
    saved = None
    if save:
        dt, p, m, a0, a0H = bufs if k.nc > 1 else (*bufs, None, None)
        saved = (dt, p, m, a0, a0H, k.plan, pre_gate if z is not None else None)
    return y.to(u.dtype), saved


# ----------------------------------------------------------------------------------------------
# backward


def _backward_block(k: _Call, P: slice, R: slice, dy, dt, p, m, a0, a0H, du, ddelta, needs):
    """Gradients of block (pairs P, channels R): du, ddelta written into (P, c, L) buffers; returns the
    block's parts of dA (P, c, n), dB, dC (P, n, L), dD, ddelta_bias (P, c, 1) (None where not needed)."""
    u, A, B = k.u[P, R], k.A[P, R], k.B[P]
    n = k.n
    # adjoint: n_t = p_t g_t = sum_{s >= t in chunk} p_s C_s dy_s + p_end (a0 g) carried in from the next
    # chunk, which follows from the chunks' own recurrence run backwards. The reversed cumulative sum is
    # a flip, a cumsum, a flip: never total minus prefix, which cancels where the terms decay.
    nt = k.chunked(torch.mul(dy[:, :, None], k.C[P][:, None]).mul_(p)).flip(-1).cumsum_(-1).flip(-1)
    pc, mc = k.chunked(p), k.chunked(m)
    if k.nc > 1:
        a0, a0H = a0.reshape(-1, k.nc), a0H.reshape(-1, k.nc)
        p_end = pc[..., -1]
        carried = _chain((a0 * p_end).flip(-1), (a0 * nt[..., 0]).flip(-1)).flip(-1)
        nt += (p_end * carried)[..., None]
    gx = torch.div(nt, pc).view(p.shape)  # g_t = dloss/dx_t = dloss/dh_t (total)
    # q_t = dloss/d(delta A)_t = g_t a_t h_{t-1} = n_t m_{t-1}; at a chunk start m_{-1} = a0 H
    q = nt
    q[..., 1:] *= mc[..., :-1]
    if k.nc > 1:
        q[..., 0] *= a0H
    else:
        q[..., 0] = 0
    q = q.view(p.shape)
    dA = (q * dt[:, :, None]).sum(-1) if needs[2] else None
    qA = q.mul_(A[..., None])
    qA = qA.squeeze(2) if n == 1 else qA.sum(2)  # sum_n q A: dloss/d dt through the decay

    dB = (gx * (dt * u)[:, :, None]).sum(1) if needs[3] else None  # summed over the group
    gB = gx.mul_(B[:, None])
    gB = gB.squeeze(2) if n == 1 else gB.sum(2)  # sum_n g B = dloss/d(dt u)
    du = torch.mul(dt, gB, out=du)
    if k.D is not None:
        du.addcmul_(dy, k.D[P, R])
    ddt = torch.addcmul(qA, u, gB, out=ddelta)
    if k.softplus:  # d softplus(raw) = sigmoid(raw); 1 above the threshold, as F.softplus has it
        bias = k.delta_bias
        raw = k.delta[P, R].clone() if bias is None else k.delta[P, R] + bias[P, R]
        over = raw > 20 if k.over_threshold else None
        sig = raw.sigmoid_()
        ddt.mul_(sig if over is None else sig.masked_fill_(over, 1))
    dbias = ddt.sum(-1, keepdim=True) if k.delta_bias is not None and needs[7] else None
    dC = (p * m).mul_(dy[:, :, None]).sum(1) if needs[4] else None
    dD = (dy * u).sum(-1, keepdim=True) if k.D is not None and needs[5] else None
    return dA, dB, dC, dD, dbias


def _backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, saved, needs):
    """Gradients w.r.t. (u, delta, A, B, C, D, z, delta_bias), each in its input's dtype (None if absent
    or not needed)."""
    dt, p, m, a0, a0H, plan, pre_gate = saved
    k = _Call(u, delta, A, B, C, D, delta_bias, delta_softplus, plan)
    acc, pairs, c, n, L = k.acc, k.pairs, k.c, k.n, k.L
    dy = dout.to(acc).contiguous()
    dz = None
    if z is not None:
        z32 = z.to(acc).contiguous()
        sig = torch.sigmoid(z32)
        if needs[6]:
            dz = dy * pre_gate * sig * (1 + z32 * (1 - sig))  # d silu(z) / dz
        dy = dy * (z32 * sig)  # gradient reaching y before the gate
    dy = dy.view(pairs, c, L)

    du, ddelta = torch.empty_like(k.u), torch.empty_like(k.u)
    zeros = {"device": u.device, "dtype": acc}
    totals = [
        torch.zeros(pairs, c, n, **zeros),  # dA
        torch.zeros(pairs, n, L, **zeros),  # dB
        torch.zeros(pairs, n, L, **zeros),  # dC
        torch.zeros(pairs, c, 1, **zeros),  # dD
        torch.zeros(pairs, c, 1, **zeros),  # ddelta_bias
    ]
    for P, R in k.blocks():
        chunks = (None, None) if k.nc == 1 else (a0[P, R], a0H[P, R])
        parts = _backward_block(
            k, P, R, dy[P, R], dt[P, R], p[P, R], m[P, R], *chunks, du[P, R], ddelta[P, R], needs
        )
        for i, (total, part) in enumerate(zip(totals, parts, strict=True)):
            if part is not None:  # dB, dC: sums over the channel ranges of each pair
                (total[P] if i in (1, 2) else total[P, R]).add_(part)
    dA, dB, dC, dD, dbias = totals

    def cast(grad, like, wanted=True):
        return None if like is None or not wanted else grad.to(like.dtype)

    b, d = k.b, k.d
    return (
        cast(du.view(b, d, L), u),
        cast(ddelta.view(b, d, L), delta),
        cast(dA.view(b, d, n).sum(0), A, needs[2]),
        cast(dB.view(B.shape), B, needs[3]),
        cast(dC.view(C.shape), C, needs[4]),
        cast(dD.view(b, d).sum(0), D, needs[5]),
        None if dz is None else dz.to(z.dtype),
        cast(dbias.view(b, d).sum(0), delta_bias, needs[7]),
    )


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        save = any(ctx.needs_input_grad)
        y, saved = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save)
        if save:
            dt, p, m, a0, a0H, plan, pre_gate = saved
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, dt, p, m, a0, a0H, pre_gate)
            ctx.plan, ctx.delta_softplus = plan, delta_softplus
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, *saved = ctx.saved_tensors
        dt, p, m, a0, a0H, pre_gate = saved
        saved = (dt, p, m, a0, a0H, ctx.plan, pre_gate)
        grads = _backward(
            dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, saved, ctx.needs_input_grad
        )
        return (*grads, None)


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Chunked selective scan (pure PyTorch); same arguments and result as the reference."""
    return _ChunkedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
