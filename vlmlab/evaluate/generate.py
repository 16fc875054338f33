"""Batched greedy generation with left padding and a KV cache.

Rows are left-padded so every row's next token sits in the last column; positions come from the
attention mask, so a row's logits do not depend on how much padding its batch needed (the test
checks batched == batch-1 outputs).
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def _cache_kwarg(llm) -> str:
    """Newer transformers name the KV cache argument `cache`; older ones `past_key_values`."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_generate(
    model,
    ids: list[list[int]],
    vision: torch.Tensor,
    eos_id: int,
    max_new_tokens: int = 32,
) -> list[list[int]]:
    """Generated token ids per row (without the EOS), greedy, stopping at EOS or max_new_tokens."""
    llm = model.llm
    embeds, mask, pos, _ = model.assemble(ids, vision, padding_side="left")
    cache = DynamicCache()
    ck = _cache_kwarg(llm)
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True, **{ck: cache})
    B = len(ids)
    steps = []  # the tokens stay on the device: one host sync per step (`finished.all()`), one copy
    finished = torch.zeros(B, dtype=torch.bool, device=embeds.device)
    next_pos = pos[:, -1:] + 1
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].float().argmax(-1)
        steps.append(nxt)
        finished |= nxt == eos_id
        if len(steps) == max_new_tokens or bool(finished.all()):  # no forward whose token goes unused
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        out = llm(
            input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True, **{ck: cache}
        )
        next_pos = next_pos + 1
    rows = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(B)]
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]  # up to the first EOS


@torch.no_grad()
def answer_probabilities(
    model, ids: list[list[int]], vision: torch.Tensor, answer_ids: list[int]
) -> list[list[float]]:
    """Next-token probabilities of each answer's first token after the prompt (the public harness's
    way of scoring POPE, VSR, TallyQA and AI2D), renormalised over the answers."""
    embeds, mask, pos, _ = model.assemble(ids, vision, padding_side="left")
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1].float()
    probs = logits.softmax(-1)[:, answer_ids]
    return (probs / probs.sum(-1, keepdim=True)).tolist()


def cut_at_stop(text: str, stops: tuple[str, ...] = ("</s>", "USER:", "\n\n")) -> str:
    """Cuts generated text at the first stop string."""
    for s in stops:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text.strip()
