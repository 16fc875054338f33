"""Selective scan (the S6 recurrence of Mamba) behind one function.

Semantics follow mamba-ssm's `selective_scan_fn` (state-spaces/mamba,
`mamba_ssm/ops/selective_scan_interface.py`, `selective_scan_ref`):

    delta' = softplus(delta + delta_bias)            (if delta_softplus, else delta + delta_bias)
    h_t    = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t
    y_t    = <C_t, h_t> + D * u_t ;   y = y * silu(z) if z is given

Shapes: u, delta, z (b, d, l); A (d, n); B, C (b, n, l) shared by all channels, or (b, g, n, l)
grouped (group k serves channels k*d/g ... (k+1)*d/g - 1); D, delta_bias (d,). Computation in fp32;
the output has u's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Casts to fp32, applies bias/softplus and expands grouped B/C to (b, d, n, l)."""
    b, d, l = u.shape
    u32 = u.float()
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A32 = A.float()

    def expand(M, name):
        M = M.float()
        if M.dim() == 3:  # (b, n, l): shared by all channels
            return M[:, None]  # (b, 1, n, l)
        if M.dim() == 4:  # (b, g, n, l)
            g = M.shape[1]
            if d % g:
                raise ValueError(f"{name}: {g} groups do not divide {d} channels")
            return M.repeat_interleave(d // g, dim=1)  # (b, d, n, l)
        raise ValueError(f"{name} must be (b, n, l) or (b, g, n, l), got {tuple(M.shape)}")

    return u32, dt, A32, expand(B, "B"), expand(C, "C")


def _finish(y, u, D, z, out_dtype):
    if D is not None:
        y = y + D.float()[None, :, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The definition: a sequential loop over time. Slow; the yardstick for every other backend."""
    u32, dt, A32, Bx, Cx = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, l = u.shape
    n = A.shape[1]
    deltaA = torch.exp(dt[..., None] * A32[None, :, None, :])  # (b, d, l, n)
    deltaBu = (dt * u32)[..., None] * Bx.permute(0, 1, 3, 2)  # (b, d, l, n)
    Ct = Cx.permute(0, 1, 3, 2)  # (b, 1|d, l, n)
    h = u32.new_zeros(b, d, n)
    ys = []
    for t in range(l):
        h = deltaA[:, :, t] * h + deltaBu[:, :, t]
        ys.append((h * Ct[:, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u32.new_zeros(b, d, 0)
    return _finish(y, u, D, z, u.dtype)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Selective scan with mamba-ssm's `selective_scan_fn` signature; see the module docstring."""
    return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
