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
        device = proj.device
        flat = torch.tensor([t for r in ids for t in r], device=device)
        text_emb = emb_layer(flat).split([len(r) for r in ids])
        embeds = proj.new_zeros(B, L, H)
        mask = torch.zeros(B, L, dtype=torch.long, device=device)
        lab = torch.full((B, L), IGNORE, dtype=torch.long, device=device) if labels is not None else None
        for b, te in enumerate(text_emb):
            n = lengths[b]
            start = 0 if padding_side == "right" else L - n
            seq = torch.cat([te[:1], proj[b], te[1:]], dim=0)
            embeds[b, start : start + n] = seq
            mask[b, start : start + n] = 1
            if lab is not None:
                lr = torch.tensor(labels[b], device=device)
                lab[b, start : start + 1] = lr[:1]
                lab[b, start + 1 + N : start + n] = lr[1:]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return embeds, mask, position_ids, lab

    def forward(self, ids, vision, labels=None):
        embeds, mask, pos, lab = self.assemble(ids, vision, labels)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, labels=lab)
