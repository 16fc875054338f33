"""Connectors (projectors) from vision tokens to the LLM's embedding space.

Facts from the official release (prismatic-vlms projectors, FACTS.md):
- linear:          Linear(d -> h)
- gelu-mlp:        Linear(d -> h), GELU, Linear(h -> h)                         (the paper's default)
- fused-gelu-mlp:  Linear(d -> 4d), GELU, Linear(4d -> h), GELU, Linear(h -> h) (the "3-MLP" stabilizer)
- ln-gelu-mlp:     LayerNorm(d) then gelu-mlp (our proposed third stabilizer: tames high-norm tokens)
"""

from __future__ import annotations

from torch import nn


def build_connector(kind: str, vision_dim: int, llm_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(vision_dim, llm_dim)
    if kind == "gelu-mlp":
        return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
    if kind == "fused-gelu-mlp":
        d4 = 4 * vision_dim
        return nn.Sequential(
            nn.Linear(vision_dim, d4),
            nn.GELU(),
            nn.Linear(d4, llm_dim),
            nn.GELU(),
            nn.Linear(llm_dim, llm_dim),
        )
    if kind == "ln-gelu-mlp":
        return nn.Sequential(
            nn.LayerNorm(vision_dim), nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim)
        )
    raise KeyError(f"unknown connector {kind!r}; known: {', '.join(CONNECTORS)}")


CONNECTORS = ("linear", "gelu-mlp", "fused-gelu-mlp", "ln-gelu-mlp")
