"""Selective scan (the S6 recurrence of Mamba) behind one function.

Semantics follow mamba-ssm's `selective_scan_fn` (state-spaces/mamba,
`mamba_ssm/ops/selective_scan_interface.py`, `selective_scan_ref`):

    delta' = softplus(delta + delta_bias)            (if delta_softplus, else delta + delta_bias)
    h_t    = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t
    y_t    = <C_t, h_t> + D * u_t ;   y = y * silu(z) if z is given

Shapes: u, delta, z (b, d, l); A (d, n); B, C (b, n, l) shared by all channels, or (b, g, n, l)
grouped (group k serves channels k*d/g ... (k+1)*d/g - 1); D, delta_bias (d,). Computation in fp32
(float64 inputs: float64); the output has u's dtype.

Backends, all with the same result and gradients (tests/test_scan.py):
    reference  the definition below: a sequential loop over time (slow; the yardstick)
    chunked    pure PyTorch, CPU and GPU (vlmlab/ops/scan_chunked.py)
    mamba_ssm  the CUDA kernel of the mamba-ssm package, where it is installed
    triton     our Triton kernels for CUDA (vlmlab/ops/scan_triton.py)
Choice: the `backend=` argument, else `use_backend(name)`, else the environment variable
VLMLAB_SCAN, else automatic: CUDA -> mamba_ssm if importable, else triton if it imports and
passes a self-check, else chunked; CPU -> chunked.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmlab.ops.scan_chunked import selective_scan_chunked

BACKENDS = ("reference", "chunked", "mamba_ssm", "triton")
ENV_VAR = "VLMLAB_SCAN"


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Casts to fp32 (float64 stays), applies bias/softplus, expands grouped B/C to (b, d, n, l)."""
    b, d, l = u.shape
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32  # float64 stays float64
    u32 = u.to(acc)
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A32 = A.to(acc)

    def expand(M, name):
        M = M.to(acc)
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
        y = y + D.to(y.dtype)[None, :, None] * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
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


# ----------------------------------------------------------------------------------------------
# optional backends: imported on first use, so importing this module needs neither triton nor CUDA


@functools.cache
def _mamba_ssm_fn() -> Callable | None:
    if importlib.util.find_spec("mamba_ssm") is None:
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # installed but broken (e.g. built for another torch / CUDA)
        return None
    return selective_scan_fn


@functools.cache
def _triton_fn() -> Callable | None:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        from vlmlab.ops.scan_triton import selective_scan_triton
    except Exception:
        return None
    return selective_scan_triton


def selective_scan_mamba_ssm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's CUDA kernel; it wants A, D and delta_bias in fp32."""
    fn = _mamba_ssm_fn()
    if fn is None:
        raise RuntimeError("mamba_ssm is not importable")
    D = D.float() if D is not None else None
    delta_bias = delta_bias.float() if delta_bias is not None else None
    return fn(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus)


def _selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    fn = _triton_fn()
    if fn is None:
        raise RuntimeError("triton is not importable")
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


_IMPLS: dict[str, Callable[..., Tensor]] = {
    "reference": selective_scan_reference,
    "chunked": selective_scan_chunked,
    "mamba_ssm": selective_scan_mamba_ssm,
    "triton": _selective_scan_triton,
}


def _why_not(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on `device` (None: it can)."""
    if name not in BACKENDS:
        return f"unknown selective-scan backend {name!r}; known: {', '.join(BACKENDS)}"
    if name in ("reference", "chunked"):
        return None
    if device.type != "cuda":
        return f"{name} runs on CUDA tensors only, these are on {device.type}"
    if name == "mamba_ssm" and _mamba_ssm_fn() is None:
        return "mamba_ssm is not importable (pip install 'vlmlab[cuda]')"
    if name == "triton" and _triton_fn() is None:
        return "triton is not importable"
    return None


@functools.cache
def _triton_works(device: torch.device) -> bool:
    """Self-check, once per device: a tiny triton scan and its gradients against chunked."""
    g = torch.Generator(device="cpu").manual_seed(0)
    b, d, n, L = 1, 4, 2, 70
    args = [
        torch.randn(b, d, L, generator=g),
        torch.randn(b, d, L, generator=g),
        -torch.rand(d, n, generator=g) - 0.5,
        torch.randn(b, 2, n, L, generator=g),
        torch.randn(b, 2, n, L, generator=g),
        torch.randn(d, generator=g),
        torch.randn(b, d, L, generator=g),
        torch.randn(d, generator=g),
    ]
    try:
        outs = []
        with torch.inference_mode(False), torch.enable_grad():  # callers may be under no_grad
            for fn in (_selective_scan_triton, selective_scan_chunked):
                xs = [a.to(device).requires_grad_() for a in args]
                y = fn(*xs, delta_softplus=True)
                outs.append([y, *torch.autograd.grad(y.square().sum(), xs)])
        if all(torch.allclose(p, q, rtol=1e-3, atol=1e-3) for p, q in zip(*outs, strict=True)):
            return True
        problem = "results differ from chunked"
    except Exception as e:  # a broken toolchain must not take the model down: fall back
        problem = repr(e)
    warnings.warn(f"triton selective scan failed its self-check ({problem}); using chunked", stacklevel=3)
    return False


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on `device` (default: CUDA if present, else CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return [name for name in BACKENDS if _why_not(name, device) is None]


_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("vlmlab_scan_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Forces backend `name` for selective scans inside the `with` block."""
    if name not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {name!r}; known: {', '.join(BACKENDS)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The backend a scan on `device` runs with (argument > use_backend > VLMLAB_SCAN > auto)."""
    device = torch.device(device)
    for name, source in (
        (backend, "backend="),
        (_forced.get(), "use_backend"),
        (os.environ.get(ENV_VAR), ENV_VAR),
    ):
        if name:
            reason = _why_not(name, device)
            if reason:
                raise RuntimeError(f"{source} {name!r} cannot run here: {reason}")
            return name
    if device.type == "cuda":
        if _why_not("mamba_ssm", device) is None:
            return "mamba_ssm"
        if _why_not("triton", device) is None and _triton_works(device):
            return "triton"
    return "chunked"


def _check_args(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (b, d, l), got {tuple(u.shape)}")
    b, d, l = u.shape
    if delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError(f"delta and z must have u's shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d={d}, n), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        ok = (M.dim() == 3 and M.shape == (b, n, l)) or (
            M.dim() == 4 and M.shape[0] == b and M.shape[2:] == (n, l) and d % M.shape[1] == 0
        )
        if not ok:
            raise ValueError(f"{name} must be (b, n, l) or (b, g, n, l) with g | d; got {tuple(M.shape)}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (d,):
            raise ValueError(f"{name} must be (d={d},), got {tuple(v.shape)}")


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    backend: str | None = None,
) -> Tensor:
    """Selective scan with mamba-ssm's `selective_scan_fn` signature; see the module docstring.

    Args:
        backend: one of BACKENDS to force; None chooses (use_backend, VLMLAB_SCAN, automatic).
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(u.device, backend)
    if u.shape[-1] == 0:  # nothing to scan; the reference handles the empty case
        name = "reference"
    return _IMPLS[name](u, delta, A, B, C, D, z, delta_bias, delta_softplus)
