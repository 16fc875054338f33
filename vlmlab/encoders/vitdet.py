"""ViTDet: the plain, windowed ViT backbone of detectron2's ViTDet Mask R-CNN.

Paper: Li, Mao, Girshick, He, "Exploring Plain Vision Transformer Backbones for Object Detection"
(ECCV 2022). The architecture facts (key names, shapes, window / global blocks, decomposed relative
positions, abs-pos resize, window padding) come from detectron2 `modeling/backbone/vit.py` (class
`ViT`) and `modeling/backbone/utils.py` at commit 02b5c4e, and from the configs
`projects/ViTDet/configs/COCO/mask_rcnn_vitdet_{b_100ep,l_100ep,h_75ep}.py` with
`configs/common/models/mask_rcnn_vitdet.py`. This is our own implementation; tests check it key for
key and numerically against data made with the official code (../shared/oracles/vitdet).

Facts worth knowing before reading the code:
* Tokens stay in (B, H, W, C) layout through the blocks; the output `last_feat` is NCHW, stride 16.
* Windowed blocks pad the (normed) token grid with zeros at the bottom/right to a multiple of the
  window and crop back afterwards; the padded tokens take part in attention (no mask), as upstream.
* Global blocks keep a relative-position table sized for the config's `img_size` grid (127 rows at
  1024 px); other input sizes resize it by 1-D linear interpolation (`get_rel_pos`).
* `pos_embed` keeps the MAE pretraining grid (14x14 + a cls slot); it is resized to the token grid by
  bicubic interpolation (align_corners=False) and the cls slot is dropped.
* Checkpoints: the Mask R-CNN state dict holds the ViT under 'backbone.net.' (SimpleFeaturePyramid's
  `net`); model-zoo files are .pkl pickles of numpy arrays, read without executing code.

Encoders: `vitdet-b`, `vitdet-l`, `vitdet-h` (1024x1024 input, tap `last_feat`: 64x64 = 4096 tokens at
stride 16; `tap="blocks.{i}"` picks an earlier block) and `toy-vitdet` (d64, 4 blocks, windows of 2
with the last block global, 64 px; wrapped with a classification head for toy pretraining, backbone
under `net.`). The registry's `img_size` sets only the input size: the model keeps its config, so
checkpoints keep their shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from vlmlab.encoders.base import (
    MMDET_MEAN,
    MMDET_STD,
    TOY_NUM_CLASSES,
    BackboneEncoder,
    EncoderSpec,
    config_repr,
    register_encoder,
)
from vlmlab.encoders.checkpoints import strip_prefix

__all__ = ["ViT", "ToyViTDetClassifier", "ViTDetEncoder", "build_vitdet", "checkpoint_filter"]

# Where the ViT sits inside a detectron2 GeneralizedRCNN state dict (model.backbone.net).
D2_PREFIX = "backbone.net."


# ----------------------------------------------------------------------------------------------
# position helpers (detectron2 modeling/backbone/utils.py semantics)


def get_abs_pos(pos_embed: torch.Tensor, has_cls_token: bool, hw: tuple[int, int]) -> torch.Tensor:
    """Absolute position embedding for an (h, w) token grid, as (1, h, w, C).

    Args:
        pos_embed: (1, [1 +] S*S, C) table of the square pretraining grid.
        has_cls_token: whether slot 0 is a cls position (dropped here).
        hw: target token grid.
    """
    h, w = hw
    if has_cls_token:
        pos_embed = pos_embed[:, 1:]
    size = math.isqrt(pos_embed.shape[1])
    if size * size != pos_embed.shape[1]:
        raise ValueError(f"pos_embed holds {pos_embed.shape[1]} positions, not a square grid")
    grid = pos_embed.reshape(1, size, size, -1)
    if (size, size) == (h, w):
        return grid
    grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1)


def get_rel_pos(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings R[i, j] = table[i - j + size - 1] for self-attention over `size`.

    A table trained for another size is first resized to 2*size-1 rows by 1-D linear interpolation
    (align_corners=False), as upstream does. Queries and keys always share the grid here, so the
    upstream scaling for q_size != k_size is not needed.

    Args:
        size: side of the query (= key) grid along one axis.
        rel_pos: (L, head_dim) table.
    Returns:
        (size, size, head_dim)
    """
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t()[None], size=length, mode="linear")[0].t()
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + size - 1]


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """Additive attention bias of MViTv2's decomposed relative positions.

    bias[b, (i, j), (k, l)] = <q[b, i, j], Rh[i, k]> + <q[b, i, j], Rw[j, l]>, with the *unscaled* q.

    Args:
        q: (B*heads, h*w, head_dim) queries.
        rel_pos_h / rel_pos_w: (L, head_dim) tables.
        hw: (h, w) grid of the queries and keys.
    Returns:
        (B*heads, h*w, h*w)
    """
    h, w = hw
    rh, rw = get_rel_pos(h, rel_pos_h), get_rel_pos(w, rel_pos_w)
    r_q = q.reshape(q.shape[0], h, w, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return bias.reshape(q.shape[0], h * w, h * w)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B*nW, window, window, C), zero-padding H and W up to multiples of `window`."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of `window_partition`: (B*nW, window, window, C) -> (B, H, W, C), padding cropped."""
    hp, wp = padded_hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hp, wp, -1)
    return x[:, : hw[0], : hw[1]].contiguous()


# ----------------------------------------------------------------------------------------------
# building blocks


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; returns tokens as (B, H, W, C)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with optional decomposed relative positions.

    Args:
        input_size: grid the relative-position tables are sized for (the window, or the full
            `img_size // patch_size` grid in global blocks).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("use_rel_pos needs input_size (the grid the tables are sized for)")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                trunc_normal_(self.rel_pos_h, std=0.02)
                trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        n = h * w
        # (3, B, heads, N, head_dim)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(
                q.reshape(b * self.num_heads, n, -1), self.rel_pos_h, self.rel_pos_w, (h, w)
            )
            bias = bias.view(b, self.num_heads, n, n)
        # Same math as upstream's softmax((q * scale) @ k^T + bias) @ v; SDPA picks a fused kernel
        # where one exists (the bias is a float mask, so the memory-efficient GPU kernel applies).
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        x = x.permute(0, 2, 1, 3).reshape(b, h, w, c)
        return self.proj(x)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (detectron2 `layers.LayerNorm`, norm "LN")."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ResBottleneckBlock(nn.Module):
    """Conv bottleneck (1x1, 3x3, 1x1; LN; zero-init last norm) after blocks in `residual_block_indexes`.

    Unused by the released ViTDet configs (residual_block_indexes=[]); kept so the constructor takes
    every official argument. No oracle covers it.
    """

    def __init__(self, dim: int, bottleneck: int, act_layer: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, bottleneck, 1, bias=False)
        self.norm1 = LayerNorm2d(bottleneck)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(bottleneck, bottleneck, 3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(bottleneck)
        self.act2 = act_layer()
        self.conv3 = nn.Conv2d(bottleneck, dim, 1, bias=False)
        self.norm3 = LayerNorm2d(dim)
        for conv in (self.conv1, self.conv2, self.conv3):  # detectron2 c2_msra_fill
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        # zero-init the last norm so the block starts as the identity
        nn.init.zeros_(self.norm3.weight)
        nn.init.zeros_(self.norm3.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.act2(self.norm2(self.conv2(out)))
        return x + self.norm3(self.conv3(out))


class Block(nn.Module):
    """Pre-norm transformer block on a (B, H, W, C) grid; windowed when `window_size` > 0."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        use_residual_block: bool = False,
        input_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.window_size = window_size
        self.residual = ResBottleneckBlock(dim, dim // 2, act_layer) if use_residual_block else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            x, padded_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded_hw, hw)
        else:
            x = self.attn(x)
        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.residual is not None:
            x = self.residual(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x


# ----------------------------------------------------------------------------------------------
# the backbone


class ViT(nn.Module):
    """detectron2's ViTDet backbone (`modeling/backbone/vit.py::ViT`): same arguments, keys and math.

    `forward(x)` returns `{out_feature: (B, C, H/p, W/p)}` like upstream. Defaults are the upstream
    class defaults; `build_vitdet` applies the ViTDet config's values.

    Args (the upstream ones):
        img_size: input size the global blocks' relative-position tables are sized for.
        patch_size / in_chans / embed_dim / depth / num_heads / mlp_ratio / qkv_bias: the usual.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        norm_layer / act_layer: callables building the norm (given dim) and the MLP activation.
        use_abs_pos: add `pos_embed` (resized to the token grid).
        use_rel_pos / rel_pos_zero_init: decomposed relative positions in every block.
        window_size / window_block_indexes: blocks listed use window attention, the others global.
        residual_block_indexes: blocks followed by a conv bottleneck.
        use_act_checkpoint: recompute block activations in backward (torch.utils.checkpoint).
        pretrain_img_size / pretrain_use_cls_token: shape of `pos_embed` (the MAE grid + cls slot).
        out_feature: name of the output map.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        window_block_indexes: Sequence[int] = (),
        residual_block_indexes: Sequence[int] = (),
        use_act_checkpoint: bool = False,
        pretrain_img_size: int = 224,
        pretrain_use_cls_token: bool = True,
        out_feature: str = "last_feat",
    ):
        super().__init__()
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.out_feature = out_feature
        self.use_act_checkpoint = use_act_checkpoint
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        if use_abs_pos:
            num_positions = (pretrain_img_size // patch_size) ** 2 + int(pretrain_use_cls_token)
            self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim))
        else:
            self.pos_embed = None

        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth decay
        grid = (img_size // patch_size, img_size // patch_size)
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                rel_pos_zero_init=rel_pos_zero_init,
                window_size=window_size if i in window_block_indexes else 0,
                use_residual_block=i in residual_block_indexes,
                input_size=grid,
            )
            for i in range(depth)
        )
        self.feature_info = [
            {"name": f"blocks.{i}", "stride": patch_size, "channels": embed_dim} for i in range(depth)
        ]

        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.use_act_checkpoint = enable

    def _run_block(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        if self.use_act_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_intermediates(
        self, x: torch.Tensor, names: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Named NCHW maps: 'patch_embed' (before the abs-pos add), 'blocks.{i}', and `out_feature`.

        Runs only as far as the requested names need; `names=None` returns all of them.
        """
        depth = len(self.blocks)
        alias = {self.out_feature: f"blocks.{depth - 1}"}
        known = ["patch_embed", *(f"blocks.{i}" for i in range(depth)), self.out_feature]
        names = known if names is None else list(names)
        if unknown := [n for n in names if n not in known]:
            raise KeyError(
                f"unknown ViTDet taps {unknown}; known: patch_embed, blocks.0..{depth - 1}, "
                f"{self.out_feature}"
            )
        wanted = {alias.get(n, n) for n in names}
        stop = max((int(n.split(".")[1]) for n in wanted if n.startswith("blocks.")), default=-1)

        maps: dict[str, torch.Tensor] = {}
        x = self.patch_embed(x)
        maps["patch_embed"] = x.permute(0, 3, 1, 2)
        if self.pos_embed is not None:
            x = x + get_abs_pos(self.pos_embed, self.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
        for i, blk in enumerate(self.blocks[: stop + 1]):
            x = self._run_block(blk, x)
            maps[f"blocks.{i}"] = x.permute(0, 3, 1, 2)
        return {n: maps[alias.get(n, n)] for n in names}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + get_abs_pos(self.pos_embed, self.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
        for blk in self.blocks:
            x = self._run_block(blk, x)
        return {self.out_feature: x.permute(0, 3, 1, 2)}


class ToyViTDetClassifier(nn.Module):
    """A ViTDet backbone under `net.` (official keys below it) plus a pooled classification head.

    Toy pretraining calls `model(pixels) -> logits`; the head (`head.norm`, `head.fc`: mean-pool of
    `last_feat`, LayerNorm, Linear) exists only for that, the encoder never uses it.
    """

    def __init__(self, num_classes: int = TOY_NUM_CLASSES, **vit_kwargs):
        super().__init__()
        self.net = ViT(**vit_kwargs)
        dim = self.net.embed_dim
        self.head = nn.Sequential()
        self.head.add_module("norm", nn.LayerNorm(dim, eps=1e-6))
        self.head.add_module("fc", nn.Linear(dim, num_classes))
        trunc_normal_(self.head.fc.weight, std=0.02)
        nn.init.zeros_(self.head.fc.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feat = self.net(pixels)[self.net.out_feature]
        return self.head(feat.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_filter(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detectron2 checkpoint -> ViT keys: keeps 'backbone.net.*' without the prefix (the FPN and
    heads are dropped); a plain ViT state dict passes through unchanged."""
    if any(k.startswith(D2_PREFIX) for k in sd):
        return strip_prefix(sd, D2_PREFIX)
    return dict(sd)


# ----------------------------------------------------------------------------------------------
# configs: the ViTDet Mask R-CNN configs (common model + per-size overrides)

# configs/common/models/mask_rcnn_vitdet.py (the ViT-B values) and the ViT class defaults it keeps
_BASE = dict(
    img_size=1024,
    patch_size=16,
    in_chans=3,
    embed_dim=768,
    depth=12,
    num_heads=12,
    mlp_ratio=4.0,
    qkv_bias=True,
    drop_path_rate=0.1,
    norm_layer=partial(nn.LayerNorm, eps=1e-6),
    act_layer=nn.GELU,
    use_abs_pos=True,
    use_rel_pos=True,
    rel_pos_zero_init=True,
    window_size=14,
    window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10],
    residual_block_indexes=[],
    use_act_checkpoint=False,
    pretrain_img_size=224,
    pretrain_use_cls_token=True,
    out_feature="last_feat",
)


def _windowed(depth: int, global_blocks: Sequence[int]) -> list[int]:
    return [i for i in range(depth) if i not in global_blocks]


VITDET_CONFIGS: dict[str, dict] = {
    # mask_rcnn_vitdet_b_100ep.py
    "b": dict(_BASE),
    # mask_rcnn_vitdet_l_100ep.py
    "l": dict(
        _BASE,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        drop_path_rate=0.4,
        window_block_indexes=_windowed(24, (5, 11, 17, 23)),
    ),
    # mask_rcnn_vitdet_h_75ep.py (COCO has no h_100ep; LVIS h_100ep differs only in drop_path 0.4)
    "h": dict(
        _BASE,
        embed_dim=1280,
        depth=32,
        num_heads=16,
        drop_path_rate=0.5,
        window_block_indexes=_windowed(32, (7, 15, 23, 31)),
    ),
    # toy: patch 16, d64, depth 4, window 2 (tiles the 2/4/14-token grids of 32/64/224 px), last block
    # global like ViTDet's last block; MAE-style pos_embed for a 64 px pretraining grid (4x4 + cls)
    "toy": dict(
        _BASE,
        img_size=64,
        embed_dim=64,
        depth=4,
        num_heads=4,
        drop_path_rate=0.0,
        window_size=2,
        window_block_indexes=[0, 1, 2],
        pretrain_img_size=64,
    ),
    # toy-b: the same layout wider and deeper (d96, depth 6, 4 heads: toy-vit-b's size), last block global
    "toy-b": dict(
        _BASE,
        img_size=64,
        embed_dim=96,
        depth=6,
        num_heads=4,
        drop_path_rate=0.0,
        window_size=2,
        window_block_indexes=[0, 1, 2, 3, 4],
        pretrain_img_size=64,
    ),
}


def build_vitdet(device: torch.device | str | None = None, dtype: torch.dtype | None = None, **kwargs) -> ViT:
    """The ViTDet backbone: the upstream `ViT` kwargs, defaulting to the ViTDet-B Mask R-CNN config.

    Args:
        device: where to build (e.g. "meta" for shapes only, without allocating or initialising).
        dtype: parameter dtype after construction.
        **kwargs: any `ViT` argument (the official constructor's names).
    """
    cfg = {**_BASE, **kwargs}
    with torch.device(device) if device is not None else nullcontext():
        model = ViT(**cfg)
    return model.to(dtype) if dtype is not None else model


# ----------------------------------------------------------------------------------------------
# the encoder


class ViTDetEncoder(BackboneEncoder):
    """A ViTDet backbone tapped at `last_feat` (or `blocks.{i}`); tokens row-major on the stride-16 grid."""

    official_filter = staticmethod(checkpoint_filter)

    def forward_map(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_intermediates(pixels, [self.spec.tap])[self.spec.tap]

    def intermediates(self, pixels: torch.Tensor, taps: list[str] | None = None) -> dict[str, torch.Tensor]:
        """'patch_embed', 'blocks.{i}' and 'last_feat' maps, [B, C, h, w] (all of them when taps is None)."""
        return self.backbone.forward_intermediates(pixels, taps)


def _create_vitdet(
    variant: str,
    name: str,
    tap: str | None,
    img_size: int | None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kw,
) -> ViTDetEncoder:
    cfg = {**VITDET_CONFIGS[variant], **kw}
    toy = variant.startswith("toy")
    with torch.device(device) if device is not None else nullcontext():
        model: nn.Module = ToyViTDetClassifier(**cfg) if toy else ViT(**cfg)
    model = model.to(dtype) if dtype is not None else model
    vit = model.net if toy else model
    tap = tap or vit.out_feature
    known = {vit.out_feature, *(f"blocks.{i}" for i in range(len(vit.blocks)))}
    if tap not in known:
        raise ValueError(
            f"{name}: unknown tap {tap!r}; choose {vit.out_feature!r} or blocks.0..{len(vit.blocks) - 1}"
        )
    # img_size changes only what the encoder is fed: the model keeps its config (checkpoint shapes);
    # other sizes are handled by resizing pos_embed and the global blocks' rel-pos tables.
    size = img_size or cfg["img_size"]
    if size % cfg["patch_size"]:
        raise ValueError(f"{name}: img_size {size} must be a multiple of the patch size {cfg['patch_size']}")
    depth, dim = cfg["depth"], cfg["embed_dim"]
    global_blocks = [i for i in range(depth) if i not in cfg["window_block_indexes"]]
    spec = EncoderSpec(
        name=name,
        family="vit",
        variant=(
            f"ViTDet {variant if toy else variant.upper()} (d{dim}, depth {depth}, "
            f"window {cfg['window_size']}, global blocks {global_blocks})"
        ),
        input_size=(size, size),
        tap=tap,
        stride=cfg["patch_size"],
        dim=dim,
        policy="letterbox-corner",
        mean=MMDET_MEAN,
        std=MMDET_STD,
        source="detectron2 modeling/backbone/vit.py (ViT) @02b5c4e; projects/ViTDet COCO Mask R-CNN configs",
    )
    return ViTDetEncoder(model, spec, config_repr(cfg), backbone_prefix="net." if toy else "")


@register_encoder("vitdet-b")
def vitdet_b(tap: str | None = None, img_size: int | None = None, **kw) -> ViTDetEncoder:
    return _create_vitdet("b", "vitdet-b", tap, img_size, **kw)


@register_encoder("vitdet-l")
def vitdet_l(tap: str | None = None, img_size: int | None = None, **kw) -> ViTDetEncoder:
    return _create_vitdet("l", "vitdet-l", tap, img_size, **kw)


@register_encoder("vitdet-h")
def vitdet_h(tap: str | None = None, img_size: int | None = None, **kw) -> ViTDetEncoder:
    return _create_vitdet("h", "vitdet-h", tap, img_size, **kw)


@register_encoder("toy-vitdet")
def toy_vitdet(tap: str | None = None, img_size: int | None = None, **kw) -> ViTDetEncoder:
    return _create_vitdet("toy", "toy-vitdet", tap, img_size, **kw)


@register_encoder("toy-vitdet-b")
def toy_vitdet_b(tap: str | None = None, img_size: int | None = None, **kw) -> ViTDetEncoder:
    return _create_vitdet("toy-b", "toy-vitdet-b", tap, img_size, **kw)
