"""ViTDet (detectron2 ViT) in our code against the official implementation (oracles), plus checkpoints,
the encoder contract and the toy config."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlmlab.encoders import create_encoder, list_encoders, load_encoder
from vlmlab.encoders.base import MMDET_MEAN, MMDET_STD, TOY_NUM_CLASSES
from vlmlab.encoders.checkpoints import CheckpointError, load_checkpoint
from vlmlab.encoders.vitdet import (
    VITDET_CONFIGS,
    ViT,
    build_vitdet,
    checkpoint_filter,
    get_rel_pos,
    window_partition,
    window_unpartition,
)

VARIANTS = ["B", "L", "H"]
TOYS = {"toy-vitdet": "toy", "toy-vitdet-b": "toy-b"}  # registry name -> config
TOL32 = dict(rtol=1e-4, atol=1e-4)  # the oracle README's fp32 check
TOL64 = dict(rtol=1e-9, atol=1e-9)  # its stricter fp64 check
STRING_KWARGS = ("norm_layer", "act_layer")  # written as text in the JSON; build_vitdet's defaults


def _kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in STRING_KWARGS}


def _pixels(h: int, w: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reduced(oracles):
    """The reduced official model's weights, kwargs and fixtures."""
    folder = oracles / "vitdet"
    cfg = json.loads((folder / "reduced_config.json").read_text())
    return {
        "cfg": cfg,
        "kwargs": _kwargs(cfg["kwargs"]),
        "sd": load_file(folder / "reduced.safetensors"),
        "io": load_file(folder / "reduced_io.safetensors"),
        "extra": load_file(folder / "reduced_extra.safetensors"),
    }


def _reduced_model(reduced, dtype=torch.float32) -> ViT:
    model = build_vitdet(**reduced["kwargs"])
    model.load_state_dict(reduced["sd"], strict=True)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------------------------
# 1. layout: keys, shapes, dtypes, order and parameter counts of the official configs


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_layout_matches_official(oracles, variant):
    ref = json.loads((oracles / "vitdet" / f"keys_{variant}.json").read_text())
    model = build_vitdet(**_kwargs(ref["config"]), device="meta")
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert sorted(ours) == sorted(ref["state_dict"])  # keys, shapes, dtypes
    assert ours == ref["state_dict"]  # and the official order
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    assert sum(b.numel() for b in model.buffers()) == ref["num_buffer_elements"] == 0
    global_blocks = [i for i, b in enumerate(model.blocks) if b.window_size == 0]
    assert global_blocks == ref["global_attention_block_indexes"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_registered_encoder_is_the_official_config(oracles, variant):
    ref = json.loads((oracles / "vitdet" / f"keys_{variant}.json").read_text())
    enc = create_encoder(f"vitdet-{variant.lower()}", device="meta")
    for k, v in _kwargs(ref["config"]).items():
        assert enc.model_config[k] == v, k
    assert enc.spec.params == ref["num_params"]
    assert (enc.spec.input_size, enc.spec.stride, enc.spec.dim) == (
        (1024, 1024),
        16,
        ref["config"]["embed_dim"],
    )
    assert enc.spec.tokens == 4096 and enc.spec.tap == "last_feat"
    assert enc.spec.family == "vit" and enc.spec.policy == "letterbox-corner"
    assert (enc.spec.mean, enc.spec.std) == (MMDET_MEAN, MMDET_STD)


def test_reduced_layout_matches_official(reduced):
    model = build_vitdet(**reduced["kwargs"], device="meta")
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert ours == reduced["cfg"]["state_dict_in_module_order"]
    assert sum(p.numel() for p in model.parameters()) == reduced["cfg"]["weights"]["num_params"]


# ----------------------------------------------------------------------------------------------
# 2. numerical parity with the official model


@torch.no_grad()
def test_reduced_output_matches_official_fp32(reduced):
    out = _reduced_model(reduced)(reduced["io"]["input"])["last_feat"]
    torch.testing.assert_close(out, reduced["io"]["last_feat"], **TOL32)


@torch.no_grad()
def test_reduced_output_matches_official_fp64(reduced):
    out = _reduced_model(reduced, torch.float64)(reduced["io"]["input"].double())["last_feat"]
    torch.testing.assert_close(out, reduced["io"]["last_feat_fp64"], **TOL64)


@torch.no_grad()
@pytest.mark.parametrize("which", ["sq", "rect"])
def test_reduced_intermediates_match_official(reduced, which):
    """patch_embed (before abs-pos) and every block; `rect` pads windows and resizes rel-pos/pos-embed."""
    extra = reduced["extra"]
    x = reduced["io"]["input"] if which == "sq" else extra["rect.input"]
    maps = _reduced_model(reduced).forward_intermediates(x)
    for name in ["patch_embed", *(f"blocks.{i}" for i in range(4))]:
        ref = extra[f"{which}.{name}.out"]  # (B, H, W, C)
        torch.testing.assert_close(
            maps[name].permute(0, 2, 3, 1), ref, **TOL32, msg=lambda m, n=name: f"{n}: {m}"
        )
    torch.testing.assert_close(maps["last_feat"], maps["blocks.3"], rtol=0, atol=0)


@torch.no_grad()
def test_reduced_rect_output_matches_official(reduced):
    extra = reduced["extra"]
    torch.testing.assert_close(
        _reduced_model(reduced)(extra["rect.input"])["last_feat"], extra["rect.last_feat"], **TOL32
    )
    out64 = _reduced_model(reduced, torch.float64)(extra["rect.input"].double())["last_feat"]
    torch.testing.assert_close(out64, extra["rect.last_feat_fp64"], **TOL64)


# ----------------------------------------------------------------------------------------------
# 3. helpers


def test_window_partition_pads_and_round_trips():
    x = torch.randn(2, 6, 10, 3)
    windows, padded = window_partition(x, 4)
    assert padded == (8, 12) and windows.shape == (2 * 2 * 3, 4, 4, 3)
    assert torch.equal(windows[0], x[0, :4, :4])  # first window, row-major
    assert torch.equal(windows[1], x[0, :4, 4:8])
    assert windows[5, 2:].abs().sum() == 0  # bottom-right window: rows 6,7 are padding
    assert torch.equal(window_unpartition(windows, 4, padded, (6, 10)), x)


def test_rel_pos_table_indexing_and_resize():
    table = torch.arange(7.0)[:, None].repeat(1, 2)  # entry r holds r; offset 0 sits at row 3
    r = get_rel_pos(4, table)
    assert r.shape == (4, 4, 2)
    assert r[0, 0, 0] == 3 and r[3, 0, 0] == 6 and r[0, 3, 0] == 0  # i - j + size - 1
    # a table for another size is linearly resized (a linear ramp stays a ramp, offset 0 in the middle)
    r6 = get_rel_pos(6, table)
    assert r6.shape == (6, 6, 2) and torch.allclose(torch.diagonal(r6[..., 0]), torch.full((6,), 3.0))


# ----------------------------------------------------------------------------------------------
# 4. checkpoints


def _toy_backbone_arrays(seed: int = 3) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    vit = build_vitdet(**VITDET_CONFIGS["toy"])
    return {k: (v + 0.05 * torch.randn_like(v)).numpy() for k, v in vit.state_dict().items()}


def test_detectron2_pkl_loads_via_load_encoder(tmp_path):
    arrays = _toy_backbone_arrays()
    ckpt = {
        "__author__": "Detectron2 Model Zoo",
        "matching_heuristics": True,
        "model": {
            **{f"backbone.net.{k}": v for k, v in arrays.items()},
            # the rest of a Mask R-CNN: the simple feature pyramid and the heads are dropped
            "backbone.simfp_2.0.weight": np.zeros((4, 4, 2, 2), np.float32),
            "roi_heads.box_predictor.cls_score.weight": np.zeros((81, 4), np.float32),
        },
    }
    path = tmp_path / "model_final_toy.pkl"
    path.write_bytes(pickle.dumps(ckpt))

    enc = load_encoder("toy-vitdet", weights=str(path))
    sd = enc.backbone.state_dict()
    assert set(sd) == set(arrays)
    for k, v in arrays.items():
        assert torch.equal(sd[k], torch.from_numpy(v)), k
    # the loaded encoder computes what a ViT with those weights computes
    ref = build_vitdet(**VITDET_CONFIGS["toy"])
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    x = _pixels(64, 64)
    with torch.no_grad():
        expected = ref.eval()(x)["last_feat"].flatten(2).transpose(1, 2)
        torch.testing.assert_close(enc(x), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_plain_safetensors_with_official_keys_load(reduced, oracles):
    """The oracle's reduced.safetensors is a plain official-key state dict: it loads via the filter."""
    model = build_vitdet(**reduced["kwargs"])
    enc = create_encoder("vitdet-b", device="meta")
    enc.model = model  # same encoder, reduced backbone (the registry's img_size is the input size)
    load_checkpoint(enc, oracles / "vitdet" / "reduced.safetensors")
    out = enc.eval()(reduced["io"]["input"])
    torch.testing.assert_close(out, reduced["io"]["last_feat"].flatten(2).transpose(1, 2), **TOL32)


def test_checkpoint_filter_strips_detectron2_prefix_only():
    t = torch.zeros(1)
    assert checkpoint_filter({"backbone.net.pos_embed": t, "backbone.simfp_2.0.weight": t}) == {
        "pos_embed": t
    }
    assert checkpoint_filter({"pos_embed": t}) == {"pos_embed": t}


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecExploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("exploit", [_Exploit, _ExecExploit])
def test_pickle_with_code_is_refused(tmp_path, exploit):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"backbone.net.pos_embed": exploit(marker)}}))
    with pytest.raises(
        CheckpointError, match=r"refusing to load global (posix|nt|os|builtins)\.(system|exec)"
    ):
        load_encoder("toy-vitdet", weights=str(path))
    assert not marker.exists()


def test_wrong_checkpoint_lists_mismatches(tmp_path, reduced):
    path = tmp_path / "reduced.pkl"
    path.write_bytes(
        pickle.dumps({"model": {f"backbone.net.{k}": v.numpy() for k, v in reduced["sd"].items()}})
    )
    with pytest.raises(CheckpointError, match="mis-shaped keys") as err:
        load_encoder("toy-vitdet", weights=str(path))
    assert "net.pos_embed" in str(err.value)


# ----------------------------------------------------------------------------------------------
# 5. the encoder contract on the toy config


def test_names_are_registered():
    assert {"vitdet-b", "vitdet-l", "vitdet-h", *TOYS} <= set(list_encoders())


@pytest.mark.parametrize("name", TOYS)
def test_toy_encoder_contract(name):
    enc = create_encoder(name)
    cfg = VITDET_CONFIGS[TOYS[name]]
    assert enc.spec.family == "vit" and enc.spec.policy == "letterbox-corner"
    assert sum(b.window_size == 0 for b in enc.backbone.blocks) == 1  # one global block
    # the backbone part keeps the official layout under 'net.'
    ref_keys = {f"net.{k}": v.shape for k, v in build_vitdet(**cfg, device="meta").state_dict().items()}
    ours = {k: v.shape for k, v in enc.model.state_dict().items() if k.startswith("net.")}
    assert ours == ref_keys
    assert {k for k in enc.model.state_dict() if not k.startswith("net.")} == {
        "head.norm.weight",
        "head.norm.bias",
        "head.fc.weight",
        "head.fc.bias",
    }
    enc.eval()
    for size in (32, 64, 96, 224):  # windows of 2 tile every even grid; 224 resizes rel-pos and pos-embed
        with torch.no_grad():
            tokens = enc(_pixels(size, size))
        assert tokens.shape == (2, (size // 16) ** 2, cfg["embed_dim"])
        assert torch.isfinite(tokens).all()
    with torch.no_grad():
        x = _pixels(64, 96)
        inter = enc.intermediates(x)
        assert set(inter) == {"patch_embed", "last_feat", *(f"blocks.{i}" for i in range(cfg["depth"]))}
        torch.testing.assert_close(inter["last_feat"], enc.forward_map(x), rtol=0, atol=0)
        assert enc.model(x).shape == (2, TOY_NUM_CLASSES)
    with pytest.raises(ValueError, match="multiples of 16"):
        enc(_pixels(40, 40))


@pytest.mark.parametrize("name", TOYS)
def test_toy_taps_and_grad_checkpointing(name):
    enc = create_encoder(name, tap="blocks.1")
    assert enc.spec.tap == "blocks.1"
    x = _pixels(64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc.eval().forward_map(x), enc.intermediates(x, ["blocks.1"])["blocks.1"])
    with pytest.raises(ValueError, match="unknown tap"):
        create_encoder(name, tap="blocks.19")

    model = create_encoder(name).model.train()
    y = torch.arange(2)

    def grads(ckpt: bool):
        model.zero_grad()
        model.net.set_grad_checkpointing(ckpt)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    loss0, g0 = grads(False)
    loss1, g1 = grads(True)
    torch.testing.assert_close(loss0, loss1)
    assert set(g0) == {k for k, _ in model.named_parameters()}  # every parameter gets a gradient
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
