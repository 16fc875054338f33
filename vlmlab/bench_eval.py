"""`python -m vlmlab.bench eval`: batched greedy generation vs one item at a time.

Uses a trained run when `--run` is given, else a random-init toy LLM of the preset (speed does not
depend on the weights, but outputs are also compared: batched must equal batch-1, item by item).
"""

from __future__ import annotations

import argparse
import time

import torch

from vlmlab.bench import benchmark
from vlmlab.config import load_preset
from vlmlab.data.datasets import prompt_ids
from vlmlab.evaluate.generate import greedy_generate
from vlmlab.vlm.llm import build_toy_tokenizer, load_llm
from vlmlab.vlm.model import VLM
from vlmlab.vlm.prompts import get_template

QUESTIONS = [
    "What color is the circle?\nAnswer the question using a single word or phrase.",
    "How many squares are there?\nAnswer the question using a single word or phrase.",
    'Please provide the bounding box coordinate of the region this sentence describes: "the red ring"',
    "Is there a blue triangle?\nAnswer the question using a single word or phrase.",
]


def _model(args, device):
    cfg = load_preset(args.preset)
    if args.run:
        from vlmlab.evaluate.harness import load_run_model

        _, model, tok, enc, _, _ = load_run_model(args.run, device)
        return model, tok, enc.spec.tokens, enc.spec.dim, cfg
    template = get_template(cfg.llm.template)
    tok = build_toy_tokenizer(
        [template.system, "USER: ASSISTANT:", "[0.12, 0.34]", *QUESTIONS, "red blue yes no"]
    )
    torch.manual_seed(0)
    llm, tok = load_llm(cfg.llm, tok)
    dim, tokens = 64, (cfg.img_size // 16) ** 2
    return VLM(llm, cfg.connector, dim).to(device).eval(), tok, tokens, dim, cfg


@benchmark(
    "eval",
    "items/s of batched greedy generation vs batch 1 (identical outputs required)",
    [
        (("--preset",), {"default": "toy-cpu"}),
        (("--run",), {"default": None, "help": "a trained run directory (default: random toy LLM)"}),
        (("--items",), {"type": int, "default": 64}),
        (("--batch",), {"type": int, "default": 32}),
        (("--max-new-tokens",), {"type": int, "default": 32}),
    ],
)
def bench_eval(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, n_tokens, dim, cfg = _model(args, device)
    template = get_template(cfg.llm.template)
    ids = [prompt_ids(QUESTIONS[i % len(QUESTIONS)], template, tok) for i in range(args.items)]
    vision = torch.randn(args.items, n_tokens, dim, generator=torch.Generator().manual_seed(0)).to(device)

    def run(bs):
        out = []
        t0 = time.perf_counter()
        for i in range(0, args.items, bs):
            out += greedy_generate(
                model, ids[i : i + bs], vision[i : i + bs], tok.eos_token_id, args.max_new_tokens
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    run(args.batch)  # warm-up
    single, t1 = run(1)
    batched, tb = run(args.batch)
    same = sum(a == b for a, b in zip(single, batched, strict=True))
    return [
        {"batch": 1, "items": args.items, "seconds": t1, "items_per_s": args.items / t1, "speedup": 1.0},
        {
            "batch": args.batch,
            "items": args.items,
            "seconds": tb,
            "items_per_s": args.items / tb,
            "speedup": t1 / tb,
            "identical_outputs": f"{same}/{args.items}",
        },
    ]
