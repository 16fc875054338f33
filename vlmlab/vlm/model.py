"""The LLaVA-style VLM: frozen encoder -> connector -> LLM, visual tokens right after BOS."""

from __future__ import annotations

import torch
from torch import nn

from vlmlab.vlm.connectors import build_connector

IGNORE = -100


class VLM(nn.Module):
    """Encoder (frozen, optional when features are cached) + connector + causal LM."""

    def __init__(self, llm: nn.Module, connector: str, vision_dim: int, encoder: nn.Module | None = None):
        super().__init__()
        self.llm = llm
        self.connector = build_connector(connector, vision_dim, llm.config.hidden_size)
        self.encoder = encoder  # frozen: never in the optimizer, always eval
        self.connector_kind = connector

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: connector + LLM (the encoder is frozen and saved elsewhere)."""
        sd = {f"connector.{k}": v for k, v in self.connector.state_dict().items()}
        sd.update({f"llm.{k}": v for k, v in self.llm.state_dict().items()})
        return sd

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise RuntimeError("this VLM has no encoder attached; pass cached vision tokens instead")
        self.encoder.eval()
        return self.encoder(pixels.float())

    def assemble(
        self,
        ids: list[list[int]],
        vision: torch.Tensor,
        labels: list[list[int]] | None = None,
        padding_side: str = "right",
        pad_id: int = 0,
    ):
        """Builds inputs_embeds = [BOS, connector(vision), text...] per row, then pads.

        Args:
            ids: token ids per row, each starting with BOS.
            vision: [B, N, Dv] frozen vision tokens.
            labels: per-row labels aligned with ids (IGNORE where not learned); vision gets IGNORE.
            padding_side: "right" for training, "left" for batched generation.
        Returns: inputs_embeds [B, L, H], attention_mask [B, L], position_ids [B, L], labels [B, L] | None.
        """
        emb_layer = self.llm.get_input_embeddings()
        proj = self.connector(vision.to(emb_layer.weight.dtype))  # [B, N, H]
        B, N, H = proj.shape
        lengths = [len(r) + N for r in ids]
        L = max(lengths)
        # Where every text and vision token goes in the flattened [B * L] layout, built on the host
        # and sent in one copy: one scatter per kind instead of a few small kernels per row.
        starts = [b * L + (0 if padding_side == "right" else L - n) for b, n in enumerate(lengths)]
        text_pos = [
            p for s, r in zip(starts, ids, strict=True) for p in (s, *range(s + N + 1, s + N + len(r)))
        ]
        vis_pos = (torch.tensor(starts)[:, None] + 1 + torch.arange(N)).flatten()
        mask = torch.zeros(B * L, dtype=torch.long)
        mask[text_pos] = 1
        mask[vis_pos] = 1
        mask = mask.view(B, L)
        host = [torch.tensor([t for r in ids for t in r]), torch.tensor(text_pos), vis_pos, mask.flatten()]
        host.append((mask.cumsum(-1) - 1).clamp(min=0).flatten())
        if labels is not None:
            lab = torch.full((B * L,), IGNORE, dtype=torch.long)
            lab[text_pos] = torch.tensor([t for r in labels for t in r])
            host.append(lab)
        sizes = [t.numel() for t in host]
        parts = torch.cat(host).to(proj.device).split(sizes)
        flat, text_idx, vis_idx, mask, position_ids = parts[:5]
        embeds = proj.new_zeros(B * L, H)
        embeds[text_idx] = emb_layer(flat).to(proj.dtype)
        embeds[vis_idx] = proj.reshape(B * N, H)
        lab = parts[5].view(B, L) if labels is not None else None
        return embeds.view(B, L, H), mask.view(B, L), position_ids.view(B, L), lab

    def forward(self, ids, vision, labels=None):
        embeds, mask, pos, lab = self.assemble(ids, vision, labels)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, labels=lab)
