"""ViT-family encoders and their controls, built on timm.

Registered names (all random-init here; weights come from local files, never downloaded):

| names                        | timm model (weights tag)                          | family | default tap |
|------------------------------|---------------------------------------------------|--------|-------------|
| vit-t, vit-s, vit-b, vit-l   | vit_{tiny,small,base,large}_patch16_224 (below)   | vit    | block-2     |
| deit-s, deit-b               | deit_{small,base}_patch16_224.fb_in1k             | vit    | block-2     |
| maxvit-t/s/b/l               | maxvit_{tiny,small,base,large}_tf_224.in1k        | vit    | stage2      |
| swin-t/s/b                   | swin_{tiny,small,base}_patch4_window7_224.ms_in1k | vit    | stage2      |
| convnext-t/s/b               | convnext_{tiny,small,base}.fb_in1k                | cnn    | stage2      |
| mambaout-t/s/b               | mambaout_{tiny,small,base}.in1k                   | cnn    | stage2      |
| efficientvim-m1..m4          | efficientvim_m{1..4}.e300_in1k                    | ssm    | stage0      |
| toy-vit(-b), toy-maxvit(-b), toy-swin, toy-mambaout(-b) | tiny configs of the same timm classes |

The ViT weights are the IN1K-only `augreg_in1k` tags where timm has them (S, B); T and L exist in
timm only as `augreg_in21k_ft_in1k` (the release's `in1kft-vit-*`). MambaOut is the control: a
gated-CNN (Mamba block without the SSM); EfficientViM is an SSM-style classifier in timm
(hidden-state mixer with state space duality), registered because timm 1.0.31 has it.

Taps (facts from the official release, raykuo18/vlm-ssm-vision-encoders):
- ViT/DeiT: the patch tokens (no CLS, no registers) of the second-to-last block, without the final
  norm: its `TimmViTBackbone` calls timm `get_intermediate_layers(n={depth - 2})` with the default
  `norm=False` (the LLaVA convention `hidden_states[-2]`). Here "block-2" = block index depth-2.
- MaxViT "stage 3" = stem + stages 0-2 (its `MaxViTBackbone` is 1-indexed), no norm: stride 16,
  196 tokens at 224. Here "stage2".
- Swin / ConvNeXt / MambaOut: the stride-16 stage (index 2) by default; EfficientViM's stem already
  has stride 16, so its stride-16 output is stage 0.

Tap grammar: "block{i}" / "block-{k}" (ViT blocks, 0-based, negative from the end), "stage{i}" /
"stage-{k}" (stages, 0-based), "stem" (MaxViT). Specs store the canonical non-negative name.

Local weights: `load_encoder(name, weights=path)` with a timm checkpoint (safetensors or .pth/.bin,
possibly inside a 'model'/'state_dict' container), or `find_local_weights(name)`, which looks in
the folder named by the environment variable VLMLAB_WEIGHTS_DIR for a file named after the timm
model tag, e.g. `vit_small_patch16_224.augreg_in1k.safetensors` (or `.pth`/`.bin`/`.pt`), or an
HF-hub style folder `vit_small_patch16_224.augreg_in1k/model.safetensors`; toy configs use their
registry name (`toy-vit.safetensors`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import timm
import torch
from timm.models import convnext, efficientvim, mambaout, maxxvit, swin_transformer, vision_transformer
from torch import nn

from vlmlab.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TOY_NUM_CLASSES,
    Encoder,
    EncoderSpec,
    create_encoder,
    list_encoders,
    register_encoder,
)
from vlmlab.encoders.checkpoints import unwrap

WEIGHTS_DIR_ENV = "VLMLAB_WEIGHTS_DIR"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")

_TAP_RE = re.compile(r"^(block|stage)(-?\d+)$")


# ----------------------------------------------------------------------------------------------
# taps


@dataclass(frozen=True)
class Tap:
    """One feature level of a timm model: its `forward_intermediates` index, stride and channels."""

    name: str  # canonical: "block3", "stage2", "stem"
    index: int  # position in model.feature_info (= forward_intermediates index)
    stride: int
    dim: int


def tap_table(model: nn.Module) -> dict[str, Tap]:
    """The taps a timm model offers, read from its `feature_info` (module 'blocks.3' -> 'block3')."""
    taps = {}
    for i, info in enumerate(model.feature_info):
        module = info["module"]
        if module == "stem":
            name = "stem"
        else:
            kind, _, idx = module.rpartition(".")
            name = ("block" if kind == "blocks" else "stage") + idx  # 'stages.k' / 'layers.k' (Swin)
        taps[name] = Tap(name, i, int(info["reduction"]), int(info["num_chs"]))
    return taps


def resolve_tap(tap: str, taps: Mapping[str, Tap]) -> str:
    """Canonical tap name for `tap` ("block-2" -> "block10" for a 12-block ViT)."""
    m = _TAP_RE.match(tap)
    if m and int(m.group(2)) < 0:
        kind, k = m.group(1), int(m.group(2))
        same_kind = [n for n in taps if n.startswith(kind)]
        if -k <= len(same_kind):
            tap = same_kind[k]
    if tap not in taps:
        raise KeyError(
            f"unknown tap {tap!r}; this model has: {', '.join(taps)} (negative indices count from the end)"
        )
    return tap


# ----------------------------------------------------------------------------------------------
# the encoder


class TimmEncoder(Encoder):
    """A timm model tapped at one feature level via its `forward_intermediates`.

    `self.model` is the whole timm model (with its head), so its state_dict is a timm checkpoint.
    The forward runs only up to the tap (`stop_early`), and intermediates are taken without the
    model's final norm.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: EncoderSpec,
        taps: dict[str, Tap],
        timm_filter: Callable | None = None,
        model_config: dict | None = None,
    ):
        super().__init__(model, spec)
        self.taps = taps
        self.timm_filter = timm_filter
        self.model_config = model_config  # shown in strict-load mismatch reports

    def _run(self, pixels: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        # forward_intermediates returns maps in forward order, whatever the order asked for
        order = sorted(set(names), key=lambda n: self.taps[n].index)
        maps = self.model.forward_intermediates(
            pixels,
            indices=[self.taps[n].index for n in order],
            norm=False,
            stop_early=True,
            intermediates_only=True,
        )
        by_name = dict(zip(order, maps, strict=True))
        return [by_name[n] for n in names]

    def forward_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """Feature map at the tap, [B, D, h, w]."""
        return self._run(pixels, [self.spec.tap])[0]

    def intermediates(self, pixels: torch.Tensor, taps: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Named maps [B, C, h, w]: every block/stage by default, else `taps` (keys as given)."""
        taps = list(self.taps) if taps is None else list(taps)
        canonical = [resolve_tap(t, self.taps) for t in taps]
        return dict(zip(taps, self._run(pixels, canonical), strict=True))

    def checkpoint_filter(self, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """timm-layout state dict for `self.model` (unwraps containers; timm's own filter adapts
        official layouts and resamples resolution-dependent tensors such as pos-embeds)."""
        sd = dict(unwrap(sd))
        if self.timm_filter is None:
            return sd
        try:
            return dict(self.timm_filter(sd, self.model))
        except (AttributeError, KeyError, RuntimeError, ValueError):
            # a checkpoint of another config (e.g. a key naming a block this model lacks): hand it
            # back unchanged so the strict load reports every missing/unexpected/mis-shaped key
            return sd


# ----------------------------------------------------------------------------------------------
# configs: facts only


@dataclass(frozen=True)
class TimmConfig:
    """What one registered encoder is: a timm architecture, its kwargs, weights tag and tap."""

    arch: str  # timm architecture, e.g. "vit_small_patch16_224"
    tag: str  # timm pretrained tag naming the weights ("" for toy configs)
    family: str  # vit | cnn | ssm
    variant: str
    tap: str  # default tap (grammar in the module docstring)
    filter_fn: Callable | None  # timm's checkpoint filter for this architecture
    kwargs: dict = field(default_factory=dict)  # overrides of timm's defaults (toy sizes)
    sized: bool = True  # the timm model takes img_size (pos-embeds, windows)
    input_size: int = 224
    toy: bool = False

    @property
    def weights_name(self) -> str:
        return f"{self.arch}.{self.tag}" if self.tag else ""


_REPO = "raykuo18/vlm-ssm-vision-encoders"
# dynamic_img_size: pos-embeds are resampled on the fly for other input sizes; same state dict
_VIT_KW = {"dynamic_img_size": True}
# toy configs: classification head for the toy "ImageNet"; no stochastic depth (one matched recipe)
_TOY_KW = {"num_classes": TOY_NUM_CLASSES, "drop_path_rate": 0.0}


def _vit(arch: str, tag: str, variant: str, **kw) -> TimmConfig:
    filt = vision_transformer.checkpoint_filter_fn
    return TimmConfig(arch, tag, "vit", variant, "block-2", filt, {**_VIT_KW, **kw})


def _maxvit(arch: str, tag: str, variant: str, **kw) -> TimmConfig:
    return TimmConfig(arch, tag, "vit", variant, "stage2", maxxvit.checkpoint_filter_fn, kw)


def _swin(arch: str, tag: str, variant: str, **kw) -> TimmConfig:
    return TimmConfig(arch, tag, "vit", variant, "stage2", swin_transformer.checkpoint_filter_fn, kw)


def _convnet(module, arch: str, tag: str, variant: str, tap: str = "stage2", family: str = "cnn", **kw):
    # these models take no img_size: nothing in them depends on the input size
    return TimmConfig(arch, tag, family, variant, tap, module.checkpoint_filter_fn, kw, sized=False)


def _toy(cfg: TimmConfig) -> TimmConfig:
    return replace(cfg, kwargs={**cfg.kwargs, **_TOY_KW}, input_size=64, toy=True)


_CONFIGS: dict[str, TimmConfig] = {
    # ViT: augreg_in1k where timm has IN1K-only weights (S, B); T and L only as in21k_ft_in1k
    "vit-t": _vit("vit_tiny_patch16_224", "augreg_in21k_ft_in1k", "ViT-T/16"),
    "vit-s": _vit("vit_small_patch16_224", "augreg_in1k", "ViT-S/16"),
    "vit-b": _vit("vit_base_patch16_224", "augreg_in1k", "ViT-B/16"),
    "vit-l": _vit("vit_large_patch16_224", "augreg_in21k_ft_in1k", "ViT-L/16"),
    "deit-s": _vit("deit_small_patch16_224", "fb_in1k", "DeiT-S/16"),
    "deit-b": _vit("deit_base_patch16_224", "fb_in1k", "DeiT-B/16"),
    "maxvit-t": _maxvit("maxvit_tiny_tf_224", "in1k", "MaxViT-T"),
    "maxvit-s": _maxvit("maxvit_small_tf_224", "in1k", "MaxViT-S"),
    "maxvit-b": _maxvit("maxvit_base_tf_224", "in1k", "MaxViT-B"),
    "maxvit-l": _maxvit("maxvit_large_tf_224", "in1k", "MaxViT-L"),
    "swin-t": _swin("swin_tiny_patch4_window7_224", "ms_in1k", "Swin-T (window 7)"),
    "swin-s": _swin("swin_small_patch4_window7_224", "ms_in1k", "Swin-S (window 7)"),
    "swin-b": _swin("swin_base_patch4_window7_224", "ms_in1k", "Swin-B (window 7)"),
    "convnext-t": _convnet(convnext, "convnext_tiny", "fb_in1k", "ConvNeXt-T"),
    "convnext-s": _convnet(convnext, "convnext_small", "fb_in1k", "ConvNeXt-S"),
    "convnext-b": _convnet(convnext, "convnext_base", "fb_in1k", "ConvNeXt-B"),
    # the control: Mamba's gated-CNN block without the SSM
    "mambaout-t": _convnet(mambaout, "mambaout_tiny", "in1k", "MambaOut-T (gated CNN, no SSM)"),
    "mambaout-s": _convnet(mambaout, "mambaout_small", "in1k", "MambaOut-S (gated CNN, no SSM)"),
    "mambaout-b": _convnet(mambaout, "mambaout_base", "in1k", "MambaOut-B (gated CNN, no SSM)"),
}
# EfficientViM (hidden-state mixer SSD): its stem has stride 16, so the stride-16 map is stage 0
for _m in (1, 2, 3, 4):
    _CONFIGS[f"efficientvim-m{_m}"] = _convnet(
        efficientvim, f"efficientvim_m{_m}", "e300_in1k", f"EfficientViM-M{_m} (HSM-SSD)", "stage0", "ssm"
    )

# Toy configs: the same timm classes at dims 16-128, cheap enough to pretrain on 2 CPU cores.
_CONFIGS["toy-vit"] = _toy(
    _vit("vit_tiny_patch16_224", "", "toy ViT (dim 64, depth 4)", embed_dim=64, depth=4, num_heads=2)
)
_CONFIGS["toy-vit-b"] = _toy(
    _vit("vit_tiny_patch16_224", "", "toy ViT-B (dim 96, depth 6)", embed_dim=96, depth=6, num_heads=4)
)
# MaxViT window = grid = img_size // 32 (timm's partition_ratio), so the last stage tiles at 32 px (1x1),
# 64 px (2x2) and 224 px (7x7); rel-pos tables follow the window and timm's filter resizes them on load.


def _sized(label: str, dims: tuple[int, ...], depths: tuple[int, ...]) -> str:
    return f"{label} (dims {dims[0]}-{dims[-1]}, depths {'-'.join(map(str, depths))})"


def _toy_maxvit(label: str, dims: tuple[int, ...], depths: tuple[int, ...]) -> TimmConfig:
    return _toy(
        _maxvit(
            "maxvit_tiny_tf_224",
            "",
            _sized(label, dims, depths),
            embed_dim=dims,
            depths=depths,
            stem_width=dims[0],
            head_hidden_size=dims[-1],
            transformer_dim_head=8,  # timm's 32 would leave a 16-d stage with no attention head
        )
    )


_CONFIGS["toy-maxvit"] = _toy_maxvit("toy MaxViT", (16, 32, 64, 128), (1, 1, 1, 1))
_CONFIGS["toy-maxvit-b"] = _toy_maxvit("toy MaxViT-B", (24, 48, 96, 192), (1, 1, 2, 1))
# Swin pads maps to its window and shrinks windows larger than the map: any multiple of 32 works.
_CONFIGS["toy-swin"] = _toy(
    _swin(
        "swin_tiny_patch4_window7_224",
        "",
        "toy Swin (dim 16, depths 1-1-2-1, window 4)",
        embed_dim=16,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 4, 8),
        window_size=4,
    )
)


def _toy_mambaout(label: str, dims: tuple[int, ...], depths: tuple[int, ...]) -> TimmConfig:
    return _toy(
        _convnet(mambaout, "mambaout_tiny", "", _sized(label, dims, depths), dims=dims, depths=depths)
    )


_CONFIGS["toy-mambaout"] = _toy_mambaout("toy MambaOut", (16, 32, 64, 96), (1, 1, 2, 1))
_CONFIGS["toy-mambaout-b"] = _toy_mambaout("toy MambaOut-B", (24, 48, 96, 192), (1, 1, 3, 1))


# ----------------------------------------------------------------------------------------------
# builders


def _norm_stats(cfg: TimmConfig) -> tuple[tuple, tuple]:
    """Mean/std the weights were trained with (timm's pretrained cfg), ImageNet's for toys."""
    if not cfg.tag:
        return IMAGENET_MEAN, IMAGENET_STD
    pcfg = timm.models.get_pretrained_cfg(cfg.weights_name)
    return tuple(pcfg.mean), tuple(pcfg.std)


def _source(cfg: TimmConfig) -> str:
    where = f"timm {cfg.weights_name}" if cfg.tag else f"timm {cfg.arch} class, toy config"
    if cfg.family == "vit" and cfg.tap.startswith("block"):
        return f"{where}; tap: {_REPO} TimmViTBackbone (get_intermediate_layers n={{depth-2}}, no norm)"
    if cfg.arch.startswith("maxvit"):
        return f"{where}; tap: {_REPO} MaxViTBackbone feature_stage=3 (stem + stages 0-2)"
    return f"{where}; tap: the stride-16 stage"


def _create(name: str, tap: str | None = None, img_size: int | None = None, **kw) -> TimmEncoder:
    """Builds the timm model of `name` with random weights and wraps it at its tap."""
    cfg = _CONFIGS[name]
    size = int(img_size or cfg.input_size)
    kwargs = {**cfg.kwargs, **kw}
    if cfg.sized:
        kwargs["img_size"] = size
    model = timm.create_model(cfg.arch, pretrained=False, **kwargs)
    taps = tap_table(model)
    tap_name = resolve_tap(tap or cfg.tap, taps)
    mean, std = _norm_stats(cfg)
    spec = EncoderSpec(
        name=name,
        family=cfg.family,
        variant=cfg.variant,
        input_size=(size, size),
        tap=tap_name,
        stride=taps[tap_name].stride,
        dim=taps[tap_name].dim,
        policy="letterbox-center",  # classification backbones: pad to square with the mean colour
        mean=mean,
        std=std,
        source=_source(cfg),
    )
    return TimmEncoder(model, spec, taps, cfg.filter_fn, model_config={"arch": cfg.arch, **kwargs})


# one registry entry per config: factory(tap=None, img_size=None, **timm_kwargs) -> TimmEncoder
for _name in _CONFIGS:
    register_encoder(_name)(partial(_create, _name))


def timm_names(toy: bool | None = None) -> list[str]:
    """Names registered by this module (only toy or only full-size configs if `toy` is given)."""
    return [n for n, c in _CONFIGS.items() if toy is None or c.toy == toy]


def timm_config(name: str) -> TimmConfig:
    """The config of a name registered here."""
    if name not in _CONFIGS:
        raise KeyError(f"{name!r} is not a timm-family encoder; known: {', '.join(_CONFIGS)}")
    return _CONFIGS[name]


# ----------------------------------------------------------------------------------------------
# local weights


def find_local_weights(name: str, weights_dir: str | Path | None = None) -> Path | None:
    """A local checkpoint for encoder `name` in $VLMLAB_WEIGHTS_DIR (or `weights_dir`), or None.

    Looks for the timm model tag (e.g. `vit_small_patch16_224.augreg_in1k`) and then the registry
    name, each as `<stem><suffix>` or as a hub-style folder `<stem>/model.safetensors`.
    """
    root = weights_dir or os.environ.get(WEIGHTS_DIR_ENV)
    if not root:
        return None
    root = Path(root)
    stems = []
    if name in _CONFIGS and _CONFIGS[name].weights_name:
        stems.append(_CONFIGS[name].weights_name)
    stems.append(name)
    for stem in stems:
        for path in [root / f"{stem}{s}" for s in WEIGHT_SUFFIXES] + [root / stem / f for f in HUB_FILES]:
            if path.is_file():
                return path
    return None


# ----------------------------------------------------------------------------------------------
# the encoder table


def encoder_table(names: Iterable[str] | None = None, img_size: int | None = None) -> list[dict]:
    """One row per encoder: name, family, variant, params, tap, stride, dim, tokens, policy.

    Models are built on the meta device (no weight memory), so vit-l or maxvit-l cost nothing;
    an encoder whose factory cannot build on meta is built on CPU instead.

    Args:
        names: registry names (default: every registered encoder).
        img_size: input size to build at (default: each encoder's native size).
    """
    rows = []
    kw = {} if img_size is None else {"img_size": img_size}
    for name in list_encoders() if names is None else names:
        try:
            with torch.device("meta"):
                enc = create_encoder(name, **kw)
        except (NotImplementedError, RuntimeError):  # an op with no meta kernel
            enc = create_encoder(name, **kw)
        s = enc.spec
        rows.append(
            {
                "name": s.name,
                "family": s.family,
                "variant": s.variant,
                "params": s.params,
                "tap": s.tap,
                "stride": s.stride,
                "dim": s.dim,
                "tokens": s.tokens,
                "input_size": s.input_size[0],
                "policy": s.policy,
            }
        )
    return rows
