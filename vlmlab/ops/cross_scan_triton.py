"""Triton kernels for VMamba's SS2D in inference, on channel-last (B, H, W, D) maps.

The reference SS2D (vlmlab/encoders/vmamba.py) copies its input into four scan orders
(`cross_scan`: row-major, column-major and both reversed), projects each to step sizes, runs the
selective scan and maps the four outputs back (`cross_merge`): about a dozen full passes over
4x the activation. Here:

* `dwconv_act`: depthwise KxK conv (+ bias) and SiLU in one pass over a (B, H, W, D) map.
* `cross_scan_fused`: the four directions' selective scans read u straight from the (B, H, W, D)
  map in their own order (no copies), compute the step size delta = dt_proj(x_proj rows) inside the
  kernel (rank R, so R multiply-adds per element instead of a 4x-sized delta tensor in memory),
  and write each direction's output at its spatial position: ys (B*H*W, 4, D).
* `merge_layernorm`: the sum of the four directions and SS2D's out_norm (a LayerNorm over D).
* `layer_norm`: LayerNorm over channels, optionally of x + residual (a block's norm2 after the
  SS2D residual), writing the dtype the next matrix product computes in.

How a direction is walked: its sequence is a series of lines (rows for k = 0, 2; columns for
k = 1, 3; k >= 2 reversed), each padded to LINE_PAD steps (H or W rounded up to a power of 2),
and a tile holds BLOCK_L consecutive steps of that padded sequence (part of a line, or several).
Padded steps get delta = 0 and u = 0, which makes them identity elements of the recurrence (decay
1, input 0), so the scan over padded tiles equals the scan over the real steps. The state at the
end of a tile is carried into the next, as in scan_triton.py. Only d_state = 1 (all VMamba v2
configs).

No autograd: these kernels serve inference; training uses the reference path. Importing this
module imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

K_DIRECTIONS = 4
ACTIVATIONS = {None: 0, "silu": 1}

# Launch parameters (read at each call, so benchmarks can override them).
# Scan tiles (BLOCK_L steps, BLOCK_D channels, warps) by padded line length (H or W rounded up to
# a power of 2); others take SCAN_TILE_DEFAULT. One warp per program keeps the scan along the
# steps inside a warp (several warps along the steps pass through shared memory). (32, 16, 1) won
# at all four VMamba-S stages (B=128, fp32, H200): 1.72 / 1.47 / 0.77 / 0.62 ms per call at
# 56 / 28 / 14 / 7 px, against 2.83 / 1.56 / 1.09 / 1.58 ms for (128, 32, 4).
SCAN_TILES: dict[int, tuple[int, int, int]] = {}
SCAN_TILE_DEFAULT = (32, 16, 1)
DWCONV_BLOCKS = (16, 32, 2)  # (positions along W, channels, warps) per program
LN_TILE = (2048, 4)  # (elements, warps) per program of merge_layernorm


@triton.jit
def _dwconv_act_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, H, W, D,
    KS: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # b * H + h
    h = row % H
    image = (row - h).to(tl.int64) * W * D  # start of image b
    wi = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    pad = (KS - 1) // 2
    acc = tl.zeros((BLOCK_W, BLOCK_D), tl.float32)
    for i in tl.static_range(KS):
        hh = h + i - pad
        h_ok = (hh >= 0) & (hh < H)
        for j in tl.static_range(KS):
            ww = wi + j - pad
            m = ((ww >= 0) & (ww < W) & h_ok)[:, None] & d_mask[None, :]
            v = tl.load(x_ptr + image + (hh * W + ww)[:, None] * D + d[None, :], mask=m, other=0.0)
            wt = tl.load(w_ptr + d * (KS * KS) + i * KS + j, mask=d_mask, other=0.0)  # (D, 1, KS, KS)
            acc += v.to(tl.float32) * wt.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = acc * tl.sigmoid(acc)
    out = (wi < W)[:, None] & d_mask[None, :]
    tl.store(y_ptr + image + (h * W + wi)[:, None] * D + d[None, :], acc.to(y_ptr.dtype.element_ty), mask=out)


def dwconv_act(x: Tensor, weight: Tensor, bias: Tensor | None = None, act: str | None = "silu") -> Tensor:
    """Depthwise conv (stride 1, 'same' zero padding) then `act`, on a channel-last map.

    Args:
        x: (B, H, W, D), contiguous.
        weight: (D, 1, KS, KS) as nn.Conv2d(D, D, KS, groups=D) stores it; KS odd.
        bias: (D,) or None.
        act: "silu" or None.
    """
    b, h, w, d = x.shape
    ks = weight.shape[-1]
    if weight.shape != (d, 1, ks, ks) or ks % 2 == 0:
        raise ValueError(f"weight must be (D={d}, 1, k, k) with k odd, got {tuple(weight.shape)}")
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    block_w, block_d, num_warps = DWCONV_BLOCKS
    block_w, block_d = min(block_w, triton.next_power_of_2(w)), min(block_d, triton.next_power_of_2(d))
    grid = (b * h, triton.cdiv(w, block_w), triton.cdiv(d, block_d))
    _dwconv_act_kernel[grid](
        x, weight, bias if bias is not None else weight, y, h, w, d,
        KS=ks, HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act], BLOCK_W=block_w, BLOCK_D=block_d,
        num_warps=num_warps,
    )  # fmt: skip
    return y


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 * (a1 * h + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _log1p_exp(x):
    # log(1 + e^x) to full precision also where e^x << 1 (Kahan's log1p: log(v) * e / (v - 1))
    e = tl.exp(x)
    v = 1.0 + e
    return tl.where(v == 1.0, e, tl.log(v) * (e / (v - 1.0)))


@triton.jit
def _cross_scan_kernel(
    u_ptr, xdbl_ptr, dtw_ptr, bias_ptr, Alog_ptr, D_ptr, y_ptr,
    H, W, D, NDB,
    R: tl.constexpr, LINE_PAD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    K: tl.constexpr = 4
    CX: tl.constexpr = R + 2  # per direction and position: R dt inputs, then B and C (d_state 1)
    pid = tl.program_id(0)
    db = pid % NDB  # neighbouring channel blocks run side by side: they share u's and ys's sectors in L2
    k = (pid // NDB) % K
    b = pid // (K * NDB)
    col = k % 2  # 1: column-major
    rev = k // 2  # 1: reversed
    n_lines = H + col * (W - H)
    length = W + col * (H - W)
    s_line = W - col * (W - 1)  # position step between lines
    s_elem = 1 + col * (W - 1)  # position step along a line

    d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    kd = k * D + d
    A = -tl.exp(tl.load(Alog_ptr + kd, mask=d_mask, other=0.0).to(tl.float32))  # S4D-real: A = -exp(A_log)
    Dv = tl.load(D_ptr + kd, mask=d_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + kd, mask=d_mask, other=0.0).to(tl.float32)
    l_idx = tl.arange(0, BLOCK_L)
    image = b.to(tl.int64) * H * W

    carry = tl.zeros((BLOCK_D,), tl.float32)  # state entering the tile
    for it in range(0, tl.cdiv(n_lines * LINE_PAD, BLOCK_L)):
        step = it * BLOCK_L + l_idx  # in the padded sequence of this direction
        lt = step // LINE_PAD  # line, in scan order
        j = step % LINE_PAD  # step within the line, in scan order
        valid = (lt < n_lines) & (j < length)
        line = lt + rev * (n_lines - 1 - 2 * lt)
        elem = j + rev * (length - 1 - 2 * j)
        pos = image + line * s_line + elem * s_elem  # row-major position b*H*W + h*W + w
        mask = valid[:, None] & d_mask[None, :]
        u = tl.load(u_ptr + pos[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
        row = xdbl_ptr + pos * (K * CX) + k * CX
        # delta = dt_proj(dt inputs): R outer-product updates (R is small: ceil(dim / 16))
        dt = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
        for r in range(R):
            xr = tl.load(row + r, mask=valid, other=0.0).to(tl.float32)
            wr = tl.load(dtw_ptr + (k * R + r) * D + d, mask=d_mask, other=0.0)
            dt += xr[:, None] * wr[None, :]
        dt = dt + bias[None, :]
        dt = tl.where(dt <= 20.0, _log1p_exp(dt), dt)  # softplus with torch's threshold 20
        dt = tl.where(mask, dt, 0.0)  # padding: decay 1, input 0
        Bv = tl.load(row + R, mask=valid, other=0.0).to(tl.float32)
        Cv = tl.load(row + R + 1, mask=valid, other=0.0).to(tl.float32)
        decay, h = tl.associative_scan((tl.exp(dt * A[None, :]), dt * u * Bv[:, None]), 0, _combine)
        h = h + decay * carry[None, :]
        carry = tl.sum(tl.where(l_idx[:, None] == BLOCK_L - 1, h, 0.0), axis=0)
        y = h * Cv[:, None] + Dv[None, :] * u
        tl.store(y_ptr + (pos[:, None] * K + k) * D + d[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def cross_scan_fused(
    u: Tensor, x_dbl: Tensor, dt_weight: Tensor, dt_bias: Tensor, A_logs: Tensor, Ds: Tensor, out_dtype=None
) -> Tensor:
    """SS2D's four selective scans on a channel-last map, each output at its spatial position.

    For direction k (0: rows, 1: columns, 2 and 3: the same reversed), with rows of x_dbl split per
    direction into [dt (R), B, C]:  delta = softplus(dt @ dt_weight[k].T + dt_bias[k]), then the
    selective scan of mamba-ssm (d_state 1) with A = -exp(A_logs[k]), D = Ds[k] along that
    direction's order. Parameters in the layouts SS2D stores them, any float dtype (math in fp32).

    Args:
        u: (B, H, W, D), the scan input.
        x_dbl: (B*H*W, 4 * (R + 2)): x_proj of u per position, direction-major.
        dt_weight: (4, D, R) dt projections; dt_bias (4, D); A_logs (4*D, 1); Ds (4*D,).
        out_dtype: dtype of the result (default u's).

    Returns:
        ys (B*H*W, 4, D): direction k's output at each row-major position.
    """
    b, h, w, d = u.shape
    r = dt_weight.shape[-1]
    if x_dbl.shape != (b * h * w, K_DIRECTIONS * (r + 2)):
        raise ValueError(f"x_dbl must be ({b * h * w}, {K_DIRECTIONS * (r + 2)}), got {tuple(x_dbl.shape)}")
    if A_logs.numel() != K_DIRECTIONS * d:
        raise ValueError(
            f"only d_state 1: A_logs must have {K_DIRECTIONS * d} entries, got {tuple(A_logs.shape)}"
        )
    dtw = dt_weight.transpose(1, 2).contiguous()  # (4, R, D): one rank's channels contiguous
    args = [t.contiguous() for t in (dt_bias, A_logs, Ds)]
    ys = u.new_empty((b * h * w, K_DIRECTIONS, d), dtype=out_dtype or u.dtype)
    line_pad = triton.next_power_of_2(max(h, w))
    block_l, block_d, num_warps = SCAN_TILES.get(line_pad, SCAN_TILE_DEFAULT)
    block_d = min(block_d, triton.next_power_of_2(d))
    ndb = triton.cdiv(d, block_d)
    _cross_scan_kernel[(b * K_DIRECTIONS * ndb,)](
        u.contiguous(), x_dbl.contiguous(), dtw, *args, ys, h, w, d, ndb,
        R=r, LINE_PAD=line_pad, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return ys


@triton.jit
def _layer_norm_kernel(
    x_ptr, res_ptr, sum_ptr, w_ptr, b_ptr, out_ptr, M, D, eps,
    K: tl.constexpr, HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    mask = (rows < M)[:, None] & d_mask[None, :]
    rows = rows.to(tl.int64)
    ptr = x_ptr + rows[:, None] * (K * D) + d[None, :]
    s = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    if K == 4:  # (y0 + y2) + (y1 + y3): the order of the reference cross_merge
        s += tl.load(ptr + 2 * D, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(ptr + D, mask=mask, other=0.0).to(tl.float32)
        s2 += tl.load(ptr + 3 * D, mask=mask, other=0.0).to(tl.float32)
        s += s2
    row_d = rows[:, None] * D + d[None, :]
    if HAS_RES:
        s += tl.load(res_ptr + row_d, mask=mask, other=0.0).to(tl.float32)
        tl.store(sum_ptr + row_d, s.to(sum_ptr.dtype.element_ty), mask=mask)
    mean = tl.sum(s, axis=1) / D
    xc = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    wt = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    bs = tl.load(b_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    out = xc * rstd[:, None] * wt[None, :] + bs[None, :]
    tl.store(out_ptr + row_d, out.to(out_ptr.dtype.element_ty), mask=mask)


def _layer_norm(x, res, weight, bias, eps, out_dtype, k):
    m, d = x.shape[0], x.shape[-1]
    out = x.new_empty((m, d), dtype=out_dtype or x.dtype)
    total = (
        res.new_empty(res.shape, dtype=torch.promote_types(x.dtype, res.dtype)) if res is not None else None
    )
    block_d = triton.next_power_of_2(d)
    elems, num_warps = LN_TILE
    rows = max(1, elems // block_d)
    _layer_norm_kernel[(triton.cdiv(m, rows),)](
        x.contiguous(), res if res is not None else out, total if total is not None else out,
        weight, bias, out, m, d, eps,
        K=k, HAS_RES=res is not None, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return out, total


def merge_layernorm(ys: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype=None) -> Tensor:
    """LayerNorm over D of the sum of the four directions: (M, 4, D) -> (M, D).

    Args:
        out_dtype: dtype of the result (default ys's).
    """
    if ys.dim() != 3 or ys.shape[1] != K_DIRECTIONS:
        raise ValueError(f"ys must be (M, {K_DIRECTIONS}, D), got {tuple(ys.shape)}")
    return _layer_norm(ys, None, weight, bias, eps, out_dtype, K_DIRECTIONS)[0]


def layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, residual: Tensor | None = None, out_dtype=None
) -> tuple[Tensor, Tensor | None]:
    """LayerNorm over the last dim of (..., D) rows, optionally of x + residual.

    Returns:
        (LN(x [+ residual]) as (M, D) in out_dtype (default x's), and x + residual with
        residual's shape and the promoted dtype, or None without residual).
    """
    d = x.shape[-1]
    res = None
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
        res = residual.contiguous()
    return _layer_norm(x.reshape(-1, d), res, weight, bias, eps, out_dtype, 1)
