"""Distributed helpers for `torchrun`: process group, rank sharding of the data, DDP / FSDP wrapping.

The same training script runs on 1 CPU, 1 GPU or N GPUs. Without torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK) nothing is initialized and every helper is a no-op for one process.

Data: every rank walks the same seeded epoch order; each optimizer step takes one global batch
(batch_size * grad_accum * world_size samples) and rank r gets its chunks r*grad_accum ... r*grad_accum +
grad_accum - 1, so the union of the ranks' micro-batches is exactly the one-process run's at the
same global batch.

Parallelism (the release trains with FSDP; prismatic-vlms `training/strategies/fsdp.py`):
- ddp: the connector-only stage or small LLMs; every rank holds the whole model, gradients averaged.
- fsdp: 7B-class LLMs; FSDP2 `fully_shard` per decoder layer plus the root (full shard), parameters
  in bf16 for compute and, as in the release (reduce_in_full_precision=False), bf16 gradient reduction.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("auto", "ddp", "fsdp", "none")
FSDP_MIN_PARAMS = 1_000_000_000  # "7B-class": below this a full replica per GPU is cheaper than sharding
# Generous: the other ranks wait in a collective while rank 0 builds the feature cache or a tokenizer.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistEnv:
    """Reads torchrun's environment and initializes the process group once (nccl on CUDA, else gloo).

    Args:
        device: "cpu", "cuda" or "cuda:N"; None picks CUDA where available. Under torchrun each rank
            takes cuda:LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        kwargs = {"device_id": torch.device(device)} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **kwargs)
    return DistEnv(rank, world, local, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


@contextmanager
def main_first(env: DistEnv) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a tokenizer), the others after it, reading its files."""
    if not env.is_main:
        barrier(env)
    yield
    if env.is_main:
        barrier(env)


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sums a few scalars over ranks in one collective (float64 so token counts stay exact)."""
    if not env.distributed:
        return values
    device = env.device if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def rank_micro_batches(
    step_indices: list[int], batch_size: int, grad_accum: int, rank: int
) -> list[list[int]]:
    """This rank's `grad_accum` micro-batches of one optimizer step.

    Args:
        step_indices: the step's global batch, in epoch order (the same list on every rank).
        batch_size: samples per micro-batch per rank.
        grad_accum: micro-batches per rank per step.
        rank: this process's rank.
    Returns: chunk rank*grad_accum + m of the global batch for m = 0..grad_accum-1; chunks are empty
    where the last step of an epoch runs short (the rank then runs a zero-weight step to stay in sync).
    """
    out = []
    for m in range(grad_accum):
        lo = (rank * grad_accum + m) * batch_size
        out.append(step_indices[lo : lo + batch_size])
    return out


def resolve_parallel(requested: str, world_size: int, llm_trains: bool, llm_params: int) -> str:
    """The parallel mode used: none on one process; `auto` picks FSDP for a 7B-class LLM that trains."""
    if requested not in PARALLEL_MODES:
        raise ValueError(f"unknown train.parallel {requested!r}; known: {', '.join(PARALLEL_MODES)}")
    if world_size == 1:
        return "none"  # one process: DDP/FSDP would only add overhead; the same config runs anywhere
    if requested == "none":
        raise ValueError(
            f"train.parallel=none but {world_size} processes were launched; use auto, ddp or fsdp"
        )
    if requested == "auto":
        return "fsdp" if llm_trains and llm_params >= FSDP_MIN_PARAMS else "ddp"
    return requested


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.local_rank] if env.device.startswith("cuda") else None
    return DDP(model, device_ids=ids)


def shard_fsdp(model: nn.Module, layers: list[nn.Module], env: DistEnv, bf16: bool) -> nn.Module:
    """FSDP2 full shard: each decoder layer is one unit, the root (embeddings, head, connector) another.

    The module is sharded in place (its parameters become DTensors), so build the optimizer after this.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.split(":")[0], (env.world_size,))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        if bf16
        else MixedPrecisionPolicy()
    )
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def full_state_dicts(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded (model, optimizer) state dicts of an FSDP model on rank 0, on the CPU (empty on other ranks).

    Collective: every rank must call it. The optimizer's state is keyed by parameter name.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)


def load_full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, osd: dict) -> None:
    """Loads a name-keyed, unsharded optimizer state into an FSDP model's optimizer (every rank passes it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=True))


def grad_sync(model: nn.Module, mode: str, last_micro: bool):
    """Context for one micro-batch's backward: gradients are reduced only after the last one."""
    from contextlib import nullcontext

    if mode == "ddp" and not last_micro:
        return model.no_sync()
    if mode == "fsdp":
        model.set_requires_gradient_sync(last_micro)
    return nullcontext()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank (pickled by torch.distributed); also a barrier."""
    if not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
