"""Selective-scan backends against the sequential reference and the official VMamba oracle."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmlab.ops import scan, scan_chunked
from vlmlab.ops.scan import available_backends, resolve_backend, selective_scan, use_backend
from vlmlab.ops.scan_chunked import selective_scan_chunked

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
CUDA = torch.cuda.is_available()


def make_inputs(b, d, L, n, groups, *, D=True, z=True, bias=True, softplus=True, dtype=torch.float32, seed=0):
    """Random scan inputs (dict by argument name; absent ones None). groups=0: shared B/C (b, n, L).

    A, D and delta_bias stay fp32 whatever `dtype` is, as the parameters of a bf16 model do.
    Without softplus the step sizes are drawn positive so that the recurrence decays.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    bc_shape = (b, groups, n, L) if groups else (b, n, L)
    x = {
        "u": randn(b, d, L),
        "delta": randn(b, d, L, scale=0.5) if softplus else 0.05 + torch.rand(b, d, L, generator=g).double(),
        "A": -torch.exp(randn(d, n, scale=0.5)),
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(d) if D else None,
        "z": randn(b, d, L) if z else None,
        "delta_bias": (randn(d, scale=0.5) - 1 if softplus else 0.1 * torch.rand(d, generator=g).double())
        if bias
        else None,
    }
    low = {"A": torch.float32, "D": torch.float32, "delta_bias": torch.float32}
    return {
        k: None if v is None else v.to(low.get(k, dtype) if dtype != torch.float64 else dtype)
        for k, v in x.items()
    }


def run(fn, inputs, dy, softplus, device="cpu", dtype=None):
    """y and the gradients of (y * dy).sum() for every given input, as float64 on the CPU."""
    xs = {
        k: None if v is None else v.to(device=device, dtype=dtype or v.dtype).requires_grad_()
        for k, v in inputs.items()
    }
    y = fn(*(xs[k] for k in NAMES), delta_softplus=softplus)
    given_ = [k for k in NAMES if xs[k] is not None]
    grads = torch.autograd.grad(y, [xs[k] for k in given_], dy.to(device=device, dtype=y.dtype))
    out = {"y": y.detach()}
    out.update({"d" + k: gr for k, gr in zip(given_, grads, strict=True)})
    for k, v in out.items():
        assert v.dtype == (xs[k[1:]].dtype if k != "y" else xs["u"].dtype), f"{k} has dtype {v.dtype}"
    return {k: v.double().cpu() for k, v in out.items()}


def rel_err(got, ref):
    """max |got - ref| / max |ref| (the plain max difference where ref is all zero)."""
    scale = ref.abs().max()
    return ((got - ref).abs().max() / (scale if scale > 0 else 1)).item()


def assert_close(got, ref, tol, context=""):
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.isfinite(got[k]).all(), f"{context}: {k} is not finite"
        err = rel_err(got[k], ref[k])
        assert err <= tol, f"{context}: {k} relative error {err:.2e} > {tol:.0e}"


def expected(inputs, dy, softplus):
    """The definition, in float64, on the same (upcast) inputs."""
    return run(scan.selective_scan_reference, inputs, dy, softplus, dtype=torch.float64)


# b, d, L, n, groups (0: shared B/C), D, z, delta_bias, softplus
CASES = [
    (2, 4, 1, 1, 0, True, True, True, True),
    (2, 8, 7, 4, 2, True, False, False, True),
    (1, 6, 64, 16, 0, False, True, True, False),
    (2, 8, 130, 1, 4, True, True, True, True),  # VMamba's call: K=4 groups, n=1, softplus, no z
    (1, 8, 300, 4, 1, False, False, True, True),
    (1, 16, 150, 16, 8, True, True, False, False),
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # fp32 accumulation; bf16 rounding of outputs


def _case_id(case):
    b, d, L, n, g, D, z, bias, sp = case
    flags = "".join(c for c, on in zip("Dzbs", (D, z, bias, sp), strict=True) if on)
    return f"b{b}d{d}L{L}n{n}g{g}-{flags or 'none'}"


def _check_backend(backend, case, dtype, device):
    b, d, L, n, g, D, z, bias, sp = case
    inputs = make_inputs(b, d, L, n, g, D=D, z=z, bias=bias, softplus=sp, dtype=dtype, seed=L)
    dy = torch.randn(b, d, L, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    got = run(scan._IMPLS[backend], inputs, dy, sp, device=device)
    assert_close(got, expected(inputs, dy, sp), TOL[dtype], f"{backend} {_case_id(case)} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_cpu_backends_match_definition(backend, case, dtype):
    _check_backend(backend, case, dtype, "cpu")


GPU_CASES = CASES + [(2, 64, 1000, 1, 4, True, False, True, True), (1, 24, 777, 4, 3, True, True, True, True)]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
@pytest.mark.parametrize("backend", [b for b in scan.BACKENDS if b != "reference"])
def test_gpu_backends_match_definition(backend, case, dtype):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not available on this machine")
    _check_backend(backend, case, dtype, "cuda")


@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 2),
    groups=st.sampled_from([0, 1, 2, 3]),
    per_group=st.integers(1, 3),
    n=st.integers(1, 5),
    L=st.integers(1, 200),
    flags=st.tuples(*[st.booleans()] * 4),
)
def test_chunked_any_shape(b, groups, per_group, n, L, flags):
    """Chunked equals the definition (float64 both) on random shapes and options: no indexing slips."""
    D, z, bias, sp = flags
    d = max(groups, 1) * per_group
    inputs = make_inputs(b, d, L, n, groups, D=D, z=z, bias=bias, softplus=sp, dtype=torch.float64, seed=L)
    dy = torch.randn(b, d, L, dtype=torch.float64)
    assert_close(run(selective_scan_chunked, inputs, dy, sp), expected(inputs, dy, sp), 1e-12)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("L", [1000, 4096])
def test_chunked_long_sequence(L, n):
    """fp32 chunked over thousands of steps stays within fp32 noise of the float64 definition."""
    inputs = make_inputs(1, 2, L, n, 0, dtype=torch.float32, seed=n)
    dy = torch.randn(1, 2, L, generator=torch.Generator().manual_seed(2)).float()
    assert_close(run(selective_scan_chunked, inputs, dy, True), expected(inputs, dy, True), 1e-5, f"L={L}")


def test_chunked_strong_decay_is_finite():
    """Decays down to exp(-50) per step: a chunk's cumulative decay (e^-800 over 32 steps) must
    underflow to zero, never be inverted into an overflow (no exp of large positive numbers)."""
    inputs = make_inputs(1, 4, 513, 4, 0, seed=3)
    inputs["A"] = torch.full((4, 4), -50.0)
    inputs["delta"] = inputs["delta"].abs() + 1.0
    dy = torch.randn(1, 4, 513, dtype=torch.float64).float()
    assert_close(run(selective_scan_chunked, inputs, dy, True), expected(inputs, dy, True), 1e-5)


@pytest.mark.parametrize("log_range", [None, 4.0, 1e-3], ids=["one-chunk", "short-chunks", "T1"])
@pytest.mark.parametrize("block", [None, 2200, 700, 1], ids=["one-block", "pairs", "channels", "tiny"])
def test_chunked_chunks_and_blocks_do_not_change_results(monkeypatch, log_range, block):
    """Chunk length and CPU blocking only regroup the computation (float64, all gradients to 1e-12).

    The allowed decay range of a chunk sets its length; blocks of whole (batch, group) pairs or of
    channel ranges within one pair (whose dB/dC parts add up) come from the block size.
    """
    lengths, chunk_length = [], scan_chunked.chunk_length

    def spy(*args):
        lengths.append(chunk_length(*args))
        return lengths[-1]

    monkeypatch.setattr(scan_chunked, "chunk_length", spy)
    if log_range is not None:
        monkeypatch.setitem(scan_chunked.LOG_RANGE, torch.float64, log_range)
    if block is not None:  # one pair is c n L = 4 * 3 * 90 = 1080 values
        monkeypatch.setattr(scan_chunked, "BLOCK", block)
    inputs = make_inputs(2, 12, 90, 3, 3, dtype=torch.float64, seed=5)
    dy = torch.randn(2, 12, 90, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert_close(run(selective_scan_chunked, inputs, dy, True), expected(inputs, dy, True), 1e-12)
    want = {None: lambda T: T == 90, 4.0: lambda T: 1 < T < 90, 1e-3: lambda T: T == 1}[log_range]
    assert lengths and want(lengths[0]), lengths


@pytest.mark.parametrize("doubling", [False, True], ids=["sequential", "doubling"])
@pytest.mark.parametrize("nc", [1, 2, 5, 37])
def test_chunk_chain_solves_its_recurrence(nc, doubling):
    """The recurrence over chunks, H_0 = 0, H_k+1 = E_k H_k + F_k, both ways, decays of zero included."""
    g = torch.Generator().manual_seed(nc)
    E = torch.rand(3, nc, generator=g, dtype=torch.float64)
    E[1, nc // 2] = 0  # a decay that underflowed
    F = torch.randn(3, nc, generator=g, dtype=torch.float64)
    want = torch.zeros(3, nc, dtype=torch.float64)
    for k in range(nc - 1):
        want[:, k + 1] = E[:, k] * want[:, k] + F[:, k]
    torch.testing.assert_close(scan_chunked._chain(E, F, doubling), want, rtol=1e-14, atol=1e-14)


def test_chunk_length_bounds_the_decay_of_a_chunk():
    assert scan_chunked.chunk_length(3136, 0.0, 60.0) == 3136  # no decay: one chunk
    assert scan_chunked.chunk_length(3136, 4.35, 60.0) == 14  # 13 steps of 4.35 <= 60 < 14 steps
    assert scan_chunked.chunk_length(196, 9.0, 60.0) == 7  # the longest divisor of L within the bound
    assert scan_chunked.chunk_length(199, 1.0, 60.0) == 1  # prime L: chunks of one step
    assert scan_chunked.chunk_length(50, float("nan"), 60.0) == 1


def test_chunked_noncontiguous_inputs():
    """Strided inputs and gradient (MambaVision passes delta and B/C as transposed views)."""
    x = make_inputs(2, 8, 33, 4, 0, dtype=torch.float32, seed=2)
    # same values, time-major memory
    strided = {k: v if v is None or v.dim() < 3 else v.mT.contiguous().mT for k, v in x.items()}
    dy = torch.randn(2, 33, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float().mT
    assert not strided["delta"].is_contiguous() and not dy.is_contiguous()
    assert_close(run(selective_scan_chunked, strided, dy, True), expected(x, dy, True), 1e-5)


def test_chunked_softplus_above_threshold():
    """Raw steps above 20, where softplus is the identity (and its gradient 1), as in F.softplus."""
    x = make_inputs(1, 4, 40, 2, 0, dtype=torch.float64, seed=4)
    x["delta_bias"][1] = 21.0
    x["delta"][0, 1, ::3] += 5.0  # some steps of channel 1 on each side of the threshold
    dy = torch.randn(1, 4, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert_close(run(selective_scan_chunked, x, dy, True), expected(x, dy, True), 1e-12)


# ---------------------------------------------------------------------------------------------
# the official fallback's numbers (oracles/vmamba/selective_scan_io.safetensors, README section 4)


def _oracle(oracles, n):
    from safetensors.torch import load_file

    t = load_file(oracles / "vmamba" / "selective_scan_io.safetensors")
    inputs = {k: t.get(f"{k}_n{n}") for k in NAMES}
    official = {k: t[f"{k}_n{n}"] for k in ("y", "du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")}
    f64 = {k: t[f"f64ref/{k}_n{n}"] for k in official}
    return inputs, t[f"dy_n{n}"], official, f64


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_oracle_selective_scan(oracles, n, device):
    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    inputs, dy, official, f64 = _oracle(oracles, n)
    assert inputs["z"] is None and inputs["B"].dim() == 4  # VMamba: grouped B/C, no z
    for backend in available_backends(device):
        got = run(scan._IMPLS[backend], inputs, dy, True, device=device)
        for k, ref in official.items():  # README: float32 vs the stored float32, atol = rtol = 1e-4
            torch.testing.assert_close(got[k], ref.double(), atol=1e-4, rtol=1e-4, msg=f"{backend} {k} n={n}")
        assert_close(got, f64, 1e-5, f"{backend} n={n} vs f64ref")


@pytest.mark.parametrize("n", [1, 4])
def test_oracle_float64(oracles, n):
    """Chunked in float64 computes the official math: within ~1e-10 of f64ref (README section 5)."""
    inputs, dy, _, f64 = _oracle(oracles, n)
    got = run(selective_scan_chunked, inputs, dy, True, dtype=torch.float64)
    for k, ref in f64.items():
        torch.testing.assert_close(got[k], ref, atol=1e-10, rtol=1e-10, msg=f"{k} n={n}")


# ---------------------------------------------------------------------------------------------
# dispatch


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(scan.ENV_VAR, raising=False)


def test_auto_choice_on_cpu(no_env):
    assert available_backends("cpu") == ["reference", "chunked"]
    assert resolve_backend("cpu") == "chunked"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_choice_on_cuda(no_env):
    names = available_backends("cuda")
    want = "mamba_ssm" if "mamba_ssm" in names else "triton" if "triton" in names else "chunked"
    assert resolve_backend("cuda") == want


def test_env_var_and_context_force_a_backend(monkeypatch):
    monkeypatch.setenv(scan.ENV_VAR, "reference")
    assert resolve_backend("cpu") == "reference"
    with use_backend("chunked"):  # the context wins over the environment
        assert resolve_backend("cpu") == "chunked"
        assert resolve_backend("cpu", backend="reference") == "reference"  # the argument wins over both
    assert resolve_backend("cpu") == "reference"
    monkeypatch.setenv(scan.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="VLMLAB_SCAN 'triton' cannot run here: .*CUDA"):
        resolve_backend("cpu")
    monkeypatch.setenv(scan.ENV_VAR, "cuda-magic")
    with pytest.raises(RuntimeError, match="known: reference, chunked, mamba_ssm, triton"):
        resolve_backend("cpu")
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        with use_backend("fast"):
            pass


def test_dispatch_runs_the_chosen_backend(no_env):
    x = make_inputs(2, 8, 40, 2, 4, dtype=torch.float32)
    args = [x[k] for k in NAMES]
    for name in ("reference", "chunked"):
        with use_backend(name):
            torch.testing.assert_close(
                selective_scan(*args, delta_softplus=True), scan._IMPLS[name](*args, True)
            )
        torch.testing.assert_close(selective_scan(*args, True, backend=name), scan._IMPLS[name](*args, True))
    bf16 = [a.bfloat16() if a is not None and a.dim() > 1 and a is not x["A"] else a for a in args]
    assert selective_scan(*bf16, True).dtype == torch.bfloat16


def test_bad_shapes_are_reported():
    x = make_inputs(2, 8, 10, 2, 4, dtype=torch.float32)
    args = [x[k] for k in NAMES]
    args[3] = torch.randn(2, 3, 2, 10)  # 3 groups do not divide 8 channels
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(*args)
    args[3] = x["B"]
    args[2] = torch.randn(7, 2)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(*args)


def test_import_is_cheap():
    """Importing the scan needs neither triton nor mamba_ssm nor CUDA."""
    code = "import sys, vlmlab.ops.scan; assert not {'triton', 'mamba_ssm'} & set(sys.modules)"
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_in_interpreter():
    """The Triton kernels' logic, run by Triton's CPU interpreter (catches indexing bugs without a GPU)."""
    code = textwrap.dedent(
        """
        import torch
        from tests.test_scan import CASES, TOL, _check_backend
        from vlmlab.ops import scan, scan_triton
        for case in CASES[3:5]:  # tuned tiles: one tile of 256 steps (L=130), tiles of 64 (L=300)
            _check_backend("triton", case, torch.float32, "cpu")
        # small tiles: several tiles and channel blocks per sequence, ragged ends
        small = (4, 2, 16, 1)
        scan._IMPLS["triton"] = lambda *a, **k: scan_triton.selective_scan_triton(*a, **k, blocks=small)
        for case in CASES[:4] + [(1, 6, 41, 3, 3, True, True, True, True)]:
            _check_backend("triton", case, torch.float32, "cpu")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=600)


def test_bench_scan_writes_json(tmp_path, monkeypatch, capsys):
    from vlmlab import bench

    monkeypatch.setenv("VLMLAB_RUNS", str(tmp_path))
    bench.main(["scan", "--quick", "--repeats", "1"])
    (path,) = (tmp_path / "bench").glob("scan-*.json")
    record = json.loads(path.read_text())
    assert record["name"] == "scan" and record["rows"]
    assert {"backend", "shape", "pass", "ms"} <= set(record["rows"][0])
    assert "chunked" in capsys.readouterr().out
