"""Geometry policies: exact box maps both ways, rendering consistent with the map, crop reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmlab.geometry import MEAN_FILL, POLICIES, ImageTransform, plan

FAST = settings(max_examples=40, deadline=None, derandomize=True)  # same cases every run

sizes = st.tuples(st.integers(8, 160), st.integers(8, 160))
targets = st.one_of(st.integers(8, 96), st.tuples(st.integers(8, 96), st.integers(8, 96)))


def _close(a, b, tol=1e-9):
    scale = max(1.0, *map(abs, a), *map(abs, b))
    return all(abs(x - y) <= tol * scale for x, y in zip(a, b, strict=True))


# ---- facts of the reference implementations, computed by hand from their formulas ---------------


def test_letterbox_center_is_llava_expand2square():
    # LLaVA expand2square pastes a 64x48 image at (0, (64 - 48) // 2) = (0, 8) on a 64x64 mean canvas
    t = plan("letterbox-center", (64, 48), 64)
    assert t.scale == (1.0, 1.0) and t.offset == (0.0, 8.0) and t.out_size == (64, 64)
    assert t.fill == MEAN_FILL == (124, 116, 104)  # round(255 * ImageNet mean)
    img = Image.new("RGB", (64, 48), (10, 200, 30))
    out = np.asarray(t.apply(img))
    assert (out[:8] == MEAN_FILL).all() and (out[56:] == MEAN_FILL).all()
    assert (out[8:56] == (10, 200, 30)).all()
    assert t.content_box == (0.0, 8.0, 64.0, 56.0)
    # odd padding goes to the far side, as (S - h) // 2 floors: 5x2 -> pad top 1, bottom 2
    assert plan("letterbox-center", (5, 2), 5).offset == (0.0, 1.0)
    # then a single resize of the square to 224: x -> (x + pad) * 224 / 64
    t224 = plan("letterbox-center", (64, 48), 224)
    assert _close(t224.box_to_input((0, 0, 64, 48)), (0.0, 28.0, 224.0, 196.0))


def test_det_style_800x1333():
    # mmdet rescale_size: s = min(1333 / 640, 800 / 480) = 5 / 3; new size int(640 * 5/3 + .5) = 1067 x 800
    t = plan("letterbox-corner", (640, 480), (1333, 800))
    assert t.out_size == (1333, 800) and t.canvas == (1067, 800) and t.offset == (0.0, 0.0)
    assert _close(t.scale, (1067 / 640, 800 / 480))
    out = t.apply(Image.new("RGB", (640, 480), (255, 0, 0)))
    assert out.size == (1333, 800)
    a = np.asarray(out)
    assert (a[:, 1067:] == MEAN_FILL).all() and (a[:, :1066] == (255, 0, 0)).all()
    # portrait: s = min(1333 / 480, 800 / 640) = 1.25 -> 600 x 800, padded right
    tp = plan("letterbox-corner", (480, 640), (1333, 800))
    assert tp.canvas == (600, 800)
    assert _close(tp.box_to_input((48, 64, 96, 128)), (60.0, 80.0, 120.0, 160.0))
    assert plan("letterbox-corner", (10, 10), 20, fill=0).fill == (0, 0, 0)


def test_resize_crop_is_torchvision_resize_centercrop():
    # Resize(256): 640x480 -> int(256 * 640 / 480) = 341 x 256; CenterCrop(224): round(58.5) = 58, 16
    t = plan("resize-crop", (640, 480), 224)
    assert t.canvas == (341, 256) and t.paste == (58, 16) and t.offset == (-58.0, -16.0)
    assert t.apply(Image.new("RGB", (640, 480))).size == (224, 224)
    assert plan("resize-crop", (640, 480), 224, resize_to=224).canvas == (298, 224)


def test_center_crop_definition():
    # the centred 60x60 square of a 100x60 image (x from 20), resized to 30: x -> (x - 20) / 2
    t = plan("center-crop", (100, 60), 30)
    assert t.canvas == (60, 60) and t.paste == (20, 0)
    assert _close(t.box_to_input((20, 0, 80, 60)), (0.0, 0.0, 30.0, 30.0))
    # non-square target 40x20 on 100x60: largest 2:1 centred region is 100x50 at y = 5
    t2 = plan("center-crop", (100, 60), (40, 20))
    assert t2.canvas == (100, 50) and t2.paste == (0, 5)


def test_crop_reports_cropped_boxes():
    t = plan("resize-crop", (300, 100), 100)  # short side -> 114, crop x from round((342 - 100) / 2)
    left = t.box_to_input((0, 10, 30, 60))  # far left of a wide image: cropped away
    assert left[0] < 0 and left[2] < 0  # unclipped, reported as is
    clipped, frac = t.clip_box(left)
    assert frac == 0.0 and clipped[0] == clipped[2] == 0.0
    partial = t.box_to_input((100, 10, 160, 60))
    clipped, frac = t.clip_box(partial)
    assert 0.0 < frac < 1.0 and clipped[0] == 0.0 and partial[0] < 0
    assert t.visible_fraction(partial) == frac
    centre = t.box_to_input((140, 20, 160, 80))
    assert t.visible_fraction(centre) == 1.0 and t.clip_box(centre)[0] == centre
    with pytest.raises(ValueError, match="degenerate"):
        t.clip_box((5, 5, 5, 9))


def test_errors():
    with pytest.raises(ValueError, match="known: letterbox-center"):
        plan("squash", (10, 10), 10)
    with pytest.raises(ValueError, match="planned for an image of size"):
        plan("resize-naive", (10, 12), 10).apply(Image.new("RGB", (12, 10)))
    with pytest.raises(ValueError, match="resize_to"):
        plan("letterbox-center", (10, 10), 10, resize_to=12)


# ---- properties over every policy -----------------------------------------------------------------


@FAST
@given(
    policy=st.sampled_from(POLICIES),
    size=sizes,
    target=targets,
    box=st.tuples(*[st.floats(-50, 250, allow_nan=False)] * 4),
)
def test_round_trips_are_exact(policy, size, target, box):
    t = plan(policy, size, target)
    b = (min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3]))
    assert _close(t.box_to_original(t.box_to_input(b)), b)
    assert _close(t.box_to_input(t.box_to_original(b)), b)
    assert _close(t.point_to_original(t.point_to_input(b[:2])), b[:2])
    assert _close(t.normalized_to_box(t.box_to_normalized(b)), b)
    # the record survives JSON
    t2 = ImageTransform.from_dict(json.loads(json.dumps(t.to_dict())))
    assert t2 == t
    # the whole image maps inside the frame for the letterbox policies, onto it for resize-naive
    full = t.box_to_input((0, 0, *size))
    W, H = t.out_size
    if policy.startswith("letterbox"):
        assert full[0] >= -1e-9 and full[1] >= -1e-9 and full[2] <= W + 1e-9 and full[3] <= H + 1e-9
    if policy == "resize-naive":
        assert _close(full, (0, 0, W, H))
    if policy in ("resize-crop", "center-crop"):  # the frame is covered by the image
        assert full[0] <= 1e-9 and full[1] <= 1e-9 and full[2] >= W - 1e-9 and full[3] >= H - 1e-9


@FAST
@given(
    policy=st.sampled_from(POLICIES),
    size=st.tuples(st.integers(16, 160), st.integers(16, 160)),
    target=targets,
    frac=st.tuples(st.floats(0, 0.8), st.floats(0, 0.8), st.floats(0.15, 1), st.floats(0.15, 1)),
)
def test_drawn_box_lands_where_the_map_says(policy, size, target, frac):
    w, h = size
    x1, y1 = int(frac[0] * w), int(frac[1] * h)
    x2, y2 = min(w, x1 + max(4, int(frac[2] * (w - x1)))), min(h, y1 + max(4, int(frac[3] * (h - y1))))
    t = plan(policy, size, target)
    (cx1, cy1, cx2, cy2), vis = t.clip_box(t.box_to_input((x1, y1, x2, y2)))
    # need a few output pixels of it and a few input pixels per output pixel edge to see it at all
    assume(vis > 0 and cx2 - cx1 >= 4 and cy2 - cy1 >= 4)
    img = Image.new("RGB", size, (100, 100, 100))
    img.paste((255, 0, 255), (x1, y1, x2, y2))
    out = t.apply(img)
    assert out.size == t.out_size
    a = np.asarray(out).astype(int)
    # "magenta" = more than halfway from the background (or the pad colour) to magenta
    mask = ((a[..., 0] - a[..., 1]) > 127) & ((a[..., 2] - a[..., 1]) > 127)
    ys, xs = np.nonzero(mask)
    assert len(xs), "the drawn box vanished"
    got = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # continuous edges of the pixel run
    tol = 1.0  # resampling moves a 50% edge by <= ~0.6 px (measured over 2000 random cases)
    assert all(abs(g - e) <= tol for g, e in zip(got, (cx1, cy1, cx2, cy2), strict=True)), (
        got,
        (cx1, cy1, cx2, cy2),
    )
