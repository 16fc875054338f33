"""Toy dense adaptation (vlmlab.adapt): targets, what trains, checkpoints, determinism (CPU, seconds)."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vlmlab.adapt import adapt_encoder, adapt_report, detection_targets, encoder_table, segmentation_targets
from vlmlab.config import load_preset
from vlmlab.data.datasets import plan_for
from vlmlab.data.toyworld import COLOUR_NAMES, COLOURS, SHAPES
from vlmlab.encoders import create_encoder, load_encoder
from vlmlab.io import read_json
from vlmlab.train import toy_encoder_weights

# one square, drawn in [4, 20) x [0, 16) of a 48 x 36 image (letterboxed to 32 px: scale 2/3, 6 px pad on top)
OBJECT = {"shape": "square", "colour": "red", "size": "large", "square": [4, 0, 16], "box": [4, 0, 20, 16]}
SCENE = {"image_size": [48, 36], "objects": [OBJECT]}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """A smoke world and toy-vit's classification checkpoint in a temp data dir (VLMLAB_DATA)."""
    from vlmlab.data.toyworld import WORLD_PRESETS, generate_world
    from vlmlab.pretrain import pretrain_encoder

    data = tmp_path_factory.mktemp("data")
    old = os.environ.get("VLMLAB_DATA")
    os.environ["VLMLAB_DATA"] = str(data)
    generate_world(WORLD_PRESETS["smoke"], data / "toyworld" / "smoke", progress=False)
    cfg = load_preset("smoke", ["encoders=[toy-vit]"])
    pretrain_encoder(cfg, "toy-vit", device="cpu")
    yield cfg
    if old is None:
        os.environ.pop("VLMLAB_DATA")
    else:
        os.environ["VLMLAB_DATA"] = old


def _spec_and_transform():
    spec = create_encoder("toy-vit", img_size=32).spec
    tf = plan_for(tuple(SCENE["image_size"]), spec, None, 32)
    assert tf.policy == "letterbox-center" and spec.stride == 16
    return spec, tf


def test_detection_targets_of_a_hand_made_scene():
    spec, tf = _spec_and_transform()
    t = detection_targets(SCENE, tf, spec.stride)
    # input-frame box: x * 2/3, (y + 6) * 2/3 -> (2.67, 4, 13.33, 14.67); centre (8, 9.3) -> cell (0, 0)
    assert t["heat"].shape == (2, 2) and t["heat"].sum() == 1 and t["heat"][0, 0] == 1
    expected = torch.tensor([4 * 2 / 3, 6 * 2 / 3, 20 * 2 / 3, 22 * 2 / 3]) / 32
    torch.testing.assert_close(t["box"][0, 0], expected)
    label = SHAPES.index("square") * len(COLOURS) + COLOUR_NAMES.index("red")
    assert t["cls"][0, 0] == label and (t["cls"] >= 0).sum() == 1 and t["n"] == 1


def test_segmentation_targets_of_a_hand_made_scene():
    spec, tf = _spec_and_transform()
    # cell centres (8, 8), (24, 8), (8, 24), (24, 24) -> original (12, 6), (36, 6), (12, 30), (36, 30)
    labels = segmentation_targets(SCENE, tf, spec.stride)
    assert labels.tolist() == [[1 + SHAPES.index("square"), 0], [0, 0]]


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_adaptation_trains_the_backbone_keeps_the_head_and_loads_strictly(cfg, task):
    src = load_file(toy_encoder_weights(cfg, "toy-vit", "classification"))
    path = adapt_encoder(cfg, "toy-vit", task, device="cpu")
    assert path == toy_encoder_weights(cfg, "toy-vit", task)
    out = load_file(path)
    assert out.keys() == src.keys()
    changed = {k for k in src if not torch.equal(src[k], out[k])}
    assert any(k.startswith("blocks.0.") for k in changed)  # the backbone before the tap trained
    assert not any(k.startswith("head.") for k in changed)  # the classification head did not
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"encoder": "toy-vit", "world": "smoke", "init": task}
    enc = load_encoder("toy-vit", weights=str(path), img_size=32)  # strict
    assert torch.equal(enc.model.state_dict()["blocks.0.attn.qkv.weight"], out["blocks.0.attn.qkv.weight"])
    (r,) = adapt_report(cfg, ["toy-vit"], task)
    assert r["task"] == task and r["started_from"] == "toy-vit-32px.safetensors" and r["n_train"] > 0
    assert 0.0 <= r[r["metric"]] <= 1.0 and r["recipe"] == vars(cfg.pretrain)


def test_encoder_table_reads_the_saved_reports(cfg):
    adapt_encoder(cfg, "toy-vit", "detection", device="cpu")  # finished ones are skipped
    (row,) = encoder_table(cfg, ["toy-vit"])
    (det,) = adapt_report(cfg, ["toy-vit"], "detection")
    assert row["encoder"] == "toy-vit" and row["toy_det_recall50"] == det["toy_det_recall50"]
    assert 0.0 <= row["toy_top1"] <= 1.0 and row["params"] == det["params"]
    seg = toy_encoder_weights(cfg, "toy-vit", "segmentation").with_suffix(".json")
    assert (row["toy_seg_miou"] is None) == (not seg.is_file())


def test_missing_classification_checkpoint_is_a_clear_error(cfg):
    with pytest.raises(FileNotFoundError, match="data_prep/pretrain_encoders.py"):
        adapt_encoder(cfg, "toy-swin", "detection", device="cpu")


def test_same_seed_gives_an_identical_checkpoint_and_a_finished_one_is_skipped(cfg):
    path = adapt_encoder(cfg, "toy-vit", "segmentation", device="cpu")
    first, mtime = load_file(path), path.stat().st_mtime_ns
    assert adapt_encoder(cfg, "toy-vit", "segmentation", device="cpu") == path
    assert path.stat().st_mtime_ns == mtime  # same recipe from the same start: skipped
    adapt_encoder(cfg, "toy-vit", "segmentation", device="cpu", force=True)
    again = load_file(path)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert read_json(path.with_suffix(".json"))["toy_seg_miou"] >= 0.0
