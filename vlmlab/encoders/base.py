"""The Encoder contract and the encoder registry.

An encoder is a frozen vision backbone tapped at one feature level:
`enc(pixels [B,3,H,W]) -> tokens [B,N,D]`, row-major over the tapped grid.
`enc.model` is the full network in its official key layout (with its head where the official
model has one), so its `state_dict()` is exactly an official checkpoint and toy pretraining can
train the head. What the encoder is (family, size, tap, geometry) lives in `enc.spec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# mmdet / mmseg / detectron2 pixel statistics (0-255 scale divided by 255 here)
MMDET_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
MMDET_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)

FAMILIES = ("ssm", "hybrid", "vit", "cnn")


@dataclass(frozen=True)
class EncoderSpec:
    """Facts about one registered encoder (what), apart from how it is built."""

    name: str  # registry id, e.g. "vmamba-s", "toy-vit"
    family: str  # ssm | hybrid | vit | cnn
    variant: str  # human-readable size/config, e.g. "VMamba v2 S (s2l15)"
    input_size: tuple[int, int]  # (H, W) the encoder is fed
    tap: str  # e.g. "stage2.layer14+norm", "block-2"
    stride: int  # stride of the tapped grid in input pixels
    dim: int  # channels of the tapped tokens
    policy: str = "letterbox-center"  # default geometry policy (vlmlab.geometry)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    params: int = 0  # parameters of the full model (filled in by load_encoder)
    source: str = ""  # where the architecture facts come from

    @property
    def grid(self) -> tuple[int, int]:
        return (self.input_size[0] // self.stride, self.input_size[1] // self.stride)

    @property
    def tokens(self) -> int:
        h, w = self.grid
        return h * w

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens"] = self.tokens
        return d


class Encoder(nn.Module):
    """A vision backbone tapped at one level. Subclasses implement `forward_map`."""

    spec: EncoderSpec

    def __init__(self, model: nn.Module, spec: EncoderSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """Feature map at the tap, [B, D, h, w]."""
        raise NotImplementedError

    def intermediates(self, pixels: torch.Tensor, taps: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Named feature maps ([B, C, h, w]) for probing; default: just the tap."""
        out = {self.spec.tap: self.forward_map(pixels)}
        return out if taps is None else {k: v for k, v in out.items() if k in taps}

    def check_input(self, pixels: torch.Tensor) -> None:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"{self.spec.name}: expected pixels [B,3,H,W], got {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        s = self.spec.stride
        if h % s or w % s:
            raise ValueError(
                f"{self.spec.name}: image size {h}x{w} cannot be tiled by the tap's stride {s}; use sizes "
                f"that are multiples of {s} (native {self.spec.input_size[0]}x{self.spec.input_size[1]})"
            )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        fmap = self.forward_map(pixels)
        return fmap.flatten(2).transpose(1, 2)  # [B, h*w, D], row-major


class BackboneEncoder(Encoder):
    """An encoder whose `model` is an official backbone, or a toy classifier that holds the backbone
    under `backbone_prefix` (e.g. 'net.') so toy pretraining can train a head.

    Subclasses set `official_filter(sd)` (official checkpoint keys -> backbone keys).
    """

    official_filter = staticmethod(dict)

    def __init__(self, model: nn.Module, spec: EncoderSpec, model_config: dict, backbone_prefix: str = ""):
        super().__init__(model, spec)
        self.model_config = model_config
        self._backbone_prefix = backbone_prefix
        self.feature_info = self.backbone.feature_info

    def checkpoint_filter(self, sd):
        """Checkpoint keys -> `self.model` keys (used by `checkpoints.load_checkpoint`).

        A toy classifier's own checkpoint (keys under the prefix, plus 'head.*') passes through; a
        backbone-only one goes under the prefix and keeps the model's current head, which the
        encoder never uses (the backbone part still loads strictly).
        """
        prefix = self._backbone_prefix
        if not prefix:
            return type(self).official_filter(sd)
        if any(k.startswith(prefix) for k in sd):
            return dict(sd)
        out = {f"{prefix}{k}": v for k, v in type(self).official_filter(sd).items()}
        for k, v in self.model.state_dict().items():
            if not k.startswith(prefix):
                out.setdefault(k, v)
        return out

    @property
    def backbone(self) -> nn.Module:
        prefix = self._backbone_prefix.rstrip(".")
        return self.model.get_submodule(prefix) if prefix else self.model


# ----------------------------------------------------------------------------------------------
# registry: name -> factory(weights=None, tap=None, **kwargs) -> Encoder (weights not yet loaded)

_REGISTRY: dict[str, Callable[..., Encoder]] = {}


def register_encoder(name: str) -> Callable:
    def deco(fn: Callable[..., Encoder]) -> Callable[..., Encoder]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _import_families() -> None:
    # importing a family module registers its encoders
    from vlmlab.encoders import mambavision, timm_family, vit_adapter, vitdet, vmamba  # noqa: F401


def list_encoders() -> list[str]:
    _import_families()
    return sorted(_REGISTRY)


def create_encoder(name: str, tap: str | None = None, **kwargs) -> Encoder:
    """Builds an encoder with random weights (train mode, not frozen) — for pretraining."""
    _import_families()
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    enc = _REGISTRY[name](tap=tap, **kwargs)
    n = sum(p.numel() for p in enc.model.parameters())
    object.__setattr__(enc, "spec", _with_params(enc.spec, n))
    return enc


def _with_params(spec: EncoderSpec, n: int) -> EncoderSpec:
    from dataclasses import replace

    return replace(spec, params=n)


def config_repr(cfg) -> dict:
    """A model config as plain data (for error messages and saved runs)."""
    plain = (int, float, str, bool, list, tuple, type(None))
    return {k: (v if isinstance(v, plain) else repr(v)) for k, v in cfg.items()}


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_encoder(name: str, weights: str | None = None, tap: str | None = None, **kwargs) -> Encoder:
    """The encoder `name`, tapped at `tap` (default: the paper's tap), frozen, in eval mode.

    `weights` is a local checkpoint in the family's official layout (safetensors, .pth/.pt read with
    weights_only=True, or detectron2 .pkl); it is loaded strictly (see `checkpoints.load_checkpoint`).
    """
    from vlmlab.encoders.checkpoints import load_checkpoint

    enc = create_encoder(name, tap=tap, **kwargs)
    if weights is not None:
        load_checkpoint(enc, weights)
    return freeze(enc)


# Classes of the toy "ImageNet" (vlmlab.data.toyworld: shape x colour of the largest object);
# toy encoder configs size their classification head with it.
TOY_NUM_CLASSES = 36
