"""MambaVision: a hybrid Mamba-Transformer backbone (Hatamizadeh & Kautz, CVPR 2025), in our own code.

Architecture facts come from the official release, NVlabs/MambaVision
(`mambavision/models/mamba_vision.py`, commit 7860a50), as summarised and checked in the oracle
folder (shared/oracles/mambavision/README.md): module and key names, the layout of every official
config, and numbers the tests compare against.

    stem (2x conv3x3/2 + BN + ReLU)                                    stride 4
    level 0, level 1: residual conv blocks, then a conv3x3/2 downsample
    level 2, level 3: the map cut into windows; in each window the first ceil(depth/2) blocks mix
                      tokens with a Mamba mixer, the rest with self-attention; level 2 downsamples
    BatchNorm -> global average pool -> linear head

Taps (names accepted by `MambaVision.forward_intermediates` and by the encoders' `tap=`):

    "stem"               stem output                                     stride 4,        dim
    "level{i}"           output of level i before its downsample          stride 4*2^i,    dim*2^i
                         (what the official detection backbone and HF features expose)
    "level{i}+down"      output of level i after its downsample, i < 3    stride 8*2^i,    dim*2^(i+1)
                         (= the input of level i+1)
    "level{i}.block{j}"  output of block j of level i (hybrid levels: windows stitched back)
    "norm"               the final BatchNorm over the level-3 map         stride 32,       8*dim

The paper's MambaVision tap ("stage 3") is "level1+down": stride 16, 196 tokens at 224 px,
4*dim channels (512 for MambaVision-B). It is the default tap of every encoder here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from vlmlab.encoders.base import TOY_NUM_CLASSES, Encoder, EncoderSpec, register_encoder
from vlmlab.ops.scan import selective_scan

__all__ = ["MambaVision", "MambaVisionEncoder", "build_mambavision", "checkpoint_filter_fn", "DEFAULT_TAP"]

DEFAULT_TAP = "level1+down"
NUM_LEVELS = 4
CONV_LEVELS = (0, 1)  # the official model hard-codes conv levels 0 and 1, hybrid levels 2 and 3


def _is_number(x) -> bool:
    # the official test is `type(x) in [int, float]`: True/False and None give no layer scale
    return type(x) in (int, float)


# ----------------------------------------------------------------------------------------------
# building blocks


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """[B, C, H, W] -> [B*(H/ws)*(W/ws), ws*ws, C]: windows in (batch, row, col) order, tokens row-major."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // ws, ws, w // ws, ws).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`: [B*nW, ws*ws, C] -> [B, C, h, w]."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(-1, c, h, w)


class Stem(nn.Module):
    """Two conv3x3/2 + BN + ReLU (official `PatchEmbed`; its BN eps is 1e-4, not the default)."""

    def __init__(self, in_chans: int, in_dim: int, dim: int):
        super().__init__()
        # indices 0..5 are the official key names (conv_down.{0,1,3,4}; 2 and 5 are the ReLUs)
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_down(x)


class Downsample(nn.Module):
    """Conv3x3/2 without bias or norm that doubles the channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(x)


class ConvBlock(nn.Module):
    """x + BN(conv3x3(GELU_tanh(BN(conv3x3(x))))), optionally scaled per channel by `gamma`."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if _is_number(layer_scale) else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)


def _mamba_dt_init_(
    dt_proj: nn.Linear, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4
) -> None:
    """Mamba's dt init (uniform weight, inverse-softplus bias of log-uniform dt).

    The official model re-initialises every Linear after construction, which overwrites this (so
    `dt_proj.bias` starts at zero); it is kept because it draws random numbers, and drawing the same
    ones makes a seeded build identical to the official one.
    """
    std = dt_proj.in_features**-0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(
        torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    )
    dt = dt.clamp(min=floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class MambaVisionMixer(nn.Module):
    """MambaVision's Mamba mixer: an SSM branch and a gate-free conv branch, concatenated.

    Differs from Mamba's mixer in three ways that matter numerically: both halves get a
    non-causal ('same') depthwise conv; the z half is concatenated to the scan output instead of
    gating it; and `dt_proj` is applied with its bias before the scan, which adds the same bias
    again (`delta_bias`), so delta = softplus(W dt + 2 b).
    """

    def __init__(
        self, dim: int, d_state: int = 8, d_conv: int = 3, expand: int = 1, dt_rank: int | None = None
    ):
        super().__init__()
        inner = expand * dim
        half = inner // 2
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, inner, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True)
        _mamba_dt_init_(self.dt_proj)
        # S4D-real init: A = -(1..d_state) in every channel
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(half, 1)
        )
        self.D = nn.Parameter(torch.ones(half))
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, C] -> [N, L, C]; each of the N sequences (windows) is scanned independently."""
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # [N, C/2, L] each
        x = F.silu(self.conv1d_x(x))
        z = F.silu(self.conv1d_z(z))
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt).transpose(1, 2)  # bias added here once ...
        y = selective_scan(
            x,
            dt,
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            self.D.float(),
            delta_bias=self.dt_proj.bias.float(),  # ... and here again, as in the official code
            delta_softplus=True,
        )
        return self.out_proj(torch.cat([y, z], dim=1).transpose(1, 2))


class Attention(nn.Module):
    """Multi-head self-attention over the tokens of each window (no mask, no position bias)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, l, c = x.shape
        q, k, v = self.qkv(x).reshape(n, l, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(n, l, c)))


class Block(nn.Module):
    """Pre-norm block: x + g1 * mixer(LN(x)), then x + g2 * MLP(LN(x)); mixer is Mamba or attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attention:
            self.mixer = Attention(dim, num_heads, qkv_bias, qk_norm, attn_drop, drop)
        else:
            self.mixer = MambaVisionMixer(dim, d_state=8, d_conv=3, expand=1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        # parameters of the module itself come first in its state_dict, as the official gammas do
        use_ls = _is_number(layer_scale)
        self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim)) if use_ls else None
        self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim)) if use_ls else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mixer(self.norm1(x))
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


class MambaVisionLevel(nn.Module):
    """One level: conv blocks, or windowed hybrid blocks; then an optional downsample."""

    def __init__(
        self,
        dim: int,
        depth: int,
        conv: bool,
        num_heads: int,
        window_size: int,
        downsample: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        layer_scale: float | None = None,
        layer_scale_conv: float | None = None,
    ):
        super().__init__()
        drop_path = list(drop_path) or [0.0] * depth
        self.windowed = not conv
        self.window_size = window_size
        if conv:
            self.blocks = nn.ModuleList(ConvBlock(dim, drop_path[j], layer_scale_conv) for j in range(depth))
        else:
            num_mamba = (depth + 1) // 2  # official rule: first ceil(depth/2) Mamba, the rest attention
            self.blocks = nn.ModuleList(
                Block(
                    dim,
                    num_heads,
                    attention=j >= num_mamba,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[j],
                    layer_scale=layer_scale,
                )
                for j in range(depth)
            )
        self.downsample = Downsample(dim) if downsample else None

    def forward_blocks(
        self, x: torch.Tensor, taps: Collection[int] = (), stop: int | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Runs blocks 0..stop (all if None) on an NCHW map.

        Returns the map after the last block run and {j: map after block j} for j in `taps`.
        """
        h, w = x.shape[-2:]
        ws = self.window_size
        if self.windowed:
            # zero-pad right/bottom to whole windows; padded tokens take part (no mask), as officially
            x = F.pad(x, (0, (-w) % ws, 0, (-h) % ws))
            hp, wp = x.shape[-2:]
            x = window_partition(x, ws)

        def as_map(t: torch.Tensor) -> torch.Tensor:
            return window_reverse(t, ws, hp, wp)[:, :, :h, :w] if self.windowed else t

        maps = {}
        for j, blk in enumerate(self.blocks):
            x = blk(x)
            if j in taps:
                maps[j] = as_map(x)
            if j == stop:
                break
        return as_map(x), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


# ----------------------------------------------------------------------------------------------
# model

_TAP_RE = re.compile(r"stem|norm|level(\d+)(?:(\+down)|\.block(\d+))?")
TAP_GRAMMAR = "'stem', 'level{i}', 'level{i}+down' (i < 3), 'level{i}.block{j}', 'norm'"


class MambaVision(nn.Module):
    """The MambaVision classifier with the official module names (its state_dict is an official checkpoint).

    Args: exactly the official `MambaVision` constructor's (see `build_mambavision`); `resolution`
    and `img_size`, which the official factories pass, are accepted and unused, as there.
    `qk_scale` is what the official code forwards as the attention's `qk_norm` flag: a truthy
    value adds LayerNorms on q and k; every official config has None.
    """

    def __init__(
        self,
        dim: int,
        in_dim: int,
        depths: Sequence[int],
        window_size: Sequence[int],
        mlp_ratio: float,
        num_heads: Sequence[int],
        drop_path_rate: float = 0.2,
        in_chans: int = 3,
        num_classes: int = 1000,
        qkv_bias: bool = True,
        qk_scale=None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        layer_scale: float | None = None,
        layer_scale_conv: float | None = None,
        resolution: int | None = None,
        img_size=None,
    ):
        super().__init__()
        if not (len(depths) == len(window_size) == len(num_heads) == NUM_LEVELS):
            raise ValueError(
                f"MambaVision has {NUM_LEVELS} levels: depths, window_size and num_heads need "
                f"{NUM_LEVELS} entries, got {list(depths)}, {list(window_size)}, {list(num_heads)}"
            )
        self.config = dict(
            dim=dim,
            in_dim=in_dim,
            depths=list(depths),
            window_size=list(window_size),
            mlp_ratio=mlp_ratio,
            num_heads=list(num_heads),
            drop_path_rate=drop_path_rate,
            in_chans=in_chans,
            num_classes=num_classes,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            layer_scale=layer_scale,
            layer_scale_conv=layer_scale_conv,
        )
        self.dims = [dim * 2**i for i in range(NUM_LEVELS)]
        self.num_features = self.dims[-1]
        self.num_classes = num_classes
        self.patch_embed = Stem(in_chans, in_dim, dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.levels = nn.ModuleList()
        for i in range(NUM_LEVELS):
            self.levels.append(
                MambaVisionLevel(
                    self.dims[i],
                    depths[i],
                    i in CONV_LEVELS,
                    num_heads[i],
                    window_size[i],
                    downsample=i < NUM_LEVELS - 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=bool(qk_scale),
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    layer_scale=layer_scale,
                    layer_scale_conv=layer_scale_conv,
                )
            )
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.feature_info = [dict(name=t, **self.tap_info(t)) for t in self.stage_taps()]

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # the official global init; convs keep PyTorch's defaults
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- taps ---------------------------------------------------------------------------------

    def stage_taps(self) -> list[str]:
        """The stage-level tap names, in forward order (block taps not listed)."""
        names = ["stem"]
        for i in range(NUM_LEVELS):
            names += [f"level{i}"] + ([f"level{i}+down"] if i < NUM_LEVELS - 1 else [])
        return names + ["norm"]

    def tap_position(self, tap: str) -> tuple[int, int]:
        """Where `tap` is computed, as a sortable (level, step) pair; raises ValueError for unknown taps.

        stem is (-1, 0); block j of level i is (i, j); level i is (i, depth); its +down (i, depth+1);
        norm is (NUM_LEVELS, 0).
        """
        m = _TAP_RE.fullmatch(tap)
        if m is None:
            raise ValueError(f"unknown MambaVision tap {tap!r}; taps are {TAP_GRAMMAR}")
        if tap == "stem":
            return (-1, 0)
        if tap == "norm":
            return (NUM_LEVELS, 0)
        i = int(m.group(1))
        if i >= NUM_LEVELS:
            raise ValueError(f"tap {tap!r}: levels are 0..{NUM_LEVELS - 1}")
        depth = len(self.levels[i].blocks)
        if m.group(2):
            if self.levels[i].downsample is None:
                raise ValueError(f"tap {tap!r}: level {i} has no downsample; use 'level{i}' or 'norm'")
            return (i, depth + 1)
        if m.group(3) is not None:
            j = int(m.group(3))
            if j >= depth:
                raise ValueError(f"tap {tap!r}: level {i} has blocks 0..{depth - 1}")
            return (i, j)
        return (i, depth)

    def tap_info(self, tap: str) -> dict[str, int]:
        """Stride (input pixels per grid cell) and channels of a tap."""
        i, step = self.tap_position(tap)
        if i < 0:
            return dict(stride=4, channels=self.dims[0])
        if i == NUM_LEVELS:
            return dict(stride=4 * 2 ** (NUM_LEVELS - 1), channels=self.num_features)
        down = int(step > len(self.levels[i].blocks))
        return dict(stride=4 * 2 ** (i + down), channels=self.dims[i] * 2**down)

    def tap_level(self, tap: str) -> int:
        """The deepest level a tap needs computed (-1: stem only)."""
        return min(self.tap_position(tap)[0], NUM_LEVELS - 1)

    # -- forward ------------------------------------------------------------------------------

    def forward_intermediates(self, x: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
        """{tap: NCHW map} for the given taps, running the network only as far as the deepest one."""
        where = {t: self.tap_position(t) for t in taps}
        want = set(where.values())
        last = max(want)
        feats: dict[tuple[int, int], torch.Tensor] = {}

        x = self.patch_embed(x)
        feats[(-1, 0)] = x
        for i, level in enumerate(self.levels):
            if last < (i, 0):
                break
            depth = len(level.blocks)
            block_taps = {j for li, j in want if li == i and j < depth}
            x, maps = level.forward_blocks(x, block_taps, stop=last[1] if last[0] == i else None)
            feats.update({(i, j): m for j, m in maps.items()})
            if last < (i, depth):
                break
            feats[(i, depth)] = x
            if last == (i, depth):
                break
            if level.downsample is not None:
                x = level.downsample(x)
                feats[(i, depth + 1)] = x
        else:
            feats[(NUM_LEVELS, 0)] = self.norm(x)
        return {t: feats[p] for t, p in where.items()}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Official semantics: norm(level maps) -> global average pool -> [B, num_features]."""
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        return self.norm(x).mean((2, 3))

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def build_mambavision(
    *, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **kwargs
) -> MambaVision:
    """The MambaVision classifier from the official constructor's kwargs (random init).

    Args:
        device: where to build (e.g. "meta" to inspect the layout of a large config for free).
        dtype: parameter dtype (built in fp32, then cast).
        **kwargs: `MambaVision(...)` arguments, as in the oracle keys_*.json "config".
    """
    with torch.device(device) if device is not None else nullcontext():
        model = MambaVision(**kwargs)
    return model if dtype is None else model.to(dtype)


# ----------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_filter_fn(
    sd: Mapping[str, torch.Tensor], model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Official checkpoint layout -> our keys (the same names; only wrappers are removed).

    Follows the official loader (`_load_checkpoint`): the container ('state_dict', else 'model', the
    non-EMA weights) is opened by `checkpoints.unwrap` before this; a leading 'module.' (DDP) is
    stripped; if the alphabetically first key starts with 'encoder', only the 'encoder.*' keys are
    kept, without the prefix. A 'model.' prefix on every key (third-party HF copies wrap the
    network as `self.model`; unverified) is stripped too. The official loader tolerates missing
    BatchNorm `num_batches_tracked` buffers, so with `model` given they are filled in from it.
    """
    sd = dict(sd)
    if sd and next(iter(sd)).startswith("module."):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if sd and min(sd).startswith("encoder"):
        sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    if model is not None:
        for k, v in model.state_dict().items():
            if k.endswith("num_batches_tracked") and k not in sd:
                sd[k] = torch.zeros_like(v, device="cpu")
    return sd


# ----------------------------------------------------------------------------------------------
# encoder


def _conv_out(size: int, n: int) -> int:
    """Size after n stride-2 convs with kernel 3 and padding 1."""
    for _ in range(n):
        size = (size + 1) // 2
    return size


class MambaVisionEncoder(Encoder):
    """A MambaVision model tapped at one of its taps (see the module docstring).

    Args:
        allow_window_padding: the official model zero-pads a hybrid level's grid to whole windows,
            and the padded tokens then take part in the mixing. That changes features with the
            input size in a way that is easy to miss, so by default a size whose grid is not tiled
            by the windows is an error; True keeps the official padding.
    """

    def __init__(self, model: MambaVision, spec: EncoderSpec, allow_window_padding: bool = False):
        super().__init__(model, spec)
        self.allow_window_padding = allow_window_padding

    @property
    def model_config(self) -> dict:
        return dict(self.model.config)

    def checkpoint_filter(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return checkpoint_filter_fn(sd, self.model)

    def check_windows(self, size: Sequence[int], taps: Sequence[str]) -> None:
        """Raises ValueError where a hybrid level that `taps` need has a grid its windows do not tile."""
        if self.allow_window_padding:
            return
        deepest = max(self.model.tap_level(t) for t in taps)
        for i, level in enumerate(self.model.levels[: deepest + 1]):
            # level i runs after 2 + i stride-2 convs (k3, p1): the stem's two, one downsample per level
            h, w = (_conv_out(s, 2 + i) for s in size)
            if level.windowed and (h % level.window_size or w % level.window_size):
                ws, cell = level.window_size, 4 * 2**i * level.window_size
                raise ValueError(
                    f"{self.spec.name}: at {size[0]}x{size[1]} px, level {i} runs on a {h}x{w} grid that "
                    f"{ws}x{ws} windows do not tile (taps {list(taps)}). Use input sizes that are multiples "
                    f"of {cell} px, build with img_size=<size> (toy configs fit their windows to it) or "
                    f"window_size=[...], or pass allow_window_padding=True for the official zero padding."
                )

    def forward_map(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_windows(pixels.shape[-2:], [self.spec.tap])
        return self.model.forward_intermediates(pixels, [self.spec.tap])[self.spec.tap]

    def intermediates(self, pixels: torch.Tensor, taps: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Named NCHW maps (default: every stage tap, see `model.stage_taps()`), from one forward pass."""
        taps = list(taps) if taps is not None else self.model.stage_taps()
        self.check_windows(pixels.shape[-2:], taps)
        return self.model.forward_intermediates(pixels, taps)


# ----------------------------------------------------------------------------------------------
# configs: the official factories' kwargs (mamba_vision.py; oracle keys_*.json "config")

# fmt: off
_COMMON = dict(mlp_ratio=4, in_chans=3, num_classes=1000, qkv_bias=True, qk_scale=None, drop_rate=0.0,
               attn_drop_rate=0.0, layer_scale=None, layer_scale_conv=None, resolution=224)
CONFIGS: dict[str, dict] = {
    "t":  dict(dim=80,  in_dim=32, depths=[1, 3, 8, 4],  num_heads=[2, 4, 8, 16],  window_size=[8, 8, 14, 7],
               drop_path_rate=0.2),
    "t2": dict(dim=80,  in_dim=32, depths=[1, 3, 11, 4], num_heads=[2, 4, 8, 16],  window_size=[8, 8, 14, 7],
               drop_path_rate=0.2),
    "s":  dict(dim=96,  in_dim=64, depths=[3, 3, 7, 5],  num_heads=[2, 4, 8, 16],  window_size=[8, 8, 14, 7],
               drop_path_rate=0.2),
    "b":  dict(dim=128, in_dim=64, depths=[3, 3, 10, 5], num_heads=[2, 4, 8, 16],  window_size=[8, 8, 14, 7],
               drop_path_rate=0.3, layer_scale=1e-5),
    "l":  dict(dim=196, in_dim=64, depths=[3, 3, 10, 5], num_heads=[4, 8, 16, 32], window_size=[8, 8, 14, 7],
               drop_path_rate=0.3, layer_scale=1e-5),
    "l2": dict(dim=196, in_dim=64, depths=[3, 3, 12, 5], num_heads=[4, 8, 16, 32], window_size=[8, 8, 14, 7],
               drop_path_rate=0.3, layer_scale=1e-5),
}
_HUB = "https://huggingface.co/nvidia/MambaVision-{}-1K/resolve/main/mambavision_{}_1k.pth.tar"
URLS = {"t": _HUB.format("T", "tiny"), "t2": _HUB.format("T2", "tiny2"), "s": _HUB.format("S", "small"),
        "b": _HUB.format("B", "base"), "l": _HUB.format("L", "large"), "l2": _HUB.format("L2", "large2")}

# Toy configs for CPU pretraining: the official layout scaled down (T-like without layer scale,
# B-like with it; MLP ratio 2 to halve the cost). Windows are fitted to img_size so that, as the
# official configs do at 224 px, each hybrid level mixes its whole grid in one window.
TOY_CONFIGS: dict[str, dict] = {
    "toy":   dict(dim=32, in_dim=16, depths=[1, 1, 2, 2], num_heads=[1, 2, 2, 4], mlp_ratio=2,
                  drop_path_rate=0.0),
    "toy-b": dict(dim=48, in_dim=24, depths=[1, 2, 3, 2], num_heads=[2, 2, 4, 8], mlp_ratio=2,
                  drop_path_rate=0.0, layer_scale=1e-5),
}
# fmt: on


def toy_window_sizes(img_size: int) -> list[int]:
    """Windows equal to each hybrid level's grid at `img_size` (levels 0/1 ignore theirs)."""
    if img_size % 32:
        raise ValueError(
            f"toy MambaVision needs an img_size that is a multiple of 32 (its deepest stride), got {img_size}"
        )
    return [8, 8, img_size // 16, img_size // 32]


def _create_mambavision(
    name: str,
    cfg: dict,
    variant: str,
    source: str,
    tap: str | None,
    img_size: int,
    allow_window_padding: bool = False,
    **overrides,
) -> MambaVisionEncoder:
    model = build_mambavision(**{**cfg, **overrides})
    tap = tap or DEFAULT_TAP
    info = model.tap_info(tap)
    spec = EncoderSpec(
        name=name,
        family="hybrid",
        variant=variant,
        input_size=(img_size, img_size),
        tap=tap,
        stride=info["stride"],
        dim=info["channels"],
        source=source,
    )
    return MambaVisionEncoder(model, spec, allow_window_padding=allow_window_padding)


def _official(name: str, key: str, tap: str | None, img_size: int | None, **kw) -> MambaVisionEncoder:
    cfg = {**_COMMON, **CONFIGS[key]}
    return _create_mambavision(
        name,
        cfg,
        f"MambaVision-{key.upper()} (mamba_vision_{key.upper()}, ImageNet-1K)",
        f"NVlabs/MambaVision mamba_vision_{key.upper()}; weights {URLS[key]}",
        tap,
        img_size or 224,
        **kw,
    )


def _toy(name: str, key: str, tap: str | None, img_size: int | None, **kw) -> MambaVisionEncoder:
    img_size = img_size or 64
    cfg = {
        **_COMMON,
        "num_classes": TOY_NUM_CLASSES,
        "window_size": toy_window_sizes(img_size),
        **TOY_CONFIGS[key],
    }
    c = cfg | kw
    variant = f"toy MambaVision (dim {c['dim']}, depths {c['depths']}, windows {c['window_size']})"
    return _create_mambavision(
        name, cfg, variant, "vlmlab toy config of NVlabs/MambaVision", tap, img_size, **kw
    )


@register_encoder("mambavision-t")
def mambavision_t(tap: str | None = None, img_size: int | None = None, **kw) -> Encoder:
    return _official("mambavision-t", "t", tap, img_size, **kw)


@register_encoder("mambavision-t2")
def mambavision_t2(tap: str | None = None, img_size: int | None = None, **kw) -> Encoder:
    return _official("mambavision-t2", "t2", tap, img_size, **kw)


@register_encoder("mambavision-s")
def mambavision_s(tap: str | None = None, img_size: int | None = None, **kw) -> Encoder:
    return _official("mambavision-s", "s", tap, img_size, **kw)


@register_encoder("mambavision-b")
def mambavision_b(tap: str | None = None, img_size: int | None = None, **kw) -> Encoder:
    return _official("mambavision-b", "b", tap, img_size, **kw)


@register_encoder("mambavision-l")
def mambavision_l(tap: str | None = None, img_size: int | None = None, **kw) -> Encoder:
    return _official("mambavision-l", "l", tap, img_size, **kw)


@register_encoder("mambavision-l2")
def mambavision_l2(tap: str | None = None, img_size: int | None = None, **kw) -> Encoder:
    return _official("mambavision-l2", "l2", tap, img_size, **kw)


@register_encoder("toy-mambavision")
def toy_mambavision(tap: str | None = None, img_size: int | None = None, **kw) -> Encoder:
    return _toy("toy-mambavision", "toy", tap, img_size, **kw)


@register_encoder("toy-mambavision-b")
def toy_mambavision_b(tap: str | None = None, img_size: int | None = None, **kw) -> Encoder:
    return _toy("toy-mambavision-b", "toy-b", tap, img_size, **kw)
