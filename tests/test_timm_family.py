"""timm-built ViT-family encoders: registry loop over the toys, paper taps, weights loading."""

from __future__ import annotations

import pytest
import torch

from vlmlab.encoders import create_encoder, list_encoders, load_encoder
from vlmlab.encoders.checkpoints import CheckpointError, save_safetensors
from vlmlab.encoders.timm_family import (
    WEIGHTS_DIR_ENV,
    encoder_table,
    find_local_weights,
    timm_config,
    timm_names,
)

TOYS = timm_names(toy=True)


def _pixels(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def toy_encoders() -> dict:
    torch.manual_seed(0)
    return {name: create_encoder(name).eval() for name in TOYS}


def test_toys_are_registered():
    assert {f"toy-{n}{b}" for n in ("vit", "maxvit", "mambaout") for b in ("", "-b")} <= set(TOYS)
    assert set(TOYS) <= set(list_encoders())


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", TOYS)
def test_toy_tokens_shape_and_finite(name, size):
    torch.manual_seed(0)
    enc = create_encoder(name, img_size=size).eval()
    with torch.no_grad():
        tokens = enc(_pixels(size))
    assert enc.spec.stride == 16
    assert enc.spec.input_size == (size, size)
    assert tokens.shape == (2, (size // 16) ** 2, enc.spec.dim)
    assert enc.spec.tokens == tokens.shape[1]
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize("name", ["toy-maxvit", "toy-maxvit-b"])
def test_toy_maxvit_runs_at_224(name):
    enc = create_encoder(name, img_size=224).eval()
    with torch.no_grad():
        tokens = enc(_pixels(224, batch=1))
    assert tokens.shape == (1, 196, enc.spec.dim)
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize("name", TOYS)
def test_intermediates_consistent_with_forward(name, toy_encoders):
    enc = toy_encoders[name]
    x = _pixels(64)
    with torch.no_grad():
        fmap = enc.forward_map(x)
        every = enc.intermediates(x)
        tokens = enc(x)
    assert enc.spec.tap in every
    assert len(every) == len(enc.taps)
    torch.testing.assert_close(every[enc.spec.tap], fmap)
    # tokens are the map flattened row-major
    torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2))
    # asking for a subset, in any order and by alias, keeps the requested names
    kind = enc.spec.tap.rstrip("0123456789")
    with torch.no_grad():
        some = enc.intermediates(x, taps=[f"{kind}-1", enc.spec.tap])
    assert list(some) == [f"{kind}-1", enc.spec.tap]
    torch.testing.assert_close(some[enc.spec.tap], fmap)
    last = [n for n in enc.taps if n.startswith(kind)][-1]
    torch.testing.assert_close(some[f"{kind}-1"], every[last])


@pytest.mark.parametrize("name", ["toy-vit", "toy-maxvit"])
def test_gradient_checkpointing_gives_the_same_tokens(name, toy_encoders):
    enc = toy_encoders[name]
    x = _pixels(64)
    with torch.no_grad():
        plain = enc(x)
    enc.model.set_grad_checkpointing(True)
    try:
        with torch.no_grad():
            ckpt = enc(x)
    finally:
        enc.model.set_grad_checkpointing(False)
    torch.testing.assert_close(ckpt, plain)


def test_vit_tap_is_the_release_call(toy_encoders):
    # the release's TimmViTBackbone: get_intermediate_layers(n={depth - 2}), default norm=False
    enc = toy_encoders["toy-vit"]
    x = _pixels(64)
    depth = len(enc.model.blocks)
    with torch.no_grad():
        (ref,) = enc.model.get_intermediate_layers(x, n={depth - 2})
        normed = enc.model.norm(ref)
        tokens = enc(x)
    assert enc.spec.tap == f"block{depth - 2}"
    torch.testing.assert_close(tokens, ref)
    assert not torch.allclose(tokens, normed)  # the tap is taken before the final norm


def test_maxvit_tap_is_stem_and_three_stages(toy_encoders):
    # the release's MaxViTBackbone "stage 3": stem, then stages 0..2 (1-indexed feature_stage=3)
    enc = toy_encoders["toy-maxvit"]
    x = _pixels(64)
    with torch.no_grad():
        ref = enc.model.stem(x)
        for stage in enc.model.stages[:3]:
            ref = stage(ref)
        fmap = enc.forward_map(x)
    torch.testing.assert_close(fmap, ref)


def test_vit_s_paper_tap_at_224():
    torch.manual_seed(0)
    enc = load_encoder("vit-s")
    with torch.no_grad():
        tokens = enc(_pixels(224, batch=1))
        (ref,) = enc.model.get_intermediate_layers(_pixels(224, batch=1), n={10})
    assert enc.spec.tap == "block10"
    assert tokens.shape == (1, 196, 384)
    torch.testing.assert_close(tokens, ref)
    assert "vit_small_patch16_224.augreg_in1k" in enc.spec.source
    assert enc.spec.mean == (0.5, 0.5, 0.5)  # augreg weights are trained with 0.5 mean/std


def test_maxvit_t_paper_tap_on_meta():
    with torch.device("meta"):
        enc = create_encoder("maxvit-t")
        tokens = enc(torch.empty(1, 3, 224, 224))
    assert (enc.spec.tap, enc.spec.stride, enc.spec.dim, enc.spec.tokens) == ("stage2", 16, 256, 196)
    assert tokens.shape == (1, 196, 256)
    assert "maxvit_tiny_tf_224.in1k" in enc.spec.source


def test_paper_parameter_counts():
    # the study's table: vit-s 22M, maxvit-t 31M (timm's full models, heads included)
    rows = {r["name"]: r for r in encoder_table(["vit-s", "maxvit-t", "vit-l"])}
    assert round(rows["vit-s"]["params"] / 1e6) == 22
    assert round(rows["maxvit-t"]["params"] / 1e6) == 31
    assert rows["vit-l"]["tap"] == "block22"  # second-to-last of 24 blocks
    assert all(r["tokens"] == 196 for r in rows.values())


def test_encoder_table_matches_specs(toy_encoders):
    rows = encoder_table(TOYS)
    assert [r["name"] for r in rows] == TOYS
    for r in rows:
        s = toy_encoders[r["name"]].spec
        assert (r["family"], r["tap"], r["stride"], r["dim"], r["tokens"]) == (
            s.family,
            s.tap,
            s.stride,
            s.dim,
            s.tokens,
        )
        assert r["params"] == sum(p.numel() for p in toy_encoders[r["name"]].model.parameters())
    with_size = encoder_table(["toy-vit"], img_size=128)
    assert with_size[0]["tokens"] == 64


@pytest.mark.parametrize("name", TOYS)
def test_safetensors_round_trip_and_frozen(name, toy_encoders, tmp_path):
    src = toy_encoders[name]
    path = tmp_path / f"{name}.safetensors"
    save_safetensors(src.model.state_dict(), path)
    enc = load_encoder(name, weights=str(path))
    assert not enc.training and not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())
    x = _pixels(64)
    tokens = enc(x)
    assert not tokens.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(tokens, src(x))


def test_container_checkpoint_loads(toy_encoders, tmp_path):
    src = toy_encoders["toy-mambaout"]
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": src.model.state_dict(), "epoch": 3}, path)
    enc = load_encoder("toy-mambaout", weights=str(path))
    x = _pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), src(x))


@pytest.mark.parametrize(("name", "size"), [("toy-vit", 32), ("toy-maxvit", 224)])
def test_checkpoint_loads_at_another_resolution(name, size, toy_encoders, tmp_path):
    # pos-embeds (ViT) and relative-position tables (MaxViT) are resampled by timm's filter
    path = tmp_path / "w.safetensors"
    save_safetensors(toy_encoders[name].model.state_dict(), path)
    enc = load_encoder(name, weights=str(path), img_size=size)
    tokens = enc(_pixels(size, batch=1))
    assert tokens.shape == (1, (size // 16) ** 2, enc.spec.dim)
    assert torch.isfinite(tokens).all()


def test_strict_load_reports_every_mismatch(toy_encoders, tmp_path):
    sd = dict(toy_encoders["toy-vit"].model.state_dict())
    del sd["blocks.1.attn.qkv.weight"]
    sd["blocks.9.mlp.fc1.weight"] = torch.zeros(3, 3)
    sd["head.weight"] = torch.zeros(7, sd["head.weight"].shape[1])
    path = tmp_path / "bad.safetensors"
    save_safetensors(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_encoder("toy-vit", weights=str(path))
    msg = str(err.value)
    for expected in (
        "missing",
        "blocks.1.attn.qkv.weight",
        "unexpected",
        "blocks.9.mlp.fc1.weight",
        "mis-shaped",
        "head.weight",
    ):
        assert expected in msg


def test_other_config_checkpoint_is_reported_not_crashing(toy_encoders, tmp_path):
    # a deeper MaxViT's extra blocks must come out as a mismatch report, not an AttributeError
    big = create_encoder("toy-maxvit", depths=(1, 1, 2, 1))
    path = tmp_path / "deeper.safetensors"
    save_safetensors(big.model.state_dict(), path)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_encoder("toy-maxvit", weights=str(path))


def test_unknown_name_lists_registered():
    with pytest.raises(KeyError) as err:
        create_encoder("vit-xxl")
    assert "toy-vit" in str(err.value) and "maxvit-t" in str(err.value)
    with pytest.raises(KeyError, match="toy-vit"):
        timm_config("vit-xxl")


def test_tap_grammar(toy_encoders):
    assert create_encoder("toy-vit", tap="block-1").spec.tap == "block3"
    assert create_encoder("toy-vit", tap="block0").spec.tap == "block0"
    mx = create_encoder("toy-maxvit", tap="stage-1")
    assert (mx.spec.tap, mx.spec.stride) == ("stage3", 32)
    assert create_encoder("toy-maxvit", tap="stem").spec.stride == 2
    with pytest.raises(KeyError, match="block3"):
        create_encoder("toy-vit", tap="block7")
    with pytest.raises(KeyError, match="stage0"):
        create_encoder("toy-mambaout", tap="layer2")


def test_find_local_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    assert find_local_weights("vit-s") is None
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    assert find_local_weights("vit-s") is None
    flat = tmp_path / "vit_small_patch16_224.augreg_in1k.safetensors"
    flat.write_bytes(b"x")
    assert find_local_weights("vit-s") == flat
    hub = tmp_path / "maxvit_tiny_tf_224.in1k" / "model.safetensors"
    hub.parent.mkdir()
    hub.write_bytes(b"x")
    assert find_local_weights("maxvit-t") == hub
    toy = tmp_path / "toy-vit.pth"
    toy.write_bytes(b"x")
    assert find_local_weights("toy-vit") == toy
    assert find_local_weights("vit-b") is None
