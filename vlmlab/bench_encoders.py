"""`python -m vlmlab.bench encoders`: images/s of the vision encoders, measured in one run.

Both the full classifier forward (how VMamba and Swin report throughput) and the tapped encoder
forward (what the VLM runs) are timed; ratios are only meaningful within one run and one device.

Precisions: `fp32` is PyTorch's default fp32 (matrix products in IEEE fp32, cuDNN convolutions
allowed TF32; the official throughput function leaves these defaults alone; it matters because
VMamba's 1x1 projections are convolutions and Swin's are nn.Linear), `fp32-strict` turns TF32 off
for convolutions too, `bf16` is autocast to bfloat16.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from vlmlab.bench import benchmark, time_ms
from vlmlab.encoders import create_encoder

GPU_DEFAULT = [
    "vmamba-t",
    "vmamba-s",
    "vmamba-b",
    "mambavision-t",
    "mambavision-s",
    "mambavision-b",
    "swin-t",
    "swin-s",
    "swin-b",
    "vit-s",
    "vit-b",
]
CPU_DEFAULT = ["vmamba-t", "mambavision-t", "swin-t", "vit-s", "maxvit-t"]


DTYPES = ("fp32", "fp32-strict", "bf16")


@contextlib.contextmanager
def _conv_tf32(allow: bool):
    """cuDNN convolutions may use TF32 (PyTorch's default) or not, within the block."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = old and allow
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def encoder_rows(names, batch, img, dtypes, device, repeats, modes=("full", "tap")) -> list[dict]:
    rows = []
    for name in names:
        enc = create_encoder(name, img_size=img).eval().to(device)
        x = torch.randn(batch, 3, img, img, device=device)
        for dtype in dtypes:
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; choose from {DTYPES}")
            amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
            for mode in modes:
                fn = enc.model if mode == "full" else enc

                def run(fn=fn, x=x, amp=amp, dtype=dtype):
                    with torch.no_grad(), amp, _conv_tf32(dtype != "fp32-strict"):
                        return fn(x)

                try:
                    ms = time_ms(run, device, repeats=repeats, warmup=2)
                    ips = batch / (ms / 1e3)
                except torch.OutOfMemoryError:
                    ms, ips = float("nan"), float("nan")
                    torch.cuda.empty_cache()
                rows.append(
                    {
                        "encoder": name,
                        "family": enc.spec.family,
                        "params_M": enc.spec.params / 1e6,
                        "mode": mode,
                        "dtype": dtype,
                        "conv_tf32": dtype == "fp32" and torch.backends.cudnn.allow_tf32,
                        "batch": batch,
                        "img": img,
                        "ms": ms,
                        "img_per_s": ips,
                    }
                )
        del enc
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # ratios against Swin of the same size, measured in this run
    base = {
        (r["encoder"].split("-")[-1], r["mode"], r["dtype"]): r["img_per_s"]
        for r in rows
        if r["encoder"].startswith("swin-")
    }
    for r in rows:
        size = r["encoder"].split("-")[-1]
        ref = base.get((size, r["mode"], r["dtype"]))
        r["vs_swin_same_size"] = r["img_per_s"] / ref if ref else None
    return rows


@benchmark(
    "encoders",
    "images/s of the vision encoders (full classifier and tapped encoder), fp32 and bf16",
    [
        (("--names",), {"nargs": "*", "default": None, "help": "encoder names (default: a GPU or CPU set)"}),
        (("--batch",), {"type": int, "default": None, "help": "default 128 on GPU, 8 on CPU"}),
        (("--img",), {"type": int, "default": 224}),
        (("--dtypes",), {"nargs": "*", "default": None, "help": "fp32, fp32-strict, bf16 (GPU: all)"}),
        (("--repeats",), {"type": int, "default": 5}),
    ],
)
def bench_encoders(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default, whatever the caller set
    names = args.names or (GPU_DEFAULT if gpu else CPU_DEFAULT)
    batch = args.batch or (128 if gpu else 8)
    dtypes = args.dtypes or (list(DTYPES) if gpu else ["fp32"])
    return encoder_rows(names, batch, args.img, dtypes, device, args.repeats)
