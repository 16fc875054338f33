"""ViT-Adapter: a plain ViT with a convolutional spatial prior and deformable-attention adapters.

Paper: Chen, Duan, Wang, He, Lu, Dai, Qiao, "Vision Transformer Adapter for Dense Predictions"
(ICLR 2023). Architecture facts (key names, shapes, forward order, init) come from czczup/ViT-Adapter
at commit fd64a51: `segmentation/mmseg_custom/models/backbones/vit_adapter.py` (ViTAdapter),
`.../adapter_modules.py`, `.../base/vit.py` (TIMMVisionTransformer) and
`detection/ops/modules/ms_deform_attn.py` (MSDeformAttn); the config is
`segmentation/configs/ade20k/upernet_deit_adapter_base_512_160k_ade20k.py`. This is our own
implementation; tests check it key for key and numerically against data made with the official code
(../shared/oracles/vit_adapter).

How it runs: a spatial prior module (SPM, a small conv stem) makes maps c1..c4 at strides 4/8/16/32;
c2..c4 are flattened into one token sequence `c`. The ViT tokens x (stride 16) go through the blocks in
four groups; before each group an *injector* (deformable cross-attention, x queries c) adds spatial
detail to x, after it an *extractor* (c queries x, then a conv FFN) refreshes c. The outputs f1..f4
are c1 (+ upsampled c2) and c2..c4 unflattened, each plus the resized ViT output of the matching
group, then a BatchNorm each.

Tokens of `vit-adapter-deit-b`: the paper taps feature level index 3 (f4, stride 32), so a 512x512
input gives 16x16 = 256 tokens. The released manifest says 1024 tokens, which is the 32x32 grid of
stride 16 at 512 px (f3, or the plain ViT tokens): manifest and code disagree, and we follow the
code's level index 3. `tap="level2"` gives the 1024-token stride-16 map; taps "level0".."level3"
choose f1..f4.

Encoders: `vit-adapter-deit-b` (512x512 input, tap level3) and `toy-vit-adapter` (d64, 4 blocks, one
per interaction, 64 px; wrapped with a classification head for toy pretraining, backbone under `net.`).

Deviation kept on purpose: upstream builds `nn.SyncBatchNorm`; we build `nn.BatchNorm2d`, which has
the same parameters, buffers and eval-mode math and also trains in a single CPU process (convert with
`nn.SyncBatchNorm.convert_sync_batchnorm` for multi-GPU training).
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
from vlmlab.ops.ms_deform_attn import ms_deform_attn, reference_points

__all__ = [
    "MSDeformAttn",
    "ViTAdapter",
    "ToyViTAdapterClassifier",
    "ViTAdapterEncoder",
    "build_vit_adapter",
    "checkpoint_filter",
]

# The backbone inside an mmseg EncoderDecoder state dict
MMSEG_PREFIX = "backbone."
LEVEL_STRIDES = (4, 8, 16, 32)
# TIMMVisionTransformer's default norm, also used by the adapter modules
LayerNormEps6 = partial(nn.LayerNorm, eps=1e-6)

Shapes = list[tuple[int, int]]


def _checkpointed(enabled: bool, fn: Callable, *args):
    """fn(*args), recomputed in backward when `enabled` and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ----------------------------------------------------------------------------------------------
# the plain ViT part (base/vit.py: TIMMVisionTransformer pieces)


class PatchEmbed(nn.Module):
    """Patch projection; returns (tokens (B, N, C), H, W)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), h, w


class Attention(nn.Module):
    """Global multi-head self-attention over (B, N, C) tokens."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        )
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class WindowedAttention(Attention):
    """Self-attention inside non-overlapping windows (blocks with `window_attn` True).

    Upstream pads the *projected* q/k/v grid with zeros to a multiple of the window (so padded keys
    are zero vectors, unlike ViTDet's padding before the projection) and crops after attention.
    Unused by the released DeiT-B ADE20K config and not covered by an oracle.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window_size: int = 14,
    ):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.window_size = window_size

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        ws = self.window_size
        hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
        qkv = self.qkv(x).transpose(1, 2).reshape(b, 3 * c, h, w)
        qkv = F.pad(qkv, (0, wp - w, 0, hp - h))
        # (B, 3C, Hp, Wp) -> (3, B*nW, heads, ws*ws, head_dim)
        qkv = qkv.view(b, 3, self.num_heads, c // self.num_heads, hp // ws, ws, wp // ws, ws)
        qkv = qkv.permute(1, 0, 4, 6, 2, 5, 7, 3).reshape(3, -1, self.num_heads, ws * ws, c // self.num_heads)
        q, k, v = qkv.unbind(0)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        # (B*nW, heads, ws*ws, head_dim) -> (B, Hp, Wp, C), cropped to (B, N, C)
        x = x.view(b, hp // ws, wp // ws, self.num_heads, ws, ws, -1).permute(0, 1, 4, 2, 5, 3, 6)
        x = x.reshape(b, hp, wp, c)[:, :h, :w].reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm ViT block with optional per-channel layer scale (`gamma1`, `gamma2`)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        windowed: bool = False,
        window_size: int = 14,
        layer_scale: bool = False,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        if windowed:
            self.attn: Attention = WindowedAttention(dim, num_heads, qkv_bias, attn_drop, drop, window_size)
        else:
            self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        if layer_scale:
            self.gamma1 = nn.Parameter(torch.ones(dim))
            self.gamma2 = nn.Parameter(torch.ones(dim))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        a = self.attn(self.norm1(x), h, w)
        x = x + self.drop_path(a if self.gamma1 is None else self.gamma1 * a)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(m if self.gamma2 is None else self.gamma2 * m)


# ----------------------------------------------------------------------------------------------
# adapter modules (adapter_modules.py, ms_deform_attn.py)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (keys and parameterisation of the official module).

    Args:
        d_model: query / input channels.
        n_levels / n_heads / n_points: levels of the input, heads, sampling points per head and level.
        ratio: value channels = d_model * ratio (ViT-Adapter's `deform_ratio`).
    """

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, ratio: float = 1.0
    ):
        super().__init__()
        if int(d_model * ratio) % n_heads:
            raise ValueError(f"value dim {int(d_model * ratio)} must be divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points, self.ratio = (
            d_model,
            n_levels,
            n_heads,
            n_points,
            ratio,
        )
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, int(d_model * ratio))
        self.output_proj = nn.Linear(int(d_model * ratio), d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: offsets start on a ring of directions (one per head), point i at radius i+1."""
        nn.init.zeros_(self.sampling_offsets.weight)
        dev = self.sampling_offsets.bias.device
        thetas = torch.arange(self.n_heads, dtype=torch.float32, device=dev) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]  # onto the unit square's border
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32, device=dev).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self, query: torch.Tensor, ref_points: torch.Tensor, feat: torch.Tensor, shapes: Shapes
    ) -> torch.Tensor:
        """query (B, Q, C) attends to feat (B, S, C), the flattened levels of `shapes`.

        Args:
            ref_points: (1 or B, Q, 1 or L, 2) normalised (x, y) reference point of each query.
        """
        b, q, _ = query.shape
        value = self.value_proj(feat).view(b, feat.shape[1], self.n_heads, -1)
        offsets = self.sampling_offsets(query).view(b, q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(b, q, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(b, q, self.n_heads, self.n_levels, self.n_points)
        # offsets are in cells of each level: normalise by (W, H)
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
        locations = ref_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn(value, shapes, locations, weights))


class DWConv(nn.Module):
    """Depth-wise 3x3 conv applied to each of the three flattened maps (2H x 2W, H x W, H/2 x W/2) in c."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        shapes = [(2 * h, 2 * w), (h, w), (h // 2, w // 2)]
        parts = x.split([hh * ww for hh, ww in shapes], dim=1)
        out = [
            self.dwconv(p.transpose(1, 2).reshape(b, c, hh, ww)).flatten(2).transpose(1, 2)
            for p, (hh, ww) in zip(parts, shapes, strict=True)
        ]
        return torch.cat(out, dim=1)


class ConvFFN(nn.Module):
    """fc1 -> depth-wise conv -> GELU -> fc2, over the c tokens."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
    ):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), h, w)))
        return self.drop(self.fc2(x))


class Injector(nn.Module):
    """ViT tokens query the SPM tokens (3 levels); the result is added with a learned scale `gamma`."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        n_points: int = 4,
        n_levels: int = 1,
        deform_ratio: float = 1.0,
        norm_layer: Callable[[int], nn.Module] = LayerNormEps6,
        init_values: float = 0.0,
    ):
        super().__init__()
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim)
        self.attn = MSDeformAttn(
            dim, n_levels=n_levels, n_heads=num_heads, n_points=n_points, ratio=deform_ratio
        )
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(
        self, query: torch.Tensor, feat: torch.Tensor, ref_points: torch.Tensor, shapes: Shapes
    ) -> torch.Tensor:
        attn = self.attn(self.query_norm(query), ref_points, self.feat_norm(feat), shapes)
        return query + self.gamma * attn


class Extractor(nn.Module):
    """SPM tokens query the ViT tokens (1 level), then a residual conv FFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        n_points: int = 4,
        n_levels: int = 1,
        deform_ratio: float = 1.0,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = LayerNormEps6,
    ):
        super().__init__()
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim)
        self.attn = MSDeformAttn(
            dim, n_levels=n_levels, n_heads=num_heads, n_points=n_points, ratio=deform_ratio
        )
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop=drop)
            self.ffn_norm = norm_layer(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self,
        query: torch.Tensor,
        feat: torch.Tensor,
        ref_points: torch.Tensor,
        shapes: Shapes,
        h: int,
        w: int,
    ) -> torch.Tensor:
        query = query + self.attn(self.query_norm(query), ref_points, self.feat_norm(feat), shapes)
        if self.with_cffn:
            query = query + self.drop_path(self.ffn(self.ffn_norm(query), h, w))
        return query


class InteractionBlock(nn.Module):
    """injector -> a group of ViT blocks -> extractor (-> two extra extractors in the last group)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        n_points: int = 4,
        norm_layer: Callable[[int], nn.Module] = LayerNormEps6,
        drop: float = 0.0,
        drop_path: float = 0.0,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        init_values: float = 0.0,
        deform_ratio: float = 1.0,
        extra_extractor: bool = False,
        with_cp: bool = False,
    ):
        super().__init__()
        self.with_cp = with_cp
        self.injector = Injector(
            dim,
            num_heads,
            n_points,
            n_levels=3,
            deform_ratio=deform_ratio,
            norm_layer=norm_layer,
            init_values=init_values,
        )
        self.extractor = Extractor(
            dim,
            num_heads,
            n_points,
            n_levels=1,
            deform_ratio=deform_ratio,
            with_cffn=with_cffn,
            cffn_ratio=cffn_ratio,
            drop=drop,
            drop_path=drop_path,
            norm_layer=norm_layer,
        )
        if extra_extractor:
            # upstream builds these without drop / drop_path
            self.extra_extractors = nn.Sequential(
                *[
                    Extractor(
                        dim,
                        num_heads,
                        n_points,
                        deform_ratio=deform_ratio,
                        with_cffn=with_cffn,
                        cffn_ratio=cffn_ratio,
                        norm_layer=norm_layer,
                    )
                    for _ in range(2)
                ]
            )
        else:
            self.extra_extractors = None

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        blocks: Sequence[Block],
        inject: tuple[torch.Tensor, Shapes],
        extract: tuple[torch.Tensor, Shapes],
        h: int,
        w: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = _checkpointed(self.with_cp, partial(self.injector, ref_points=inject[0], shapes=inject[1]), x, c)
        for blk in blocks:
            x = _checkpointed(self.with_cp, partial(blk, h=h, w=w), x)
        extractors = [self.extractor, *(self.extra_extractors or [])]
        for ext in extractors:
            c = _checkpointed(
                self.with_cp, partial(ext, ref_points=extract[0], shapes=extract[1], h=h, w=w), c, x
            )
        return x, c


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Conv stem giving c1 (stride 4, NCHW) and c2..c4 (strides 8/16/32, flattened (B, HW, C))."""

    def __init__(self, inplanes: int = 64, embed_dim: int = 384):
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn_relu(3, inplanes, 2),
            *_conv_bn_relu(inplanes, inplanes, 1),
            *_conv_bn_relu(inplanes, inplanes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        c2, c3, c4 = (
            fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc2, c2), (self.fc3, c3), (self.fc4, c4))
        )
        return self.fc1(c1), c2, c3, c4


# ----------------------------------------------------------------------------------------------
# the backbone


class ViTAdapter(nn.Module):
    """The official `ViTAdapter` (with its TIMMVisionTransformer base): same arguments, keys and math.

    `forward(x)` returns [f1, f2, f3, f4], NCHW, `embed_dim` channels, strides 4/8/16/32; H and W must
    be multiples of 32. Defaults are upstream's; `build_vit_adapter` applies the DeiT-B ADE20K config.

    Args (the upstream ones):
        pretrain_size: side the `pos_embed` grid was trained for (resized to the token grid).
        num_heads: ViT attention heads; deform_num_heads: heads of the deformable attentions.
        conv_inplane: SPM width; n_points: sampling points per head and level.
        init_values: initial injector `gamma`; interaction_indexes: [first, last] block of each group.
        with_cffn / cffn_ratio: extractor conv FFN and its hidden ratio; deform_ratio: value dim ratio.
        add_vit_feature: add the resized ViT group outputs to f1..f4.
        use_extra_extractor: two more extractors after the last group.
        with_cp: recompute activations in backward (torch.utils.checkpoint).
        pretrained: upstream loads a checkpoint here; we load weights through
            `vlmlab.encoders.load_encoder(weights=...)` instead and refuse a path.
        img_size / patch_size / in_chans / num_classes / embed_dim / depth / mlp_ratio / qkv_bias /
        drop_rate / attn_drop_rate / drop_path_rate / layer_scale / embed_layer / norm_layer /
        act_layer / window_attn / window_size: TIMMVisionTransformer's (there is no head; num_classes is
        accepted and unused, as upstream).
    """

    def __init__(
        self,
        pretrain_size: int = 224,
        num_heads: int = 12,
        conv_inplane: int = 64,
        n_points: int = 4,
        deform_num_heads: int = 6,
        init_values: float = 0.0,
        interaction_indexes: Sequence[Sequence[int]] | None = None,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        deform_ratio: float = 1.0,
        add_vit_feature: bool = True,
        pretrained: str | None = None,
        use_extra_extractor: bool = True,
        with_cp: bool = False,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale: bool = True,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        norm_layer: Callable[[int], nn.Module] = LayerNormEps6,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        window_attn: bool | Sequence[bool] = False,
        window_size: int | None | Sequence[int | None] = 14,
    ):
        super().__init__()
        if pretrained is not None:
            raise ValueError(
                "ViTAdapter(pretrained=...) is not supported: load weights with "
                "vlmlab.encoders.load_encoder(name, weights=path)"
            )
        if not interaction_indexes:
            raise ValueError(
                "interaction_indexes is required: [[first, last], ...] blocks of each interaction"
            )
        if add_vit_feature and len(interaction_indexes) != 4:
            raise ValueError("add_vit_feature needs exactly 4 interactions (one ViT output per level)")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.pretrain_size = pretrain_size
        self.interaction_indexes = [list(ix) for ix in interaction_indexes]
        self.add_vit_feature = add_vit_feature
        self.with_cp = with_cp
        window_attn = list(window_attn) if isinstance(window_attn, (list, tuple)) else [window_attn] * depth
        window_size = list(window_size) if isinstance(window_size, (list, tuple)) else [window_size] * depth

        # TIMMVisionTransformer
        self.patch_embed = embed_layer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth decay
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    dpr[i],
                    act_layer,
                    norm_layer,
                    windowed=window_attn[i],
                    window_size=window_size[i],
                    layer_scale=layer_scale,
                )
                for i in range(depth)
            ]
        )

        # adapter
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPriorModule(conv_inplane, embed_dim)
        self.interactions = nn.Sequential(
            *[
                InteractionBlock(
                    embed_dim,
                    deform_num_heads,
                    n_points,
                    norm_layer=norm_layer,
                    drop_path=drop_path_rate,
                    with_cffn=with_cffn,
                    cffn_ratio=cffn_ratio,
                    init_values=init_values,
                    deform_ratio=deform_ratio,
                    extra_extractor=use_extra_extractor and i == len(interaction_indexes) - 1,
                    with_cp=with_cp,
                )
                for i in range(len(interaction_indexes))
            ]
        )
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norm1 = nn.BatchNorm2d(embed_dim)
        self.norm2 = nn.BatchNorm2d(embed_dim)
        self.norm3 = nn.BatchNorm2d(embed_dim)
        self.norm4 = nn.BatchNorm2d(embed_dim)
        self.feature_info = [
            {"name": f"level{i}", "stride": s, "channels": embed_dim} for i, s in enumerate(LEVEL_STRIDES)
        ]

        # upstream init: the ViT part keeps PyTorch defaults (it expects DeiT weights); the adapter
        # parts get _init_weights, then every MSDeformAttn its own reset, then level_embed ~ N(0, 1)
        for part in (self.up, self.spm, self.interactions):
            part.apply(self._init_weights)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.with_cp = enable
        for blk in self.interactions:
            blk.with_cp = enable

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """pos_embed without its cls slot, bicubic-resized to the (h, w) token grid: (1, h*w, C)."""
        # upstream hard-codes 16 for the patch size here; patch_size is the same for patch 16
        side = self.pretrain_size // self.patch_size
        grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if (side, side) != (h, w):
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        img_h, img_w = x.shape[-2:]
        if img_h % 32 or img_w % 32:
            raise ValueError(f"ViT-Adapter needs H and W multiples of 32, got {img_h}x{img_w}")
        # deformable-attention inputs: injector queries (stride-16 grid) over the SPM levels 8/16/32;
        # extractor queries (the three SPM levels) over the stride-16 ViT grid
        spm_shapes = [(img_h // s, img_w // s) for s in (8, 16, 32)]
        vit_shape = [(img_h // 16, img_w // 16)]
        inject = (reference_points(vit_shape, x.device), spm_shapes)
        extract = (reference_points(spm_shapes, x.device), vit_shape)

        c1, c2, c3, c4 = self.spm(x)
        c2, c3, c4 = c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]
        c = torch.cat([c2, c3, c4], dim=1)

        x, h, w = self.patch_embed(x)
        b, _, dim = x.shape
        x = self.pos_drop(x + self._pos_embed(h, w))

        outs = []
        for (first, last), layer in zip(self.interaction_indexes, self.interactions, strict=True):
            x, c = layer(x, c, self.blocks[first : last + 1], inject, extract, h, w)
            outs.append(x.transpose(1, 2).reshape(b, dim, h, w))

        c2, c3, c4 = c.split([c2.shape[1], c3.shape[1], c4.shape[1]], dim=1)
        c2 = c2.transpose(1, 2).reshape(b, dim, 2 * h, 2 * w)
        c3 = c3.transpose(1, 2).reshape(b, dim, h, w)
        c4 = c4.transpose(1, 2).reshape(b, dim, h // 2, w // 2)
        c1 = self.up(c2) + c1
        if self.add_vit_feature:
            x1, x2, x3, x4 = outs
            c1 = c1 + F.interpolate(x1, scale_factor=4, mode="bilinear", align_corners=False)
            c2 = c2 + F.interpolate(x2, scale_factor=2, mode="bilinear", align_corners=False)
            c3 = c3 + x3
            c4 = c4 + F.interpolate(x4, scale_factor=0.5, mode="bilinear", align_corners=False)
        return [self.norm1(c1), self.norm2(c2), self.norm3(c3), self.norm4(c4)]


class ToyViTAdapterClassifier(nn.Module):
    """A ViT-Adapter under `net.` (official keys below it) plus a classification head for toy pretraining.

    The head (`head.norm`, `head.fc`) mean-pools each of f1..f4, averages the four levels, then
    LayerNorm + Linear, so every level gets a training signal. The encoder never uses it.
    """

    def __init__(self, num_classes: int = TOY_NUM_CLASSES, **adapter_kwargs):
        super().__init__()
        self.net = ViTAdapter(**adapter_kwargs)
        dim = self.net.embed_dim
        self.head = nn.Sequential()
        self.head.add_module("norm", nn.LayerNorm(dim, eps=1e-6))
        self.head.add_module("fc", nn.Linear(dim, num_classes))
        trunc_normal_(self.head.fc.weight, std=0.02)
        nn.init.zeros_(self.head.fc.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = torch.stack([f.mean(dim=(2, 3)) for f in self.net(pixels)]).mean(0)
        return self.head(pooled)


# ----------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_filter(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmseg checkpoint -> ViTAdapter keys: keeps 'backbone.*' without the prefix (decode and
    auxiliary heads dropped); a plain ViTAdapter state dict passes through unchanged."""
    if any(k.startswith(MMSEG_PREFIX) for k in sd):
        return strip_prefix(sd, MMSEG_PREFIX)
    return dict(sd)


# ----------------------------------------------------------------------------------------------
# configs

# upernet_deit_adapter_base_512_160k_ade20k.py (backbone), then the upstream defaults it keeps that
# shape the weights or the math (img_size/pretrain_size 224 -> pos_embed (1, 197, C); layer_scale ->
# gamma1/gamma2; init_values 0 -> injector gamma starts at 0)
_DEIT_B = dict(
    pretrain_size=224,
    img_size=224,
    patch_size=16,
    embed_dim=768,
    depth=12,
    num_heads=12,
    mlp_ratio=4,
    drop_path_rate=0.3,
    conv_inplane=64,
    n_points=4,
    deform_num_heads=12,
    cffn_ratio=0.25,
    deform_ratio=0.5,
    interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]],
    window_attn=[False] * 12,
    window_size=[None] * 12,
    in_chans=3,
    num_classes=1000,
    qkv_bias=True,
    drop_rate=0.0,
    attn_drop_rate=0.0,
    layer_scale=True,
    init_values=0.0,
    with_cffn=True,
    add_vit_feature=True,
    use_extra_extractor=True,
    with_cp=False,
)

VIT_ADAPTER_CONFIGS: dict[str, dict] = {
    "deit-b": _DEIT_B,
    # toy: d64, depth 4, one block per interaction (4 are needed for add_vit_feature); 64 px grid
    "toy": dict(
        _DEIT_B,
        pretrain_size=64,
        img_size=64,
        embed_dim=64,
        depth=4,
        num_heads=4,
        drop_path_rate=0.0,
        conv_inplane=16,
        deform_num_heads=4,
        interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]],
        window_attn=[False] * 4,
        window_size=[None] * 4,
        num_classes=TOY_NUM_CLASSES,  # classes of the toy head (ViTAdapter itself has no head)
    ),
}


def build_vit_adapter(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None, **kwargs
) -> ViTAdapter:
    """ViT-Adapter with the upstream kwargs, defaulting to the DeiT-B UperNet ADE20K-512 config.

    Args:
        device: where to build (e.g. "meta" for shapes only).
        dtype: parameter dtype after construction.
        **kwargs: any `ViTAdapter` argument (the official constructor's names).
    """
    cfg = {**_DEIT_B, **kwargs}
    with torch.device(device) if device is not None else nullcontext():
        model = ViTAdapter(**cfg)
    return model.to(dtype) if dtype is not None else model


# ----------------------------------------------------------------------------------------------
# the encoder


class ViTAdapterEncoder(BackboneEncoder):
    """A ViT-Adapter tapped at one output level ('level0'..'level3' = f1..f4, strides 4/8/16/32)."""

    official_filter = staticmethod(checkpoint_filter)

    def check_input(self, pixels: torch.Tensor) -> None:
        super().check_input(pixels)
        h, w = pixels.shape[-2:]
        if h % 32 or w % 32:  # the SPM and the level split need exact x2 relations down to stride 32
            raise ValueError(f"{self.spec.name}: image size {h}x{w} must be a multiple of 32 in both sides")

    def forward_map(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels)[int(self.spec.tap.removeprefix("level"))]

    def intermediates(self, pixels: torch.Tensor, taps: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The four output levels 'level0'..'level3' (f1..f4), [B, C, h, w], from one forward."""
        maps = {f"level{i}": f for i, f in enumerate(self.backbone(pixels))}
        return maps if taps is None else {k: v for k, v in maps.items() if k in taps}


def _create_vit_adapter(
    variant: str,
    name: str,
    tap: str | None,
    img_size: int | None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kw,
) -> ViTAdapterEncoder:
    cfg = {**VIT_ADAPTER_CONFIGS[variant], **kw}
    toy = variant == "toy"
    with torch.device(device) if device is not None else nullcontext():
        model: nn.Module = ToyViTAdapterClassifier(**cfg) if toy else ViTAdapter(**cfg)
    model = model.to(dtype) if dtype is not None else model
    tap = tap or "level3"  # the paper's "feature level index 3"
    levels = [f"level{i}" for i in range(4)]
    if tap not in levels:
        raise ValueError(f"{name}: unknown tap {tap!r}; choose one of {levels}")
    # native input: 512 crops for the ADE20K model; the toy runs at its 64 px pretraining size
    size = img_size or (cfg["img_size"] if toy else 512)
    if size % 32:
        raise ValueError(f"{name}: img_size {size} must be a multiple of 32")
    spec = EncoderSpec(
        name=name,
        family="vit",
        variant=(
            f"ViT-Adapter {'toy' if toy else 'DeiT-B'} (d{cfg['embed_dim']}, depth {cfg['depth']}, "
            f"{len(cfg['interaction_indexes'])} interactions)"
        ),
        input_size=(size, size),
        tap=tap,
        stride=LEVEL_STRIDES[int(tap[-1])],
        dim=cfg["embed_dim"],
        policy="letterbox-corner",
        mean=MMDET_MEAN,
        std=MMDET_STD,
        source=(
            "czczup/ViT-Adapter segmentation vit_adapter.py @fd64a51; "
            "upernet_deit_adapter_base_512_160k_ade20k.py"
        ),
    )
    return ViTAdapterEncoder(model, spec, config_repr(cfg), backbone_prefix="net." if toy else "")


@register_encoder("vit-adapter-deit-b")
def vit_adapter_deit_b(tap: str | None = None, img_size: int | None = None, **kw) -> ViTAdapterEncoder:
    return _create_vit_adapter("deit-b", "vit-adapter-deit-b", tap, img_size, **kw)


@register_encoder("toy-vit-adapter")
def toy_vit_adapter(tap: str | None = None, img_size: int | None = None, **kw) -> ViTAdapterEncoder:
    return _create_vit_adapter("toy", "toy-vit-adapter", tap, img_size, **kw)
