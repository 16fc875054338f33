"""VMamba v2 ("VMamba: Visual State Space Model", Liu et al., NeurIPS 2024) in our own code.

A hierarchical, channel-first network: a 2-conv stem (stride 4), four stages of VSS blocks
(SS2D: a selective scan run over the feature map in four directions, plus an MLP) with
3x3/stride-2 conv downsampling between stages, and a LayerNorm + pool + linear classifier.
The detection / segmentation variant (`Backbone_VSSM`) drops the classifier and adds one
channel LayerNorm per output stage (`outnorm{i}`).

Facts (module names, key layout, initialization, forward math) come from the official code,
MzeroMiko/VMamba @ 2ed52ea (classification/models/vmamba.py: VSSM, Backbone_VSSM, SS2D,
mamba_init; classification/configs/vssm/vmambav2*.yaml; detection|segmentation/configs/vssm1/*.py),
as recorded in the oracle README (shared/oracles/vmamba). The paper's tap and the classifier's
"stage norm" come from the study's release, raykuo18/vlm-ssm-vision-encoders
(src/vlm_backbones/models/backbones/vision/vmamba.py).

Only the v2 code path of the paper's configs is implemented: forward_type "v05_noz",
norm_layer "ln2d", downsample "v3", patch embed "v2", ssm_init "v0"; other options raise
NotImplementedError.

Taps (the grammar of `parse_tap`, 0-based indices)::

    stem                 output of the patch embedding (stride 4)
    stage{i}             end of stage i: after its last block, before its downsample
    stage{i}.layer{j}    after block j of stage i (j < 0 counts from the end)
    <tap>+norm           then the stage's LayerNorm over channels (see `VSSM.stage_norm`)

The paper's "stage 3, layer 14" of VMamba-S is `stage2.layer14+norm` (384-d, stride 16).

Speed: in inference on CUDA (no autograd graph needed, eval mode) each VSS block runs on a
channel-last copy of the map with Triton kernels (vlmlab/ops/cross_scan_triton.py): one kernel
for the depthwise conv + SiLU, one for the four scan directions read straight from the map (no
cross_scan / cross_merge copies, dt projection inside), one for the merge + out_norm; the 1x1
projections run at the precision of the official layer, a 1x1 convolution (`Linear2d`): in fp32
PyTorch lets cuDNN convolutions use TF32 by default (`torch.backends.cudnn.allow_tf32`) where
nn.Linear's matrix products stay IEEE fp32, so there they stay cuDNN convolutions on channels_last
views (no copies); in IEEE fp32 or under autocast, where both compute alike, they are plain matrix
products (measured faster there). Maps between blocks are then channels_last tensors. Same math as
the reference path (rounding apart); training and CPU use the reference path.
Set VLMLAB_VMAMBA_FUSED=0 to run the reference path everywhere (timing comparisons).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, trunc_normal_
from torch import nn

from vlmlab.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MMDET_MEAN,
    MMDET_STD,
    TOY_NUM_CLASSES,
    Encoder,
    EncoderSpec,
    register_encoder,
)
from vlmlab.ops.scan import resolve_backend, selective_scan

__all__ = [
    "VSSM",
    "BackboneVSSM",
    "SS2D",
    "VSSBlock",
    "Tap",
    "VMambaEncoder",
    "build_vmamba",
    "build_vmamba_backbone",
    "checkpoint_filter_fn",
    "cross_merge",
    "cross_scan",
    "parse_tap",
]

K_DIRECTIONS = 4  # row-major, column-major, and both reversed

_ACT_LAYERS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}

# Fused CUDA inference path (module docstring); False runs the reference path on every device.
FUSED = os.environ.get("VLMLAB_VMAMBA_FUSED", "1") != "0"


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a following nn.Linear computes in: the autocast dtype if on, else x's.

    LayerNorm under autocast returns fp32 that the next matrix product casts down; the fused
    kernels write that dtype directly (same values, one pass less).
    """
    amp = torch.is_autocast_enabled(x.device.type)
    return torch.get_autocast_dtype(x.device.type) if amp else x.dtype


@functools.cache
def _fused_ops():
    """The Triton kernels of the fused path, or None where triton does not import."""
    try:
        from vlmlab.ops import cross_scan_triton
    except Exception:  # no triton, or a broken one: the reference path still works
        return None
    return cross_scan_triton


# ----------------------------------------------------------------------------------------------
# building blocks


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (official `LayerNorm2d`, eps 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Linear2d(nn.Linear):
    """A Linear applied to NCHW as a 1x1 conv; stores the 2-D (out, in) weight of nn.Linear.

    Subclassing nn.Linear keeps the official init (nn.Linear's defaults, then the model's
    trunc-normal pass, which matches on nn.Linear).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the official layer also accepts conv-shaped (out, in, 1, 1) weights
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dim() == 4 and w.numel() == self.weight.numel():
            state_dict[prefix + "weight"] = w.reshape(self.weight.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def linear2d_cl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`Linear2d` on a channel-last map (B, H, W, C) -> (B, H, W, O), contiguous, at its precision.

    fp32 where cuDNN may use TF32 (PyTorch's default): the official layer's cuDNN 1x1 convolution,
    on a channels_last view of the map (no copy in or out). Otherwise a matrix product, which then
    computes at the convolution's precision (IEEE fp32, or the autocast dtype) and runs faster.
    """
    tf32_conv = torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    if tf32_conv and x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
        y = F.conv2d(x.permute(0, 3, 1, 2), weight[:, :, None, None], bias)
        return y.permute(0, 2, 3, 1).contiguous()  # channels_last output: already contiguous
    return F.linear(x, weight, bias)


class Mlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop, channel-first."""

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear2d(dim, hidden)
        self.act = act_layer()
        self.fc2 = Linear2d(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W): the four scan orders of SS2D.

    k=0 row-major (h*W + w), k=1 column-major (w*H + h), k=2 and k=3 are k=0 and k=1 reversed.
    """
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    xs = torch.stack([rows, cols], dim=1)
    return torch.cat([xs, xs.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 4, D, H*W) in scan order -> (B, D, H*W) row-major: each direction mapped back, summed."""
    ys = ys[:, :2] + ys[:, 2:].flip(-1)  # undo the reversals
    cols = ys[:, 1].unflatten(-1, (w, h)).transpose(2, 3).flatten(2)  # column-major back to rows
    return ys[:, 0] + cols


def _dt_proj_init(dt_rank: int, d_inner: int, dt_min: float, dt_max: float, dt_floor: float):
    """One direction's dt projection: weight ~ U(+-rank^-0.5), bias = softplus^-1(dt), dt log-uniform.

    The throwaway nn.Linear reproduces the official random draws (its default init runs first),
    so a seeded construction gives the official weights (up to last-bit float differences).
    """
    proj = nn.Linear(dt_rank, d_inner, bias=True)
    std = dt_rank**-0.5
    nn.init.uniform_(proj.weight, -std, std)
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus, so softplus(bias) = dt
    return proj.weight.detach(), inv_dt


class SS2D(nn.Module):
    """2-D selective scan (forward_type "v05_noz": no gate branch, LayerNorm on the scan output).

    in_proj (1x1) -> depthwise 3x3 conv -> SiLU -> 4-direction selective scan -> out_norm -> out_proj.
    Per direction k the scan has its own x_proj, dt projection, A, D and dt bias; their stacked
    layouts are the official ones: x_proj_weight (K, R+2N, D), A_logs (K*D, N), Ds (K*D),
    dt_projs_weight (K, D, R), dt_projs_bias (K, D), with direction k owning rows k*D ... k*D+D-1.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        act_layer: type[nn.Module] = nn.SiLU,
        d_conv: int = 3,
        conv_bias: bool = False,
        dropout: float = 0.0,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        k = K_DIRECTIONS
        self.d_inner = d_inner = int(ssm_ratio * d_model)
        self.d_state = d_state
        self.dt_rank = dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        # Creation order follows the official code, so the random draws under a seed match.
        self.out_norm = LayerNorm2d(d_inner)
        self.in_proj = Linear2d(d_model, d_inner, bias=False)
        self.act = act_layer()
        if d_conv > 1:  # official: no conv2d attribute (and no key) when d_conv <= 1
            self.conv2d = nn.Conv2d(
                d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias
            )
        x_proj = [nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False) for _ in range(k)]
        self.x_proj_weight = nn.Parameter(torch.stack([p.weight.detach() for p in x_proj]))
        self.out_proj = Linear2d(d_inner, d_model, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dt = [_dt_proj_init(dt_rank, d_inner, dt_min, dt_max, dt_init_floor) for _ in range(k)]
        # S4D-real init: A = -(1..N) for every channel and direction; D (skip) = 1
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(k * d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(A))
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        self.dt_projs_weight = nn.Parameter(torch.stack([w for w, _ in dt]))
        self.dt_projs_bias = nn.Parameter(torch.stack([b for _, b in dt]))
        for p in (self.A_logs, self.Ds):
            p._no_weight_decay = True  # as official; optimizers may read it
        # Set to a dict to capture the scan internals of the next forward (tests, debugging).
        self.capture: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x)
        if hasattr(self, "conv2d"):
            x = self.conv2d(x)
        x = self.act(x)
        y = self.out_norm(self.scan(x))
        return self.dropout(self.out_proj(y))

    def scan(self, x: torch.Tensor) -> torch.Tensor:
        """The selective scan over the four directions of x (B, D, H, W), merged back to (B, D, H, W)."""
        b, d, h, w = x.shape
        k, n, r, l = K_DIRECTIONS, self.d_state, self.dt_rank, h * w
        xs = cross_scan(x)  # (B, K, D, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        us, dts = xs.reshape(b, k * d, l), dts.reshape(b, k * d, l)
        Bs, Cs = Bs.contiguous(), Cs.contiguous()  # grouped: direction k serves channels k*D...
        # the scan's own parameters in fp32 as official (float64 models: float64)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        A = -torch.exp(self.A_logs.to(acc))  # (K*D, N)
        Ds, dt_bias = self.Ds.to(acc), self.dt_projs_bias.to(acc).flatten()  # (K*D,)
        # (B, K*D, L); softplus(dts + dt_bias) is the step size; the output includes the D*u skip
        ys = selective_scan(us, dts, A, Bs, Cs, Ds, delta_bias=dt_bias, delta_softplus=True)
        y = cross_merge(ys.view(b, k, d, l), h, w)
        if self.capture is not None:
            self.capture.update(us=us, dts=dts, Bs=Bs, Cs=Cs, ys=ys.view(b, k, d, h, w), y=y)
        return y.view(b, d, h, w)

    def can_fuse(self, device: torch.device) -> bool:
        """Whether `forward_fused` can run here: CUDA, triton, d_state 1, no capture.

        A scan backend forced to "reference" or "chunked" (use_backend, VLMLAB_SCAN) also
        forces the reference path.
        """
        conv = getattr(self, "conv2d", None)
        return (
            device.type == "cuda"
            and self.d_state == 1
            and self.capture is None
            and (conv is None or (conv.kernel_size[0] % 2 == 1 and conv.padding_mode == "zeros"))
            and _fused_ops() is not None
            and resolve_backend(device) not in ("reference", "chunked")
        )

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` on a channel-last map (B, H, W, C) -> (B, H, W, C), fused kernels, no autograd."""
        ops = _fused_ops()
        b, h, w, _ = x.shape
        d = self.d_inner
        z = linear2d_cl(x, self.in_proj.weight)  # (B, H, W, D)
        silu = isinstance(self.act, nn.SiLU)
        if hasattr(self, "conv2d"):
            z = ops.dwconv_act(z, self.conv2d.weight, self.conv2d.bias, "silu" if silu else None)
        elif silu:
            z = F.silu(z)
        if not silu:
            z = self.act(z)
        # x_proj of each direction is per position (official: a grouped 1x1 conv1d per direction):
        # one 1x1 convolution over the row-major map serves all 4
        x_dbl = linear2d_cl(z, self.x_proj_weight.view(-1, d)).view(b * h * w, -1)  # (BHW, 4(R+2N))
        ys = ops.cross_scan_fused(z, x_dbl, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds)
        n = self.out_norm
        y = ops.merge_layernorm(ys, n.weight, n.bias, n.eps, out_dtype=_matmul_dtype(ys))
        return self.dropout(linear2d_cl(y.view(b, h, w, d), self.out_proj.weight))


class VSSBlock(nn.Module):
    """x + drop_path(SS2D(norm(x))), then x + drop_path(MLP(norm2(x))); pre-norm, channel-first."""

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        ssm_d_state: int = 1,
        ssm_ratio: float = 2.0,
        ssm_dt_rank: int | str = "auto",
        ssm_act_layer: type[nn.Module] = nn.SiLU,
        ssm_conv: int = 3,
        ssm_conv_bias: bool = False,
        ssm_drop_rate: float = 0.0,
        mlp_ratio: float = 4.0,
        mlp_act_layer: type[nn.Module] = nn.GELU,
        mlp_drop_rate: float = 0.0,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.ssm_branch = ssm_ratio > 0
        self.mlp_branch = mlp_ratio > 0
        if self.ssm_branch:
            self.norm = LayerNorm2d(dim)
            self.op = SS2D(
                dim,
                d_state=ssm_d_state,
                ssm_ratio=ssm_ratio,
                dt_rank=ssm_dt_rank,
                act_layer=ssm_act_layer,
                d_conv=ssm_conv,
                conv_bias=ssm_conv_bias,
                dropout=ssm_drop_rate,
            )
        self.drop_path = DropPath(drop_path)
        if self.mlp_branch:
            self.norm2 = LayerNorm2d(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), mlp_act_layer, mlp_drop_rate)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ssm_branch:
            x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp_branch:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._can_fuse(x):
            return self._forward_fused(x)
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _can_fuse(self, x: torch.Tensor) -> bool:
        """Fused path: FUSED, eval mode, float16/32 or bf16, no autograd graph, SS2D can fuse."""
        if not (FUSED and x.is_cuda and not self.training) or x.dtype == torch.float64:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return not self.ssm_branch or self.op.can_fuse(x.device)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """`_forward` in eval mode on a channel-last map; returns a channels_last NCHW tensor."""
        ops = _fused_ops()
        x = x.permute(0, 2, 3, 1).contiguous()  # no copy when x is channels_last (every block's output)
        b, h, w, c = x.shape
        n2 = self.norm2 if self.mlp_branch else None
        if self.ssm_branch:
            n = self.norm
            h1 = ops.layer_norm(x, n.weight, n.bias, n.eps, out_dtype=_matmul_dtype(x))[0]
            y = self.op.forward_fused(h1.view(b, h, w, c))
            if n2 is None:
                x = x + y
            else:  # x + y and norm2 of it in one pass
                h2, x = ops.layer_norm(y, n2.weight, n2.bias, n2.eps, residual=x, out_dtype=_matmul_dtype(x))
        elif n2 is not None:
            h2 = ops.layer_norm(x, n2.weight, n2.bias, n2.eps, out_dtype=_matmul_dtype(x))[0]
        if self.mlp_branch:
            mlp = self.mlp
            hidden = mlp.act(linear2d_cl(h2.view(b, h, w, c), mlp.fc1.weight, mlp.fc1.bias))
            x = x + linear2d_cl(hidden, mlp.fc2.weight, mlp.fc2.bias)
        return x.permute(0, 3, 1, 2)


def _patch_embed_v2(in_chans: int, dim: int, patch_norm: bool) -> nn.Sequential:
    """Stem: conv 3x3/2 -> LN -> GELU -> conv 3x3/2 -> LN (stride 4).

    The Identity slots are where the channel-last variant permutes; they keep the official
    indices (0, 2, 5, 7) of the parameterized layers.
    """
    norm = LayerNorm2d if patch_norm else (lambda _: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1),
        nn.Identity(),
        norm(dim // 2),
        nn.Identity(),
        nn.GELU(),
        nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
        nn.Identity(),
        norm(dim),
    )


def _downsample_v3(dim: int, out_dim: int) -> nn.Sequential:
    """conv 3x3/2 -> LN; Identity slots keep the official indices (1, 3)."""
    return nn.Sequential(
        nn.Identity(),
        nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1),
        nn.Identity(),
        LayerNorm2d(out_dim),
    )


# ----------------------------------------------------------------------------------------------
# taps


@dataclass(frozen=True)
class Tap:
    """A resolved tap: the output of block `layer` of stage `stage` (stage -1: the stem)."""

    stage: int
    layer: int
    norm: bool = False

    @property
    def name(self) -> str:
        """Canonical name, e.g. "stage2.layer14+norm"."""
        if self.stage < 0:
            return "stem"
        return f"stage{self.stage}.layer{self.layer}" + ("+norm" if self.norm else "")

    @property
    def stride(self) -> int:
        return 4 * 2 ** max(self.stage, 0)


_TAP_RE = re.compile(r"^(?:(?P<stem>stem)|stage(?P<stage>\d+)(?:\.layer(?P<layer>-?\d+))?)(?P<norm>\+norm)?$")
TAP_GRAMMAR = "'stem', 'stage{i}', 'stage{i}.layer{j}' (0-based, j<0 from the end), optionally + '+norm'"


def parse_tap(name: str, depths: Sequence[int]) -> Tap:
    """Resolves a tap string (grammar in the module docstring) against the stage depths."""
    m = _TAP_RE.match(name.strip())
    if m is None:
        raise ValueError(f"bad VMamba tap {name!r}; grammar: {TAP_GRAMMAR}")
    if m["stem"]:
        if m["norm"]:
            raise ValueError(f"bad VMamba tap {name!r}: the stem has no stage norm")
        return Tap(-1, 0)
    stage = int(m["stage"])
    if stage >= len(depths):
        raise ValueError(f"VMamba tap {name!r}: stage {stage} out of range ({len(depths)} stages)")
    depth = depths[stage]
    layer = depth - 1 if m["layer"] is None else int(m["layer"])
    if layer < 0:
        layer += depth
    if not 0 <= layer < depth:
        raise ValueError(f"VMamba tap {name!r}: stage {stage} has {depth} blocks (layers 0..{depth - 1})")
    return Tap(stage, layer, bool(m["norm"]))


def default_tap(depths: Sequence[int]) -> str:
    """The paper's tap: last block of stage index 2, then its norm ("stage 3, layer 14" of VMamba-S)."""
    return Tap(2, depths[2] - 1, True).name


# ----------------------------------------------------------------------------------------------
# models


class VSSM(nn.Module):
    """VMamba classifier in the official module layout (`VSSM` of the official code).

    Build it with `build_vmamba(**official_kwargs)`; the arguments are documented there.
    """

    def __init__(self, config: Mapping):
        super().__init__()
        cfg = dict(config)
        _check_supported(cfg)
        self.config = cfg
        depths = list(cfg["depths"])
        dims = cfg["dims"]
        dims = [int(dims * 2**i) for i in range(len(depths))] if isinstance(dims, int) else list(dims)
        self.depths, self.dims = depths, dims
        self.num_features = dims[-1]
        self.num_classes = cfg["num_classes"]
        # stochastic depth, linear over all blocks (a Python list: also under a meta-device build)
        dpr = torch.linspace(0, cfg["drop_path_rate"], sum(depths), device="cpu").tolist()
        block_kw = dict(
            ssm_d_state=cfg["ssm_d_state"],
            ssm_ratio=cfg["ssm_ratio"],
            ssm_dt_rank=cfg["ssm_dt_rank"],
            ssm_act_layer=_ACT_LAYERS[cfg["ssm_act_layer"].lower()],
            ssm_conv=cfg["ssm_conv"],
            ssm_conv_bias=cfg["ssm_conv_bias"],
            ssm_drop_rate=cfg["ssm_drop_rate"],
            mlp_ratio=cfg["mlp_ratio"],
            mlp_act_layer=_ACT_LAYERS[cfg["mlp_act_layer"].lower()],
            mlp_drop_rate=cfg["mlp_drop_rate"],
            use_checkpoint=cfg["use_checkpoint"],
        )

        self.patch_embed = _patch_embed_v2(cfg["in_chans"], dims[0], cfg["patch_norm"])
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            # official order: a stage's downsample is created before its blocks (random draws)
            last = i == len(depths) - 1
            downsample = nn.Identity() if last else _downsample_v3(dims[i], dims[i + 1])
            first = sum(depths[:i])
            blocks = [VSSBlock(dims[i], dpr[first + j], **block_kw) for j in range(depth)]
            stage = OrderedDict(blocks=nn.Sequential(*blocks), downsample=downsample)
            self.layers.append(nn.Sequential(stage))
        self.classifier = nn.Sequential(
            OrderedDict(
                norm=LayerNorm2d(self.num_features),
                permute=nn.Identity(),  # channel-last variant permutes here
                avgpool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(1),
                head=nn.Linear(self.num_features, self.num_classes),
            )
        )
        self.feature_info = [
            dict(module=f"layers.{i}", num_chs=dims[i], reduction=4 * 2**i) for i in range(len(depths))
        ]
        self.apply(_init_weights)

    # -- forward -------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        for name, module in self.classifier.named_children():
            if pre_logits and name == "head":
                break
            x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_taps(self, x: torch.Tensor, taps: Sequence[Tap]) -> list[torch.Tensor]:
        """Feature maps [B, C, h, w] at `taps`, in one pass that stops after the deepest one."""
        want: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(taps):
            self.check_tap(t)
            want.setdefault((t.stage, t.layer), []).append(i)
        deepest = max(want)
        out: list[torch.Tensor] = [None] * len(taps)  # type: ignore[list-item]

        def take(where: tuple[int, int], x: torch.Tensor) -> None:
            for i in want.get(where, ()):
                out[i] = self.stage_norm(taps[i].stage, x) if taps[i].norm else x

        x = self.patch_embed(x)
        take((-1, 0), x)
        if deepest == (-1, 0):
            return out
        for s, layer in enumerate(self.layers):
            for j, block in enumerate(layer.blocks):
                x = block(x)
                take((s, j), x)
                if (s, j) == deepest:
                    return out
            x = layer.downsample(x)
        raise AssertionError("unreachable: taps are checked against the depths")

    # -- taps ----------------------------------------------------------------------------------

    def check_tap(self, tap: Tap) -> None:
        if tap.stage >= 0 and (tap.stage >= len(self.depths) or tap.layer >= self.depths[tap.stage]):
            raise ValueError(f"tap {tap.name} does not exist in depths {self.depths}")

    def stage_norm(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """The channel LayerNorm applied at a "+norm" tap of a classification model.

        A classifier has no per-stage norm. The study's release taps a classification checkpoint
        through Backbone_VSSM(out_indices=(stage,)) and copies classifier.norm into
        outnorm{stage} only where the widths match (the last stage); elsewhere outnorm{stage}
        keeps its init, weight 1 and bias 0. So: classifier.norm on the last stage, else a
        LayerNorm without affine (eps 1e-5), which is exactly what that release computed.
        """
        if self.dims[stage] == self.num_features:
            return self.classifier.norm(x)
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=1e-5).permute(0, 3, 1, 2)


class BackboneVSSM(VSSM):
    """The det/seg backbone (`Backbone_VSSM`): no classifier, `outnorm{i}` for each of out_indices."""

    def __init__(self, config: Mapping):
        cfg = dict(config)
        out_indices = tuple(cfg.pop("out_indices"))
        pretrained = cfg.pop("pretrained")
        if pretrained:
            raise ValueError(
                f"pretrained={pretrained!r}: weights are not read at construction here; load them with "
                "vlmlab.encoders.load_encoder(name, weights=...) or checkpoints.load_checkpoint"
            )
        # The official class builds the classifier and deletes it: its random draws are part of
        # the seeded init of everything after it, so we do the same.
        super().__init__(cfg)
        self.config = {**cfg, "out_indices": list(out_indices), "pretrained": pretrained}
        self.out_indices = out_indices
        for i in out_indices:
            self.add_module(f"outnorm{i}", LayerNorm2d(self.dims[i]))
        del self.classifier

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """outnorm_i(stage_i output) for i in out_indices (the mmdet/mmseg backbone output).

        With no out_indices, the last features (as official).
        """
        if not self.out_indices:
            return self.forward_features(x)
        return self.forward_taps(x, [Tap(i, self.depths[i] - 1, norm=True) for i in self.out_indices])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise RuntimeError("Backbone_VSSM has no classifier")

    def check_tap(self, tap: Tap) -> None:
        super().check_tap(tap)
        if tap.norm and tap.stage not in self.out_indices:
            raise ValueError(f"tap {tap.name}: no outnorm{tap.stage} (out_indices={list(self.out_indices)})")

    def stage_norm(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"outnorm{stage}")(x)


def _init_weights(m: nn.Module) -> None:
    # official VSSM._init_weights, applied to every submodule (Linear2d is an nn.Linear)
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _check_supported(cfg: Mapping) -> None:
    """Raises NotImplementedError for official options outside the v2 path implemented here."""
    supported = dict(
        forward_type="v05_noz",
        norm_layer="ln2d",
        downsample_version="v3",
        patchembed_version="v2",
        ssm_init="v0",
        gmlp=False,
        posembed=False,
        patch_size=4,
    )
    for key, value in supported.items():
        got = cfg[key].lower() if isinstance(cfg[key], str) else cfg[key]
        if got != value:
            raise NotImplementedError(
                f"VMamba {key}={cfg[key]!r} is not implemented; supported: {key}={value!r} "
                "(the v2 configs of the paper)"
            )
    for key in ("ssm_act_layer", "mlp_act_layer"):
        if cfg[key].lower() not in _ACT_LAYERS:
            raise NotImplementedError(f"VMamba {key}={cfg[key]!r}; known: {', '.join(_ACT_LAYERS)}")


def build_vmamba(
    *,
    patch_size: int = 4,
    in_chans: int = 3,
    num_classes: int = 1000,
    depths: Sequence[int] = (2, 2, 15, 2),
    dims: int | Sequence[int] = 96,
    ssm_d_state: int = 1,
    ssm_ratio: float = 2.0,
    ssm_rank_ratio: float = 2.0,
    ssm_dt_rank: int | str = "auto",
    ssm_act_layer: str = "silu",
    ssm_conv: int = 3,
    ssm_conv_bias: bool = False,
    ssm_drop_rate: float = 0.0,
    ssm_init: str = "v0",
    forward_type: str = "v05_noz",
    mlp_ratio: float = 4.0,
    mlp_act_layer: str = "gelu",
    mlp_drop_rate: float = 0.0,
    drop_path_rate: float = 0.3,
    patch_norm: bool = True,
    norm_layer: str = "ln2d",
    downsample_version: str = "v3",
    patchembed_version: str = "v2",
    gmlp: bool = False,
    use_checkpoint: bool = False,
    posembed: bool = False,
    imgsize: int = 224,
) -> VSSM:
    """The official `VSSM` classifier from the official constructor arguments.

    Defaults are those shared by the v2 configs (and the depths / width of VMamba-S), not the
    official signature's older defaults. Modules are created in the official order, so a seeded
    construction reproduces the official init.

    Args:
        patch_size: must be 4 (patch embed v2).
        depths, dims: blocks per stage; width of stage 0 (doubled per stage) or one per stage.
        ssm_d_state, ssm_ratio, ssm_dt_rank: SSM state size N, d_inner = ratio * dim, dt rank
            ("auto" = ceil(dim / 16)).
        ssm_rank_ratio, imgsize: accepted and unused, as in the official code.
        ssm_conv, ssm_conv_bias: depthwise conv kernel (<= 1: no conv) and its bias.
        drop_path_rate: stochastic depth, linear over all blocks.
        use_checkpoint: gradient checkpointing per block.
        the rest: must have the values of the paper's v2 configs (else NotImplementedError).
    """
    return VSSM(dict(locals()))  # every argument, by name


def build_vmamba_backbone(
    *, out_indices: Sequence[int] = (0, 1, 2, 3), pretrained: str | None = None, **kwargs
) -> BackboneVSSM:
    """The official det/seg `Backbone_VSSM` (no classifier; outnorm{i} for each i in out_indices).

    Takes `build_vmamba`'s arguments plus out_indices and pretrained (None or "" only: load
    weights through load_encoder / load_checkpoint).
    """
    cfg = _resolve_kwargs(kwargs)
    return BackboneVSSM({**cfg, "out_indices": out_indices, "pretrained": pretrained})


def _resolve_kwargs(kwargs: Mapping) -> dict:
    """build_vmamba's arguments with its defaults filled in; unknown names raise TypeError."""
    params = inspect.signature(build_vmamba).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"unknown VMamba arguments: {', '.join(unknown)}; known: {', '.join(params)}")
    return {name: kwargs.get(name, p.default) for name, p in params.items()}


# ----------------------------------------------------------------------------------------------
# checkpoint filter

# Renames the official `VSSM._load_from_state_dict` applies to every incoming checkpoint.
_LEGACY_RENAMES = (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.0."),
    (re.compile(r"^patch_embed\.norm\."), "patch_embed.2."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+\.)ln_1\."), r"\1norm."),
    (re.compile(r"^(layers\.\d+\.blocks\.\d+\.)self_attention\."), r"\1op."),
    (re.compile(r"^norm\."), "classifier.norm."),
    (re.compile(r"^head\."), "classifier.head."),
)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: VSSM) -> dict[str, torch.Tensor]:
    """Maps an official checkpoint's weights onto `model`'s keys (then loaded strictly).

    Accepts the classification layout (the 'model' / 'model_ema' entry, already unwrapped) and
    mmdet / mmseg runner checkpoints (keys under 'backbone.'; neck/head keys dropped). Applies the
    official legacy renames and reshapes conv-shaped (out, in, 1, 1) Linear2d weights. A
    classification checkpoint given to a backbone is converted as the official
    `Backbone_VSSM(pretrained=...)` load does: classifier.* dropped, outnorm* at weight 1, bias 0.
    """
    sd = dict(state_dict)
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    for pattern, repl in _LEGACY_RENAMES:
        sd = {pattern.sub(repl, k): v for k, v in sd.items()}
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].dim() == 2 and v.dim() == 4 and v.shape[2:] == (1, 1):
            sd[k] = v.reshape(own[k].shape)
    if isinstance(model, BackboneVSSM) and any(k.startswith("classifier.") for k in sd):
        if not any(k.startswith("outnorm") for k in sd):
            sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
            for i in model.out_indices:
                sd[f"outnorm{i}.weight"] = torch.ones(model.dims[i])
                sd[f"outnorm{i}.bias"] = torch.zeros(model.dims[i])
    return sd


# ----------------------------------------------------------------------------------------------
# the encoder


class VMambaEncoder(Encoder):
    """A VMamba classifier or backbone tapped at `spec.tap` (grammar in the module docstring)."""

    model: VSSM

    def __init__(self, model: VSSM, spec: EncoderSpec):
        super().__init__(model, spec)
        self.tap = parse_tap(spec.tap, model.depths)
        model.check_tap(self.tap)

    @property
    def model_config(self) -> dict:
        return {"class": type(self.model).__name__, **self.model.config}

    def forward_map(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_taps(pixels, [self.tap])[0]

    def intermediates(self, pixels: torch.Tensor, taps: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Named maps [B, C, h, w]; default: the stem, the end of every stage, and the tap."""
        self.check_input(pixels)
        if taps is None:
            taps = ["stem", *(f"stage{i}" for i in range(len(self.model.depths))), self.spec.tap]
        parsed = [parse_tap(t, self.model.depths) for t in taps]
        return dict(zip(taps, self.model.forward_taps(pixels, parsed), strict=True))

    def checkpoint_filter(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return checkpoint_filter_fn(sd, self.model)


# ----------------------------------------------------------------------------------------------
# configs: facts of the official yamls / mm configs (only what differs from build_vmamba's defaults)

_CONFIGS = {
    # classification/configs/vssm/vmambav2v_tiny_224.yaml ("vssm1_tiny_0230s", T s1l8)
    "t": dict(depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0, drop_path_rate=0.2),
    # vmambav2_tiny_224.yaml (T s2l5)
    "t-s2l5": dict(depths=(2, 2, 5, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.2),
    # vmambav2_small_224.yaml (S s2l15)
    "s": dict(depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.3),
    # vmambav2_base_224.yaml (B s2l15)
    "b": dict(depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0, drop_path_rate=0.6),
    # toy configs (ours): same code path, sized for CPU pretraining on 64 px toy images
    # toy: ssm_ratio 1.0 halves the scan work so CPU pretraining fits the toy-cpu budget
    "toy": dict(depths=(1, 1, 2, 1), dims=24, ssm_ratio=1.0, drop_path_rate=0.0, num_classes=TOY_NUM_CLASSES),
    "toy-b": dict(depths=(1, 1, 4, 1), dims=48, drop_path_rate=0.0, num_classes=TOY_NUM_CLASSES),
}
_VARIANTS = {"t": "T (s1l8)", "t-s2l5": "T (s2l5)", "s": "S (s2l15)", "b": "B (s2l15)"}
_SOURCE = "MzeroMiko/VMamba @ 2ed52ea (classification/models/vmamba.py)"
# The mm configs (detection|segmentation/configs/vssm1/*_{tiny,small,base}.py) build the same
# architectures with out_indices (0, 1, 2, 3). mmdet feeds 800x1333 padded to a multiple of 32;
# 1344 also makes the width tileable by the tap's stride 16 (on 1333 px the network's rounding-up
# convs give the same 50x84 grid; the release manifest's "4150 tokens" is floor(1333/16)=83 columns).
_DENSE_SIZE = {"coco": (800, 1344), "ade": (512, 512)}


def _size(img_size: int | Sequence[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    if img_size is None:
        return default
    if isinstance(img_size, int):
        return (img_size, img_size)
    h, w = img_size
    return (int(h), int(w))


def _create_vmamba(
    name: str,
    config: str,
    *,
    tap: str | None,
    img_size: int | Sequence[int] | None,
    input_size: tuple[int, int],
    dense: str | None = None,
    variant: str = "",
    **overrides,
) -> VMambaEncoder:
    """Builds a registered VMamba encoder; `overrides` replace official arguments (tests, ablations)."""
    kwargs = {**_CONFIGS[config], **overrides}
    model = build_vmamba_backbone(**kwargs) if dense else build_vmamba(**kwargs)
    t = parse_tap(tap or default_tap(model.depths), model.depths)
    source = _SOURCE + (f", {dense} backbone config" if dense else "")
    variant = variant or f"VMamba v2 {_VARIANTS[config]}" + (f" {dense.upper()}" if dense else "")
    spec = EncoderSpec(
        name=name,
        family="ssm",
        variant=variant,
        input_size=_size(img_size, input_size),
        tap=t.name,
        stride=t.stride,
        dim=model.dims[max(t.stage, 0)],
        policy="letterbox-corner" if dense else "letterbox-center",
        mean=MMDET_MEAN if dense else IMAGENET_MEAN,
        std=MMDET_STD if dense else IMAGENET_STD,
        source=source,
    )
    return VMambaEncoder(model, spec)


@register_encoder("vmamba-t")
def vmamba_t(tap=None, img_size=None, **kw) -> VMambaEncoder:
    return _create_vmamba("vmamba-t", "t", tap=tap, img_size=img_size, input_size=(224, 224), **kw)


@register_encoder("vmamba-t-s2l5")
def vmamba_t_s2l5(tap=None, img_size=None, **kw) -> VMambaEncoder:
    return _create_vmamba("vmamba-t-s2l5", "t-s2l5", tap=tap, img_size=img_size, input_size=(224, 224), **kw)


@register_encoder("vmamba-s")
def vmamba_s(tap=None, img_size=None, **kw) -> VMambaEncoder:
    return _create_vmamba("vmamba-s", "s", tap=tap, img_size=img_size, input_size=(224, 224), **kw)


@register_encoder("vmamba-b")
def vmamba_b(tap=None, img_size=None, **kw) -> VMambaEncoder:
    return _create_vmamba("vmamba-b", "b", tap=tap, img_size=img_size, input_size=(224, 224), **kw)


@register_encoder("vmamba-t-coco")
def vmamba_t_coco(tap=None, img_size=None, **kw) -> VMambaEncoder:
    return _create_vmamba(
        "vmamba-t-coco", "t", tap=tap, img_size=img_size, input_size=_DENSE_SIZE["coco"], dense="coco", **kw
    )


@register_encoder("vmamba-s-coco")
def vmamba_s_coco(tap=None, img_size=None, **kw) -> VMambaEncoder:
    return _create_vmamba(
        "vmamba-s-coco", "s", tap=tap, img_size=img_size, input_size=_DENSE_SIZE["coco"], dense="coco", **kw
    )


@register_encoder("vmamba-b-coco")
def vmamba_b_coco(tap=None, img_size=None, **kw) -> VMambaEncoder:
    return _create_vmamba(
        "vmamba-b-coco", "b", tap=tap, img_size=img_size, input_size=_DENSE_SIZE["coco"], dense="coco", **kw
    )


@register_encoder("vmamba-s-ade")
def vmamba_s_ade(tap=None, img_size=None, **kw) -> VMambaEncoder:
    return _create_vmamba(
        "vmamba-s-ade", "s", tap=tap, img_size=img_size, input_size=_DENSE_SIZE["ade"], dense="ade", **kw
    )


@register_encoder("toy-vmamba")
def toy_vmamba(tap=None, img_size=None, **kw) -> VMambaEncoder:
    return _create_vmamba(
        "toy-vmamba",
        "toy",
        tap=tap,
        img_size=img_size,
        input_size=(64, 64),
        variant="toy VMamba v2 (dims 24, ssm_ratio 1)",
        **kw,
    )


@register_encoder("toy-vmamba-b")
def toy_vmamba_b(tap=None, img_size=None, **kw) -> VMambaEncoder:
    return _create_vmamba(
        "toy-vmamba-b",
        "toy-b",
        tap=tap,
        img_size=img_size,
        input_size=(64, 64),
        variant="toy VMamba v2 (dims 48)",
        **kw,
    )
