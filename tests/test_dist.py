"""Multi-process training: rank sharding, parallel-mode choice, and torchrun on CPU (gloo) vs one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vlmlab.dist import FSDP_MIN_PARAMS, rank_micro_batches, resolve_parallel


@given(n=st.integers(1, 200), batch=st.integers(1, 9), accum=st.integers(1, 4), world=st.integers(1, 4))
def test_ranks_split_each_step_like_one_process_accumulating(n, batch, accum, world):
    """For every step of an epoch, the ranks' micro-batches are the one-process run's micro-batches."""
    order = list(range(n))[::-1]
    g = batch * accum * world
    for lo in range(0, n, g):
        step = order[lo : lo + g]
        single = rank_micro_batches(step, batch, accum * world, rank=0)
        ranks = [rank_micro_batches(step, batch, accum, r) for r in range(world)]
        assert [mb for r in ranks for mb in r] == single
        assert [i for mb in single for i in mb] == step
        assert all(len(r) == accum for r in ranks)  # every rank takes part in every micro-step


def test_parallel_mode_choice():
    big, small = FSDP_MIN_PARAMS, FSDP_MIN_PARAMS - 1
    assert (
        resolve_parallel("auto", 1, True, big) == "none" and resolve_parallel("fsdp", 1, True, big) == "none"
    )
    assert resolve_parallel("auto", 8, True, big) == "fsdp"
    assert resolve_parallel("auto", 8, True, small) == "ddp"
    assert resolve_parallel("auto", 8, False, big) == "ddp"  # align: connector only
    assert resolve_parallel("fsdp", 2, True, small) == "fsdp"
    with pytest.raises(ValueError, match="2 processes"):
        resolve_parallel("none", 2, True, small)
    with pytest.raises(ValueError, match="auto, ddp, fsdp, none"):
        resolve_parallel("deepspeed", 2, True, small)


# --- torchrun, 2 CPU processes (gloo) --------------------------------------------------------------

# smoke world: 256 conversations; global batch 18 = 9 x 2 leaves a last step of 4 samples, so rank 1
# runs the zero-weight pass on an empty chunk
OVR = [
    "encoders=[toy-vit]",
    "train.epochs=1",
    "train.max_steps=null",
    "train.batch_size=9",
    "train.global_batch_size=18",
    "train.log_every=1",
    "train.ckpt_every=5",
    "llm.hidden_size=32",
    "llm.num_layers=2",
    "eval.limit=4",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlmlab.data.toyworld import WORLD_PRESETS, generate_world

    data = tmp_path_factory.mktemp("data")
    generate_world(WORLD_PRESETS["smoke"], data / "toyworld" / "smoke", progress=False)
    return data


def _launch(data, run_dir, nproc: int, *extra: str, device: str = "cpu") -> None:
    env = {**os.environ, "VLMLAB_DATA": str(data), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "vlmlab.train"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "vlmlab.train",
        ]
    cmd += ["--preset", "smoke", "--run-dir", str(run_dir), "--device", device, *extra, *OVR]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _curve(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_curve(a, b, tol=1e-5, steps=15):
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, steps + 1))
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < tol, (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) < 10 * tol, (x, y)
        assert x["lr"] == y["lr"]


@pytest.mark.slow
def test_torchrun_ddp_and_fsdp_match_one_process_and_resume(data, tmp_path):
    _launch(data, tmp_path / "one", 1)
    one = _curve(tmp_path / "one")
    info = json.loads((tmp_path / "one" / "run.json").read_text())
    assert (info["world_size"], info["grad_accum"], info["parallel"]) == (1, 2, "none")

    _launch(data, tmp_path / "ddp", 2, "train.parallel=ddp")
    _assert_same_curve(one, _curve(tmp_path / "ddp"))
    info = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert (info["world_size"], info["grad_accum"], info["parallel"]) == (2, 1, "ddp")
    # only rank 0 writes: one line per step, one checkpoint folder per save
    ckpts = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-0000005", "step-0000010", "step-0000015"]

    # FSDP trains steps 1-7 and is "killed"; DDP resumes from its step-5 checkpoint (name-keyed state)
    _launch(data, tmp_path / "killed", 2, "train.parallel=fsdp", "--stop-after", "7")
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["parallel"] == "fsdp"
    assert [m["step"] for m in _curve(tmp_path / "killed")] == list(range(1, 8))
    _assert_same_curve(one[:7], _curve(tmp_path / "killed"), steps=7)
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step-0000005"
    _launch(data, tmp_path / "killed", 2, "train.parallel=ddp", "--resume")
    _assert_same_curve(one, _curve(tmp_path / "killed"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_torchrun_on_two_gpus_matches_one_gpu(data, tmp_path):
    """The same check on 2 GPUs (NCCL) in fp32; then FSDP in bf16 with gradient checkpointing, logging MFU."""
    _launch(data, tmp_path / "one", 1, device="cuda")
    one = _curve(tmp_path / "one")
    for mode in ("ddp", "fsdp"):
        _launch(data, tmp_path / mode, 2, f"train.parallel={mode}", device="cuda")
        _assert_same_curve(one, _curve(tmp_path / mode), tol=1e-4)  # GPU reductions reorder sums
    _launch(
        data,
        tmp_path / "bf16",
        2,
        "train.parallel=fsdp",
        "train.bf16=true",
        "train.grad_checkpointing=true",
        device="cuda",
    )
    curve = _curve(tmp_path / "bf16")
    assert all(abs(m["loss"] - o["loss"]) < 0.05 for m, o in zip(curve, one, strict=True))
    assert all(m["max_mem_gb"] > 0 for m in curve)
    if any(k in torch.cuda.get_device_name() for k in ("H100", "H200", "A100")):
        assert all(0 < m["mfu"] < 1 for m in curve)
