"""Selective scan as Triton kernels (forward and backward) for CUDA tensors.

One program owns BLOCK_D channels of one (batch, B/C group) pair and walks the sequence in tiles
of BLOCK_L steps. Inside a tile the recurrence h_t = a_t h_{t-1} + x_t is an associative scan
over (a, x) pairs (`tl.associative_scan`, all in registers); the state at the tile's end is
carried into the next tile. Inputs are read once and the output written once: the design of
mamba-ssm's CUDA kernel (state-spaces/mamba, csrc/selective_scan), which the study's fast VMamba
numbers rely on. The forward pass stores the state at the start of every tile (b*d*n*L / BLOCK_L
floats) when gradients are needed; the backward pass walks the tiles in reverse, recomputes a
tile's states from that checkpoint and runs the adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1}
as a reverse associative scan. dB and dC sum over the channels of a group: each program writes
its partial sum and torch adds them (deterministic, no atomics). `python -m vlmlab.bench scan`
measures the kernels against a device-to-device copy. Importing this module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

# Tiles: BLOCK_D channels x BLOCK_L time steps per program and loop iteration. A sequence of at
# most MAX_SINGLE_TILE steps is one tile (no state carried between tiles); longer ones go in
# tiles of LONG_BLOCK_L. The backward pass holds more live tiles, so it takes fewer channels.
# Chosen on an H100 with `python -m vlmlab.bench scan --sweep` at VMamba-S shapes (n = 1).
MAX_SINGLE_TILE = 256
LONG_BLOCK_L = 64
LONG_BLOCK_D = (16, 16)  # (forward, backward)
SINGLE_TILE_ELEMS = (1024, 512)  # (forward, backward)
NUM_WARPS = 4


def default_blocks(L: int, channels_per_group: int) -> tuple[int, int, int, int]:
    """(forward BLOCK_D, backward BLOCK_D, BLOCK_L, num_warps) for sequences of length L."""
    single = max(16, triton.next_power_of_2(L))
    if single <= MAX_SINGLE_TILE:
        block_l, (fwd_d, bwd_d) = single, (max(1, e // single) for e in SINGLE_TILE_ELEMS)
    else:
        block_l, (fwd_d, bwd_d) = LONG_BLOCK_L, LONG_BLOCK_D
    cap = triton.next_power_of_2(channels_per_group)  # no more rows than a group has
    return min(fwd_d, cap), min(bwd_d, cap), block_l, NUM_WARPS


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 * (a1 * h + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _step_size(dt, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    if HAS_BIAS:
        dt = dt + bias[:, None]
    if SOFTPLUS:  # torch / mamba-ssm: softplus with threshold 20
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    return dt


@triton.jit
def _column(m, idx, j):
    """Column j of a 2-D tile m, where idx enumerates its columns."""
    return tl.sum(tl.where(idx[None, :] == j, m, 0.0), axis=1)


@triton.jit
def _fwd_state(
    n, y, carry, dt, dtu, rows, row_mask, cols, col_mask, n_idx, l_idx, ci,
    A_ptr, B_ptr, C_ptr, state_ptr, bc, st, L, NCHUNK,
    N: tl.constexpr, BLOCK_L: tl.constexpr, SAVE_STATE: tl.constexpr, SINGLE: tl.constexpr,
):  # fmt: skip
    """State dimension n over one tile: adds C_n h_n to y and carries h_n into the next tile."""
    An = tl.load(A_ptr + rows * N + n, mask=row_mask, other=0.0)
    Bn = tl.load(B_ptr + bc + n * L + cols, mask=col_mask, other=0.0).to(tl.float32)
    Cn = tl.load(C_ptr + bc + n * L + cols, mask=col_mask, other=0.0).to(tl.float32)
    decay, h = tl.associative_scan((tl.exp(dt * An[:, None]), dtu * Bn[None, :]), 1, _combine)
    if not SINGLE:  # one tile holds the whole sequence: no state comes in or goes out
        h0 = _column(carry, n_idx, n)
        if SAVE_STATE:
            tl.store(state_ptr + st + n * NCHUNK + ci, h0, mask=row_mask)
        h = h + decay * h0[:, None]
        carry = tl.where(n_idx[None, :] == n, _column(h, l_idx, BLOCK_L - 1)[:, None], carry)
    y += h * Cn[None, :]
    return y, carry


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, state_ptr,
    L, DG, G, NDB, NCHUNK,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATE: tl.constexpr, SINGLE: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0) % NDB  # 1-D grid, channel block fastest: B/C tiles are reused from L2
    pid_bg = tl.program_id(0) // NDB  # b * G + group
    b = pid_bg // G
    grp = pid_bg % G
    d = G * DG
    r = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = r < DG
    rows = grp * DG + r  # channel indices
    seq = (b.to(tl.int64) * d + rows) * L  # start of each channel's sequence
    bc = pid_bg.to(tl.int64) * N * L  # start of this (batch, group)'s B and C
    st = (b.to(tl.int64) * d + rows) * N * NCHUNK
    n_idx = tl.arange(0, N_PAD)
    l_idx = tl.arange(0, BLOCK_L)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + rows, mask=row_mask, other=0.0)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=row_mask, other=0.0)

    carry = tl.zeros((BLOCK_D, N_PAD), tl.float32)  # state entering the tile, per n
    for ci in range(0, NCHUNK):
        cols = ci * BLOCK_L + l_idx
        col_mask = cols < L
        mask = row_mask[:, None] & col_mask[None, :]
        offs = seq[:, None] + cols[None, :]
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dt = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dt = tl.where(mask, _step_size(dt, bias, HAS_BIAS, SOFTPLUS), 0.0)  # padding: a = 1, x = 0
        dtu = dt * u
        y = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
        if N <= 4:  # small states (VMamba: n = 1) unrolled
            for n in tl.static_range(N):
                y, carry = _fwd_state(
                    n, y, carry, dt, dtu, rows, row_mask, cols, col_mask, n_idx, l_idx, ci,
                    A_ptr, B_ptr, C_ptr, state_ptr, bc, st, L, NCHUNK, N, BLOCK_L, SAVE_STATE, SINGLE,
                )  # fmt: skip
        else:  # a loop keeps code size and compile time down for n = 16
            for n in range(N):
                y, carry = _fwd_state(
                    n, y, carry, dt, dtu, rows, row_mask, cols, col_mask, n_idx, l_idx, ci,
                    A_ptr, B_ptr, C_ptr, state_ptr, bc, st, L, NCHUNK, N, BLOCK_L, SAVE_STATE, SINGLE,
                )  # fmt: skip
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_state(
    n, y, ddtu, ddt, g_carry, dA_acc, dt, dt1, dtu, dy, rows, row_mask, cols, col_mask, mask1,
    n_idx, l_idx, ci, A_ptr, B_ptr, C_ptr, state_ptr, dB_ptr, dC_ptr, bc, st, part, L, NCHUNK,
    N: tl.constexpr, HAS_Z: tl.constexpr, SINGLE: tl.constexpr,
):  # fmt: skip
    """State dimension n over one tile, backwards: recompute h_n, run the adjoint, accumulate grads."""
    An = tl.load(A_ptr + rows * N + n, mask=row_mask, other=0.0)
    Bn = tl.load(B_ptr + bc + n * L + cols, mask=col_mask, other=0.0).to(tl.float32)
    Cn = tl.load(C_ptr + bc + n * L + cols, mask=col_mask, other=0.0).to(tl.float32)
    x = dtu * Bn[None, :]
    decay, h = tl.associative_scan((tl.exp(dt * An[:, None]), x), 1, _combine)
    if not SINGLE:
        h0 = tl.load(state_ptr + st + n * NCHUNK + ci, mask=row_mask, other=0.0)
        h = h + decay * h0[:, None]
    if HAS_Z:
        y += h * Cn[None, :]
    a1 = tl.where(mask1, tl.exp(dt1 * An[:, None]), 0.0)
    # reverse scan: g_t = c_t + a_{t+1} g_{t+1}, plus the carry from the next tile
    decay1, g = tl.associative_scan((a1, dy * Cn[None, :]), 1, _combine, reverse=True)
    if not SINGLE:
        g = g + decay1 * _column(g_carry, n_idx, n)[:, None]
        g_carry = tl.where(n_idx[None, :] == n, _column(g, l_idx, 0)[:, None], g_carry)
    tl.store(dC_ptr + part + n * L + cols, tl.sum(dy * h, axis=0), mask=col_mask)
    tl.store(dB_ptr + part + n * L + cols, tl.sum(g * dtu, axis=0), mask=col_mask)
    ddtu += g * Bn[None, :]
    # g_t * a_t * h_{t-1} (the gradient w.r.t. delta_t * A) as g_t * (h_t - x_t), as mamba-ssm does
    # (csrc/selective_scan/selective_scan_bwd_kernel.cuh): no shifted h needed; the subtraction
    # costs absolute accuracy ~eps * |x_t| where a_t h_{t-1} << x_t
    q = g * (h - x)
    ddt += q * An[:, None]
    dA_acc += tl.where(n_idx[None, :] == n, tl.sum(q * dt, axis=1)[:, None], 0.0)
    return y, ddtu, ddt, g_carry, dA_acc


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, state_ptr, dout_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    L, DG, G, NDB, NCHUNK,
    N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SINGLE: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0) % NDB
    pid_bg = tl.program_id(0) // NDB
    b = pid_bg // G
    grp = pid_bg % G
    d = G * DG
    r = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = r < DG
    rows = grp * DG + r
    seq = (b.to(tl.int64) * d + rows) * L
    bc = pid_bg.to(tl.int64) * N * L
    part = (pid_bg.to(tl.int64) * NDB + pid_d) * N * L  # this program's slot in the dB/dC partials
    st = (b.to(tl.int64) * d + rows) * N * NCHUNK
    n_idx = tl.arange(0, N_PAD)
    l_idx = tl.arange(0, BLOCK_L)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + rows, mask=row_mask, other=0.0)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=row_mask, other=0.0)

    g_carry = tl.zeros((BLOCK_D, N_PAD), tl.float32)  # adjoint state entering the tile from the right
    dA_acc = tl.zeros((BLOCK_D, N_PAD), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    for cj in range(0, NCHUNK):
        ci = NCHUNK - 1 - cj
        cols = ci * BLOCK_L + l_idx
        col_mask = cols < L
        mask = row_mask[:, None] & col_mask[None, :]
        offs = seq[:, None] + cols[None, :]
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dt_raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_raw = dt_raw + bias[:, None]
        dt = tl.where(mask, _step_size(dt_raw, bias, False, SOFTPLUS), 0.0)
        # step sizes one step later: the adjoint's decay at t is a_{t+1} (0 past the end)
        mask1 = row_mask[:, None] & (cols + 1 < L)[None, :]
        dt1 = tl.load(delta_ptr + offs + 1, mask=mask1, other=0.0).to(tl.float32)
        dt1 = _step_size(dt1, bias, HAS_BIAS, SOFTPLUS)
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            dy = dout * z * sz
        else:
            dy = dout
        dtu = dt * u
        y = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
        ddtu = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)  # dLoss / d(delta * u)
        ddt = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)  # dLoss / d(delta), through delta * A
        if N <= 4:
            for n in tl.static_range(N):
                y, ddtu, ddt, g_carry, dA_acc = _bwd_state(
                    n, y, ddtu, ddt, g_carry, dA_acc, dt, dt1, dtu, dy, rows, row_mask, cols, col_mask,
                    mask1, n_idx, l_idx, ci, A_ptr, B_ptr, C_ptr, state_ptr, dB_ptr, dC_ptr, bc, st, part,
                    L, NCHUNK, N, HAS_Z, SINGLE,
                )  # fmt: skip
        else:
            for n in range(N):
                y, ddtu, ddt, g_carry, dA_acc = _bwd_state(
                    n, y, ddtu, ddt, g_carry, dA_acc, dt, dt1, dtu, dy, rows, row_mask, cols, col_mask,
                    mask1, n_idx, l_idx, ci, A_ptr, B_ptr, C_ptr, state_ptr, dB_ptr, dC_ptr, bc, st, part,
                    L, NCHUNK, N, HAS_Z, SINGLE,
                )  # fmt: skip
        ddt += ddtu * u
        du = ddtu * dt
        if HAS_D:
            du += Dv[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        if HAS_Z:
            if HAS_D:
                y += Dv[:, None] * u
            dz = dout * y * sz * (1.0 + z * (1.0 - sz))
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if SOFTPLUS:
            ddt = ddt * tl.where(dt_raw <= 20.0, tl.sigmoid(dt_raw), 1.0)
        ddt = tl.where(mask, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)

    per_row = b.to(tl.int64) * d + rows  # (b, d) partials, summed over b by torch
    dA_mask = row_mask[:, None] & (n_idx < N)[None, :]
    tl.store(dA_ptr + per_row[:, None] * N + n_idx[None, :], dA_acc, mask=dA_mask)
    if HAS_D:
        tl.store(dD_ptr + per_row, dD_acc, mask=row_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + per_row, dbias_acc, mask=row_mask)


def _launch_shape(u: Tensor, groups: int, block_d: int, block_l: int) -> tuple[int, int]:
    """(channel blocks per group, tiles per sequence)."""
    d, L = u.shape[1:]
    return triton.cdiv(d // groups, block_d), triton.cdiv(L, block_l)


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, blocks):
        fwd_d, _, block_l, num_warps = blocks
        u, delta = u.contiguous(), delta.contiguous()
        Bg = (B.unsqueeze(1) if B.dim() == 3 else B).contiguous()  # shared B/C: one group
        Cg = (C.unsqueeze(1) if C.dim() == 3 else C).contiguous()
        A32 = A.float().contiguous()
        D32 = D.float().contiguous() if D is not None else None
        bias32 = delta_bias.float().contiguous() if delta_bias is not None else None
        z = z.contiguous() if z is not None else None
        b, d, L = u.shape
        n, g = A.shape[1], Bg.shape[1]
        ndb, nchunk = _launch_shape(u, g, fwd_d, block_l)
        save = any(ctx.needs_input_grad)
        y = torch.empty_like(u)
        state = u.new_empty((b, d, n, nchunk), dtype=torch.float32) if save and nchunk > 1 else y
        _fwd_kernel[(ndb * b * g,)](
            u, delta, A32, Bg, Cg, _or(D32, u), _or(z, u), _or(bias32, u), y, state,
            L, d // g, g, ndb, nchunk,
            N=n, N_PAD=triton.next_power_of_2(n), BLOCK_D=fwd_d, BLOCK_L=block_l,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), SAVE_STATE=save, SINGLE=nchunk == 1, num_warps=num_warps,
        )  # fmt: skip
        if save:
            ctx.save_for_backward(u, delta, A32, Bg, Cg, D32, z, bias32, state)
            ctx.delta_softplus, ctx.blocks, ctx.shared_bc = delta_softplus, blocks, B.dim() == 3
            ctx.dtypes = [None if t is None else t.dtype for t in (A, B, C, D, delta_bias)]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        u, delta, A32, Bg, Cg, D32, z, bias32, state = ctx.saved_tensors
        _, bwd_d, block_l, num_warps = ctx.blocks
        b, d, L = u.shape
        n, g = A32.shape[1], Bg.shape[1]
        ndb, nchunk = _launch_shape(u, g, bwd_d, block_l)
        f32 = torch.float32
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dB = u.new_empty((b, g, ndb, n, L), dtype=f32)  # partial sums per channel block
        dC = torch.empty_like(dB)
        dA = u.new_empty((b, d, n), dtype=f32)  # partial sums per batch element
        dD = u.new_empty((b, d), dtype=f32) if D32 is not None else None
        dbias = u.new_empty((b, d), dtype=f32) if bias32 is not None else None
        _bwd_kernel[(ndb * b * g,)](
            u, delta, A32, Bg, Cg, _or(D32, u), _or(z, u), _or(bias32, u), state, dout.contiguous(),
            du, ddelta, _or(dz, du), dB, dC, dA, _or(dD, dA), _or(dbias, dA),
            L, d // g, g, ndb, nchunk,
            N=n, N_PAD=triton.next_power_of_2(n), BLOCK_D=bwd_d, BLOCK_L=block_l,
            HAS_D=D32 is not None, HAS_Z=z is not None, HAS_BIAS=bias32 is not None,
            SOFTPLUS=bool(ctx.delta_softplus), SINGLE=nchunk == 1, num_warps=num_warps,
        )  # fmt: skip
        dB, dC = dB.sum(2), dC.sum(2)
        if ctx.shared_bc:
            dB, dC = dB.squeeze(1), dC.squeeze(1)
        A_t, B_t, C_t, D_t, bias_t = ctx.dtypes
        dD = dD.sum(0).to(D_t) if dD is not None else None
        dbias = dbias.sum(0).to(bias_t) if dbias is not None else None
        return du, ddelta, dA.sum(0).to(A_t), dB.to(B_t), dC.to(C_t), dD, dz, dbias, None, None


def _or(t: Tensor | None, placeholder: Tensor) -> Tensor:
    """A pointer for the kernel: absent tensors are never read (their HAS_ flag is off)."""
    return placeholder if t is None else t


def selective_scan_triton(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *, blocks=None
):  # fmt: skip
    """Selective scan with Triton kernels (CUDA); same arguments and result as the reference.

    Args:
        blocks: (forward BLOCK_D, backward BLOCK_D, BLOCK_L, num_warps) to override the tuned
            tile sizes (benchmarks).
    """
    groups = B.shape[1] if B.dim() == 4 else 1
    blocks = blocks or default_blocks(u.shape[-1], u.shape[1] // groups)
    return _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, blocks)
