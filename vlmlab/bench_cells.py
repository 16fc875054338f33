"""`python -m vlmlab.bench cells`: what one device does when many sweep cells share it.

A sweep runs many cells per GPU, so what counts is the card's aggregate throughput, not one
process's speed. This benchmark starts `--procs` processes on one device; each builds the preset's VLM
(its tiny LLM and connector; random weights, since speed does not depend on them) and runs one
workload on random data shaped like the preset's, all processes timed over the same `--seconds`
window. One row per workload, with the summed rate:

* `train`: the preset's training step (bf16 autocast where the preset trains in bf16, AdamW, gradient
  clipping, the two host syncs per step of `vlmlab.train`), batch `train.batch_size`, text lengths
  drawn from `--text-tokens` (toy-gpu conversations average about 295) after the vision tokens;
* `train-hf-norm`: the same with Hugging Face's `LlamaRMSNorm` instead of `FusedRMSNorm`;
* `eval-B`: batched greedy generation at batch B, `eval.max_new_tokens` new tokens and no EOS (the
  longest case), prompts of 20-40 tokens, fp32 as `vlmlab.evaluate` runs it.

Numbers are printed and saved by the caller, never asserted.
"""

from __future__ import annotations

import argparse
import queue
import time

import torch

from vlmlab.bench import benchmark

OPTIONS = [
    (("--preset",), {"default": "toy-gpu", "help": "preset whose LLM, connector and batch sizes are used"}),
    (("--procs",), {"type": int, "default": 12, "help": "processes sharing the device"}),
    (("--seconds",), {"type": float, "default": 10.0, "help": "timed window per workload"}),
    (
        ("--modes",),
        {"nargs": "+", "default": ["train-hf-norm", "train", "eval-128", "eval-512"], "help": "workloads"},
    ),
    (("--vision-dim",), {"type": int, "default": 96, "help": "width of the frozen vision tokens"}),
    (("--text-tokens",), {"nargs": 2, "type": int, "default": [200, 316], "help": "text length range"}),
    (("--device",), {"default": None, "help": "cpu | cuda (default: cuda where available)"}),
]


def _model(cfg, vision_dim: int, hf_norm: bool, device: str):
    from transformers import LlamaForCausalLM

    from vlmlab.vlm.llm import build_toy_tokenizer, tiny_llama
    from vlmlab.vlm.model import VLM

    words = ["".join(chr(97 + (i // 26**k) % 26) for k in range(2)) for i in range(100)]
    tok = build_toy_tokenizer([" ".join(words)])
    llm = tiny_llama(cfg.llm, tok)
    if hf_norm:  # the same Llama built by transformers alone: its own RMSNorm modules
        llm = LlamaForCausalLM(llm.config)
    return VLM(llm, cfg.connector, vision_dim).to(device), len(tok)


def _batch(g: torch.Generator, vocab: int, rows: int, text: tuple[int, int]):
    lens = torch.randint(text[0], text[1], (rows,), generator=g).tolist()
    ids = [[1] + torch.randint(4, vocab, (n - 1,), generator=g).tolist() for n in lens]
    labels = [[-100] * (n * 3 // 5) + r[n * 3 // 5 :] for n, r in zip(lens, ids, strict=True)]
    return ids, labels


def _worker(preset: str, mode: str, a: dict, device: str, barrier, results) -> None:
    """One process: build, warm up, wait for the others, then count work done in the window."""
    from vlmlab.config import load_preset
    from vlmlab.evaluate.generate import greedy_generate

    torch.set_num_threads(1)
    cfg = load_preset(preset)
    n_vis = (cfg.img_size // 16) ** 2
    model, vocab = _model(cfg, a["vision_dim"], mode == "train-hf-norm", device)
    g = torch.Generator().manual_seed(0)
    if mode.startswith("train"):
        rows = cfg.train.batch_size
        data = [
            (*_batch(g, vocab, rows, a["text_tokens"]), torch.randn(rows, n_vis, a["vision_dim"]))
            for _ in range(4)
        ]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.train.bf16)

        def step(i: int) -> int:
            ids, labels, vision = data[i % len(data)]
            with amp:
                out = model(ids, vision.to(device), labels)
            out.loss.backward()
            out.loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return rows
    else:
        rows = int(mode.split("-")[1])
        model.eval()
        prompts = [
            [1] + torch.randint(4, vocab, (int(n),), generator=g).tolist()
            for n in torch.randint(20, 40, (rows,), generator=g)
        ]
        vision = torch.randn(rows, n_vis, a["vision_dim"], generator=g).to(device)

        def step(i: int) -> int:
            with torch.no_grad():
                greedy_generate(model, prompts, vision, eos_id=-1, max_new_tokens=cfg.eval.max_new_tokens)
            return rows

    for i in range(3):  # warm-up: allocator, kernels, autotuning
        step(i)
    _sync(device)
    barrier.wait(timeout=600)  # a process that died before this breaks the barrier for the others
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a["seconds"]:
        done += step(done)
    _sync(device)
    results.put(done / (time.perf_counter() - t0))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@benchmark("cells", "aggregate throughput of many sweep cells sharing one device", OPTIONS)
def bench_cells(args: argparse.Namespace) -> list[dict]:
    import multiprocessing as mp

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = mp.get_context("spawn")
    a = {"vision_dim": args.vision_dim, "text_tokens": tuple(args.text_tokens), "seconds": args.seconds}
    rows = []
    for mode in args.modes:
        if not (mode in ("train", "train-hf-norm") or (mode.startswith("eval-") and mode[5:].isdigit())):
            raise ValueError(f"unknown workload {mode!r}: train, train-hf-norm or eval-<batch>")
        barrier, results = ctx.Barrier(args.procs), ctx.Queue()
        procs = [
            ctx.Process(target=_worker, args=(args.preset, mode, a, device, barrier, results))
            for _ in range(args.procs)
        ]
        for p in procs:
            p.start()
        rates: list[float] = []
        while len(rates) < len(procs):
            try:
                rates.append(results.get(timeout=5))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):  # one died: its traceback is above
                    for p in procs:
                        p.terminate()
                    raise RuntimeError(f"bench cells: a {mode} process failed; see its error above") from None
        for p in procs:
            p.join()
        unit = "samples_per_s" if mode.startswith("train") else "items_per_s"
        rows.append(
            {
                "workload": mode,
                "device": device,
                "procs": args.procs,
                unit: round(sum(rates), 1),
                "per_proc": round(sum(rates) / len(rates), 1),
            }
        )
    return rows
