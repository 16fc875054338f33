"""`python -m vlmlab.bench resolution`: batch-1 vision latency and peak memory from 224² upwards.

The analogue of the paper's efficiency figure (vision encoders at 224² ... 6144²). A size that runs
out of memory is recorded as "oom" and larger sizes of that encoder are skipped; so are the sizes
after one slower than `--max-latency` seconds (recorded as "over-budget", so a run fits a time limit).
"""

from __future__ import annotations

import argparse

import torch

from vlmlab.bench import benchmark, time_ms
from vlmlab.encoders import create_encoder

GPU_NAMES = [
    "vmamba-t",
    "vmamba-s",
    "vmamba-b",
    "vit-s",
    "vit-b",
    "vit-l",
    "vitdet-b",
    "vitdet-l",
    "vitdet-h",
]
GPU_SIZES = [224, 512, 1024, 2048, 3072, 4096, 6144]
CPU_NAMES = ["toy-vmamba", "toy-vit", "toy-vitdet"]
CPU_SIZES = [64, 128, 256]


def resolution_rows(names, sizes, device, dtype, repeats, max_latency: float | None = None) -> list[dict]:
    rows = []
    for name in names:
        enc = create_encoder(name).eval().to(device)
        stride = enc.spec.stride
        for size in sizes:
            size = (size // stride) * stride
            x = torch.randn(1, 3, size, size, device=device)
            row = {"encoder": name, "family": enc.spec.family, "size": size, "tokens": (size // stride) ** 2}
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                with (
                    torch.no_grad(),
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"),
                ):
                    ms = time_ms(lambda enc=enc, x=x: enc(x), device, repeats=repeats, warmup=1)
                row.update(status="ok", latency_s=ms / 1e3)
                if device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            except torch.OutOfMemoryError:
                row.update(status="oom")
                rows.append(row)
                break
            rows.append(row)
            print(row, flush=True)  # partial results survive a time limit
            if max_latency is not None and row["latency_s"] > max_latency:
                rows += [
                    {"encoder": name, "family": enc.spec.family, "size": s, "status": "over-budget"}
                    for s in sizes
                    if s > size
                ]
                break
        del enc
    return rows


@benchmark(
    "resolution",
    "batch-1 latency and peak memory of vision encoders vs input resolution",
    [
        (("--names",), {"nargs": "*", "default": None}),
        (("--sizes",), {"nargs": "*", "type": int, "default": None}),
        (("--dtype",), {"default": "fp32", "choices": ["fp32", "bf16"]}),
        (("--repeats",), {"type": int, "default": 3}),
        (("--max-latency",), {"type": float, "default": None, "help": "seconds; skip larger sizes after"}),
    ],
)
def bench_resolution(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    return resolution_rows(
        args.names or (GPU_NAMES if gpu else CPU_NAMES),
        args.sizes or (GPU_SIZES if gpu else CPU_SIZES),
        device,
        args.dtype,
        args.repeats,
        getattr(args, "max_latency", None),
    )
