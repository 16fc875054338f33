"""Image geometry policies: how an original image becomes the encoder's input, and how boxes follow.

Every image that enters a model goes through one named policy. `plan(policy, size, target)` returns
an `ImageTransform`: a small JSON-able record of an axis-aligned affine map

    input = original * scale + offset        (per axis: x_in = x * sx + ox, y_in = y * sy + oy)

together with `apply(image)`, which renders the input image so that this map is exact.

Pixel convention: continuous coordinates, pixel i spans [i, i + 1); a box (x1, y1, x2, y2) covers
[x1, x2) x [y1, y2), so the tight box of pixel columns a..b is x1 = a, x2 = b + 1. PIL's resize uses
the same convention (output pixel centre (i + 0.5) samples input (i + 0.5) * in / out), so a resize
from w to W maps x -> x * W / w exactly, and pads/crops by whole pixels are exact shifts.

Policies (size = (width, height) of the original; target = int (square) or (width, height)):

- "letterbox-center"  pad to the target's aspect ratio (a square for an int target) with `fill`,
  image centred with LLaVA's integer offsets ((S - w) // 2), then resize to the target (bicubic).
  This is LLaVA-1.5's `expand2square` + CLIP resize, used by the paper for classification backbones;
  `fill` is the encoder's normalisation mean * 255.
- "letterbox-corner"  resize keeping the aspect ratio to fit inside target W x H (new size
  int(w * s + 0.5), as mmdet's `rescale_size`), then pad right/bottom to exactly W x H (det/seg
  style, e.g. target (1333, 800)). mmdet/detectron2 pad the *normalised* tensor with 0, i.e. the mean
  colour in pixel space, so the default `fill` is the mean colour here too. Note: mmdet's keep-ratio
  scale (1333, 800) bounds the long/short edges; here the bound is the fixed W x H canvas the encoder
  needs, which is the same thing for landscape images.
- "resize-naive"      resize to the target ignoring the aspect ratio.
- "resize-crop"       resize the short side to `resize_to` (default round(T * 256 / 224), T the target
  side, or its longer side for a non-square target so the crop always fits),
  long side int(resize_to * long / short) (torchvision `Resize(int)`), then centre-crop the target
  with torchvision's offsets int(round((h - th) / 2)). The timm/ImageNet evaluation transform.
- "center-crop"       crop the largest centred region with the target's aspect ratio (the centred
  square of side min(w, h) for an int target; offsets (w - cw) // 2, (h - ch) // 2), then resize it
  to the target.

Boxes are never silently clipped: `box_to_input` returns the unclipped box (it may leave the frame
for the cropping policies); `visible_fraction` / `clip_box` report how much of it the model sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmlab.encoders.base import IMAGENET_MEAN

POLICIES = ("letterbox-center", "letterbox-corner", "resize-naive", "resize-crop", "center-crop")

# LLaVA's expand2square colour: the ImageNet mean * 255, rounded (= mmdet's mean, which is the same).
MEAN_FILL: tuple[int, int, int] = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# mmdet and detectron2 resize bilinearly; LLaVA/CLIP and timm's eval transforms bicubically.
_DEFAULT_RESAMPLE = {"letterbox-corner": "bilinear"}

Box = tuple[float, float, float, float]
Point = tuple[float, float]


def _fill_rgb(fill: int | Sequence[int] | None) -> tuple[int, int, int]:
    if fill is None:
        return MEAN_FILL
    if isinstance(fill, int | np.integer):
        return (int(fill),) * 3
    rgb = tuple(int(c) for c in fill)
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"fill must be an int or an RGB triple of 0..255, got {fill!r}")
    return rgb  # type: ignore[return-value]


def _box(box: Sequence[float]) -> Box:
    if len(box) != 4:
        raise ValueError(f"a box is (x1, y1, x2, y2), got {box!r}")
    return tuple(float(v) for v in box)  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageTransform:
    """An exact axis-aligned map original -> input frame: input = original * scale + offset.

    Args:
        policy: one of POLICIES.
        in_size: (width, height) of the original image.
        out_size: (width, height) of the model input.
        scale: (sx, sy).
        offset: (ox, oy), in input pixels.
        fill: RGB of the padding.
        resample: PIL filter name used by `apply`.
        canvas: how `apply` renders (width, height): the padded canvas ("letterbox-center"), the
            resized image ("letterbox-corner", "resize-crop", "resize-naive") or the crop ("center-crop").
        paste: top-left (x, y) of the image on the padded canvas ("letterbox-center") or of the crop
            in the resized ("resize-crop") or original ("center-crop") image.
    """

    policy: str
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    scale: tuple[float, float]
    offset: tuple[float, float]
    fill: tuple[int, int, int] = MEAN_FILL
    resample: str = "bicubic"
    canvas: tuple[int, int] = (0, 0)
    paste: tuple[int, int] = (0, 0)

    # ---- rendering -------------------------------------------------------------------------
    def apply(self, image: Image.Image) -> Image.Image:
        """Renders the model input (RGB, `out_size`) from the original image."""
        if image.size != tuple(self.in_size):
            raise ValueError(f"{self.policy}: planned for an image of size {self.in_size}, got {image.size}")
        if image.mode != "RGB":
            image = image.convert("RGB")
        resample = _RESAMPLE[self.resample]
        w, h = self.in_size
        W, H = self.out_size
        if self.policy == "letterbox-center":  # pad (exact shift), then one resize of the whole canvas
            canvas = Image.new("RGB", self.canvas, self.fill)
            canvas.paste(image, self.paste)
            return canvas if canvas.size == (W, H) else canvas.resize((W, H), resample)
        if self.policy == "letterbox-corner":  # resize (exact scale), then pad right/bottom
            resized = image if self.canvas == (w, h) else image.resize(self.canvas, resample)
            out = Image.new("RGB", (W, H), self.fill)
            out.paste(resized, (0, 0))
            return out
        if self.policy == "resize-naive":
            return image if (w, h) == (W, H) else image.resize((W, H), resample)
        if self.policy == "resize-crop":  # resize, then crop whole pixels
            resized = image if self.canvas == (w, h) else image.resize(self.canvas, resample)
            x, y = self.paste
            return resized.crop((x, y, x + W, y + H))
        if self.policy == "center-crop":  # crop whole pixels, then resize the crop
            x, y = self.paste
            cw, ch = self.canvas
            crop = image.crop((x, y, x + cw, y + ch))
            return crop if (cw, ch) == (W, H) else crop.resize((W, H), resample)
        raise ValueError(f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}")

    # ---- coordinates -----------------------------------------------------------------------
    def point_to_input(self, point: Sequence[float]) -> Point:
        x, y = point
        return (x * self.scale[0] + self.offset[0], y * self.scale[1] + self.offset[1])

    def point_to_original(self, point: Sequence[float]) -> Point:
        x, y = point
        return ((x - self.offset[0]) / self.scale[0], (y - self.offset[1]) / self.scale[1])

    def box_to_input(self, box: Sequence[float]) -> Box:
        """Original-pixel box -> input-frame box, unclipped (see `clip_box`)."""
        x1, y1, x2, y2 = _box(box)
        return (*self.point_to_input((x1, y1)), *self.point_to_input((x2, y2)))

    def box_to_original(self, box: Sequence[float]) -> Box:
        x1, y1, x2, y2 = _box(box)
        return (*self.point_to_original((x1, y1)), *self.point_to_original((x2, y2)))

    def box_to_normalized(self, box: Sequence[float]) -> Box:
        """Input-frame box -> [0, 1] coordinates relative to `out_size` (LLaVA-1.5's answer frame)."""
        x1, y1, x2, y2 = _box(box)
        W, H = self.out_size
        return (x1 / W, y1 / H, x2 / W, y2 / H)

    def normalized_to_box(self, box: Sequence[float]) -> Box:
        """[0, 1] coordinates relative to `out_size` -> input-frame box."""
        x1, y1, x2, y2 = _box(box)
        W, H = self.out_size
        return (x1 * W, y1 * H, x2 * W, y2 * H)

    @property
    def content_box(self) -> Box:
        """The part of the input frame that shows the image (excludes letterbox padding)."""
        return self.clip_box(self.box_to_input((0, 0, *self.in_size)))[0]

    def clip_box(self, box: Sequence[float]) -> tuple[Box, float]:
        """Input-frame box -> (box clipped to the frame, fraction of its area inside the frame).

        A box entirely outside the frame clips to a zero-area box with fraction 0.0.
        """
        x1, y1, x2, y2 = _box(box)
        if not (x2 > x1 and y2 > y1):
            raise ValueError(f"degenerate box {box!r} (need x1 < x2, y1 < y2)")
        W, H = self.out_size
        cx1, cx2 = min(max(x1, 0.0), W), min(max(x2, 0.0), W)
        cy1, cy2 = min(max(y1, 0.0), H), min(max(y2, 0.0), H)
        frac = ((cx2 - cx1) * (cy2 - cy1)) / ((x2 - x1) * (y2 - y1))
        return (cx1, cy1, cx2, cy2), frac

    def visible_fraction(self, box: Sequence[float]) -> float:
        """Fraction of an input-frame box's area that lies inside the input frame."""
        return self.clip_box(box)[1]

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageTransform:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def _target_wh(target: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(target, int | np.integer):
        W = H = int(target)
    else:
        W, H = (int(v) for v in target)
    if W <= 0 or H <= 0:
        raise ValueError(f"target must be positive, got {target!r}")
    return W, H


def plan(
    policy: str,
    size: Sequence[int],
    target: int | Sequence[int],
    fill: int | Sequence[int] | None = None,
    *,
    resize_to: int | None = None,
    resample: str | None = None,
) -> ImageTransform:
    """Plans how an image of `size` = (width, height) becomes a model input of `target`.

    Args:
        policy: one of POLICIES (see the module docstring).
        size: (width, height) of the original image (PIL's `image.size`).
        target: int for a square input, or (width, height), e.g. (1333, 800) for the det style.
        fill: padding colour, an int or RGB triple; default the ImageNet mean (124, 116, 104).
        resize_to: "resize-crop" only: short side before the crop (default round(T * 256 / 224)).
        resample: PIL filter name; default bilinear for "letterbox-corner", bicubic otherwise.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown geometry policy {policy!r}; known: {', '.join(POLICIES)}")
    w, h = (int(v) for v in size)
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {size!r}")
    W, H = _target_wh(target)
    rgb = _fill_rgb(fill)
    resample = resample or _DEFAULT_RESAMPLE.get(policy, "bicubic")
    if resample not in _RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; known: {', '.join(_RESAMPLE)}")
    common = dict(policy=policy, in_size=(w, h), out_size=(W, H), fill=rgb, resample=resample)
    if resize_to is not None and policy != "resize-crop":
        raise ValueError("resize_to only applies to the 'resize-crop' policy")

    if policy == "letterbox-center":
        # smallest canvas with the target's aspect ratio holding the image (ceil in integers)
        cw, ch = max(w, -(-h * W // H)), max(h, -(-w * H // W))
        px, py = (cw - w) // 2, (ch - h) // 2  # LLaVA expand2square: (width - height) // 2
        sx, sy = W / cw, H / ch
        return ImageTransform(
            **common, scale=(sx, sy), offset=(px * sx, py * sy), canvas=(cw, ch), paste=(px, py)
        )
    if policy == "letterbox-corner":
        s = min(W / w, H / h)
        nw, nh = min(int(w * s + 0.5), W), min(int(h * s + 0.5), H)  # mmcv rescale_size rounding
        return ImageTransform(**common, scale=(nw / w, nh / h), offset=(0.0, 0.0), canvas=(nw, nh))
    if policy == "resize-naive":
        return ImageTransform(**common, scale=(W / w, H / h), offset=(0.0, 0.0), canvas=(W, H))
    if policy == "resize-crop":
        # the ImageNet 256/224 ratio; on the long side of a non-square target so the crop always fits
        r = int(resize_to) if resize_to is not None else int(round(max(W, H) * 256 / 224))
        # torchvision Resize(int): short side -> r, long side int(r * long / short)
        nw, nh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
        if nw < W or nh < H:
            raise ValueError(f"resize-crop: resized {nw}x{nh} is smaller than the crop {W}x{H}")
        x0, y0 = int(round((nw - W) / 2.0)), int(round((nh - H) / 2.0))  # torchvision CenterCrop
        sx, sy = nw / w, nh / h
        return ImageTransform(
            **common, scale=(sx, sy), offset=(-float(x0), -float(y0)), canvas=(nw, nh), paste=(x0, y0)
        )
    # center-crop: largest centred region with the target's aspect ratio, then resize
    cw, ch = min(w, h * W // H), min(h, w * H // W)
    cw, ch = max(cw, 1), max(ch, 1)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    sx, sy = W / cw, H / ch
    return ImageTransform(
        **common, scale=(sx, sy), offset=(-x0 * sx, -y0 * sy), canvas=(cw, ch), paste=(x0, y0)
    )


def plan_for_spec(spec: Any, size: Sequence[int], policy: str | None = None) -> ImageTransform:
    """`plan` for an encoder spec: its policy, input size ((H, W) in the spec) and mean colour as fill.

    Args:
        spec: an `EncoderSpec` (anything with `policy`, `input_size` (H, W) and `mean` in [0, 1]).
        size: (width, height) of the original image.
        policy: overrides the spec's default policy (e.g. the "square input geometry" stabilization).
    """
    H, W = spec.input_size
    fill = tuple(int(round(255 * m)) for m in spec.mean)
    return plan(policy or spec.policy, size, (W, H), fill)


def to_pixels(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> normalised float32 tensor [3, H, W] ((x / 255 - mean) / std)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def format_box(box01) -> str:
    """A normalised box as LLaVA-1.5 writes it in answers: "[0.12, 0.34, 0.56, 0.78]" (clamped to [0, 1])."""
    return "[" + ", ".join(f"{min(max(float(v), 0.0), 1.0):.2f}" for v in box01) + "]"
