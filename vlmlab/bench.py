"""Benchmarks: `python -m vlmlab.bench <name> [options]`.

Every benchmark prints a table and writes its rows, with the machine and the arguments, to
runs/bench/<name>-<timestamp>.json, atomically (runs/ is `vlmlab.config.runs_dir()`). A benchmark is a
function `fn(args) -> list[dict]` (one dict per table row) registered with `@benchmark(name,
help, options)`; `options` are (flags, argparse kwargs) pairs for its own arguments. Numbers are
printed and saved, never asserted.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch

from vlmlab.config import runs_dir
from vlmlab.io import atomic_write_json

Option = tuple[tuple[str, ...], dict]
_BENCHMARKS: dict[str, tuple[str, list[Option], Callable[[argparse.Namespace], list[dict]]]] = {}


def benchmark(name: str, help: str, options: list[Option] = ()) -> Callable:
    """Registers `fn(args) -> rows` as the subcommand `name`."""

    def deco(fn: Callable[[argparse.Namespace], list[dict]]) -> Callable[[argparse.Namespace], list[dict]]:
        _BENCHMARKS[name] = (help, list(options), fn)
        return fn

    return deco


# ----------------------------------------------------------------------------------------------
# helpers shared by benchmarks


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def format_table(rows: list[dict]) -> str:
    """Rows as an aligned text table (columns in first-seen order; floats to 4 significant digits)."""
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]

    def cell(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[cell(row.get(c)) for c in cols] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# scan: the selective-scan backends


def _scan_inputs(b, d, L, n, groups, dtype, device, seed=0):
    """VMamba's call: grouped B/C (one group per scan direction), D, delta_bias, softplus, no z."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dt)

    return {
        "u": randn(b, d, L),
        "delta": randn(b, d, L, scale=0.5),
        "A": -torch.exp(randn(d, n, scale=0.5, dt=torch.float32)),
        "B": randn(b, groups, n, L),
        "C": randn(b, groups, n, L),
        "D": randn(d, dt=torch.float32),
        "delta_bias": randn(d, scale=0.5, dt=torch.float32) - 1,
    }


def _scan_bytes(x: dict, backward: bool) -> int:
    """Fewest bytes a scan must move: inputs read and outputs written once (forward: + y;
    backward: inputs and dy read again, a gradient written for every input)."""
    inputs = sum(t.numel() * t.element_size() for t in x.values())
    y = x["u"].numel() * x["u"].element_size()
    return inputs + y + (inputs + y + inputs if backward else 0)


def _scan_pass(fn: Callable, x: dict, backward: bool) -> Callable[[], object]:
    def forward():
        return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], None, x["delta_bias"], True)

    if not backward:
        return forward
    leaves = {k: v.detach().requires_grad_() for k, v in x.items()}
    dy = torch.randn_like(x["u"])

    def forward_backward():
        y = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"], None,
               leaves["delta_bias"], True)  # fmt: skip
        return torch.autograd.grad(y, list(leaves.values()), dy)

    return forward_backward


def _copy_gbps(nbytes: int, device: torch.device, repeats: int) -> float:
    """Bandwidth (GB/s, read + write) of a device-to-device copy that moves `nbytes` in all."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats, warmup=2)
    return 2 * src.numel() / ms / 1e6


def _cpu_rows(args) -> list[dict]:
    """Chunked vs the sequential reference on the CPU, ratio measured in the same run."""
    cpu = torch.device("cpu")
    shapes = (
        [(1, 8, 256, 1, 4), (1, 8, 64, 4, 4)] if args.quick else [(2, 192, 3136, 1, 4), (2, 384, 196, 16, 4)]
    )
    rows = []
    from vlmlab.ops import scan

    for b, d, L, n, g in shapes:
        x = _scan_inputs(b, d, L, n, g, torch.float32, cpu)
        for backward in (False, True):
            times = {}
            for name in ("reference", "chunked"):
                # the reference takes seconds per call at L = 3136: time it fewer times
                reps = args.repeats if name != "reference" else max(1, args.repeats // 3)
                times[name] = time_ms(_scan_pass(scan._IMPLS[name], x, backward), cpu, reps)
            for name, ms in times.items():
                rows.append(
                    {
                        "device": "cpu",
                        "backend": name,
                        "dtype": "fp32",
                        "shape": f"b{b} d{d} L{L} n{n} g{g}",
                        "pass": "fwd+bwd" if backward else "fwd",
                        "ms": ms,
                        "x_vs_reference": times["reference"] / ms,
                    }
                )
    return rows


def _gpu_rows(args) -> list[dict]:
    """Every CUDA backend at VMamba-S shapes: time and bandwidth vs a copy of the same bytes."""
    from vlmlab.ops import scan

    cuda = torch.device("cuda")
    # VMamba-S (dims 96, ssm_ratio 2, K=4 directions, d_state 1) at 224 px, batch 128:
    # stage 0: d_inner 192 -> scan channels 4*192, L = 56*56; stage 2: d_inner 768, L = 14*14
    shapes = {
        "vmamba-s stage0": (128, 4 * 192, 56 * 56, 1, 4),
        "vmamba-s stage2": (128, 4 * 768, 14 * 14, 1, 4),
    }
    if args.quick:
        shapes = {"small": (2, 64, 1000, 1, 4)}
    backends = [b for b in scan.available_backends(cuda) if args.reference or b != "reference"]
    rows = []
    for label, (b, d, L, n, g) in shapes.items():
        for dtype in (torch.float32, torch.bfloat16):
            x = _scan_inputs(b, d, L, n, g, dtype, cuda)
            for backward in (False, True):
                nbytes = _scan_bytes(x, backward)
                copy = _copy_gbps(nbytes, cuda, args.repeats)
                for name in backends:
                    reps = args.repeats if name != "reference" else 1
                    ms = time_ms(_scan_pass(scan._IMPLS[name], x, backward), cuda, reps)
                    gbps = nbytes / ms / 1e6
                    rows.append(
                        {
                            "device": torch.cuda.get_device_name(),
                            "backend": name,
                            "dtype": str(dtype).removeprefix("torch."),
                            "shape": f"{label}: b{b} d{d} L{L} n{n} g{g}",
                            "pass": "fwd+bwd" if backward else "fwd",
                            "ms": ms,
                            "GB/s": gbps,
                            "copy GB/s": copy,
                            "of_copy": gbps / copy,
                        }
                    )
                    torch.cuda.empty_cache()
    return rows


SWEEP = {  # shape -> (BLOCK_D, BLOCK_L, num_warps) candidates, forward and backward alike
    "stage0": ((128, 768, 3136, 1, 4), [(4, 64, 4), (8, 64, 4), (16, 64, 4), (8, 64, 2), (16, 64, 2),
                                        (32, 64, 8), (4, 128, 4), (8, 128, 4), (8, 128, 2), (16, 128, 8)]),
    "stage2": ((128, 3072, 196, 1, 4), [(2, 256, 4), (4, 256, 4), (4, 256, 2), (8, 256, 4), (4, 256, 8),
                                        (16, 256, 8), (16, 64, 4), (8, 128, 4)]),
}  # fmt: skip


def _sweep_rows(args) -> list[dict]:
    """Triton tile sizes at the VMamba-S shapes (fp32); backward time = fwd+bwd - fwd."""
    from vlmlab.ops.scan_triton import selective_scan_triton

    cuda = torch.device("cuda")
    rows = []
    for label, ((b, d, L, n, g), candidates) in SWEEP.items():
        x = _scan_inputs(b, d, L, n, g, torch.float32, cuda)
        for block_d, block_l, warps in candidates:
            blocks = (block_d, block_d, block_l, warps)
            row = {"shape": label, "blocks": f"{block_d}x{block_l}/{warps}w"}
            for backward in (False, True):

                def fn(*a, blocks=blocks):
                    return selective_scan_triton(*a, blocks=blocks)

                row["fwd+bwd ms" if backward else "fwd ms"] = time_ms(
                    _scan_pass(fn, x, backward), cuda, args.repeats
                )
            row["bwd ms"] = row["fwd+bwd ms"] - row["fwd ms"]
            rows.append(row)
    return rows


@benchmark(
    "scan",
    "selective-scan backends: CPU chunked vs reference; on CUDA each backend vs copy bandwidth",
    [
        (("--quick",), {"action": "store_true", "help": "tiny shapes (seconds; for tests)"}),
        (("--repeats",), {"type": int, "default": 5, "help": "timed repeats per measurement (median)"}),
        (("--no-cpu",), {"action": "store_true", "help": "skip the CPU part"}),
        (("--threads",), {"type": int, "default": None, "help": "torch CPU threads (default: torch's)"}),
        (("--reference",), {"action": "store_true", "help": "also time the sequential reference on CUDA"}),
        (("--sweep",), {"action": "store_true", "help": "only sweep the Triton tile sizes (CUDA)"}),
    ],
)
def bench_scan(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sweep:
        return _sweep_rows(args)
    rows = [] if args.no_cpu else _cpu_rows(args)
    if torch.cuda.is_available():
        rows += _gpu_rows(args)
    return rows


# ----------------------------------------------------------------------------------------------


# benchmarks that live in their own modules register themselves on import
PLUGINS = (
    "vlmlab.bench_encoders",
    "vlmlab.bench_train",
    "vlmlab.bench_eval",
    "vlmlab.bench_resolution",
    "vlmlab.bench_cells",
)


def _load_plugins() -> None:
    import importlib

    for name in PLUGINS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:  # a plugin whose dependencies are not installed here
            if e.name == name:
                continue
            print(
                f"[bench] {name.split('.')[-1].removeprefix('bench_')} unavailable: missing {e.name}",
                file=sys.stderr,
            )


def main(argv: list[str] | None = None) -> Path:
    """Runs one benchmark; returns the path of its JSON record."""
    _load_plugins()
    parser = argparse.ArgumentParser(prog="python -m vlmlab.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="name", required=True)
    for name, (help_, options, _) in _BENCHMARKS.items():
        p = sub.add_parser(name, help=help_)
        for flags, kwargs in options:
            p.add_argument(*flags, **kwargs)
    args = parser.parse_args(argv)
    _, _, fn = _BENCHMARKS[args.name]
    started = datetime.now()
    rows = fn(args)
    print(format_table(rows))
    record = {
        "name": args.name,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now() - started).total_seconds(), 1),
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine(),
        "rows": rows,
    }
    path = runs_dir() / "bench" / f"{args.name}-{started:%Y%m%d-%H%M%S}.json"
    atomic_write_json(path, record)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    # run through the importable module so plugins register into the same registry
    from vlmlab.bench import main as _main

    _main()
