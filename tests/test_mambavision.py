"""MambaVision in our code against the official release (oracles), and the encoder contract."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlmlab.encoders import create_encoder, list_encoders
from vlmlab.encoders.checkpoints import CheckpointError, load_checkpoint, save_safetensors
from vlmlab.encoders.mambavision import (
    CONFIGS,
    DEFAULT_TAP,
    Attention,
    MambaVisionMixer,
    build_mambavision,
    window_partition,
    window_reverse,
)
from vlmlab.ops import scan

VARIANTS = ["T", "T2", "S", "B", "L", "L2"]
OFFICIAL = [f"mambavision-{v.lower()}" for v in VARIANTS]
TOYS = ["toy-mambavision", "toy-mambavision-b"]
FIXTURES = ["reduced", "reduced_ls", "reduced_perturbed", "reduced_ls_perturbed"]
UNUSED_KWARGS = ("resolution", "img_size")  # passed by the official factories, swallowed by **kwargs
TOL = dict(rtol=1e-5, atol=1e-5)  # the oracle README's suggested check (>10x its observed fp32 noise)


def _oracle(oracles, name: str):
    return oracles / "mambavision" / name


def _pixels(size: int | tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# 1. layout parity: keys, shapes, dtypes, order and parameter counts of every official config


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_layout_matches_official(oracles, variant):
    ref = json.loads(_oracle(oracles, f"keys_{variant}.json").read_text())
    model = build_mambavision(**ref["config"], device="meta")  # exactly the official kwargs
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert {k for k, *_ in ours} == {k for k, *_ in ref["state_dict"]}
    assert sorted(ours) == sorted(ref["state_dict"])  # shapes and dtypes
    assert ours == ref["state_dict"]  # also the official order
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    for lv in ref["derived"]["levels"]:
        if lv["kind"] == "conv":
            continue
        mixers = [type(b.mixer) for b in model.levels[lv["index"]].blocks]
        assert [j for j, m in enumerate(mixers) if m is MambaVisionMixer] == lv["mamba_blocks"]
        assert [j for j, m in enumerate(mixers) if m is Attention] == lv["attention_blocks"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_registered_config_is_the_official_factory(oracles, variant):
    ref = json.loads(_oracle(oracles, f"keys_{variant}.json").read_text())
    enc = create_encoder(f"mambavision-{variant.lower()}", device="meta")
    expected = {k: v for k, v in ref["config"].items() if k not in UNUSED_KWARGS}
    assert enc.model_config == expected
    assert enc.spec.params == ref["num_params"]


# ----------------------------------------------------------------------------------------------
# 2. numerical parity with the official model on the reduced fixtures


def _hooked_forward(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The oracle's tap names, recorded the way the oracle was: hooks on the official module names."""
    got, handles = {}, []

    def keep(name, pre):
        def hook(module, args, out=None):
            got[name] = (args[0] if pre else out).detach().clone()

        return hook

    for name in names:
        if name.endswith(".in"):
            handles.append(model.get_submodule(name[:-3]).register_forward_pre_hook(keep(name, True)))
        elif name.endswith(".out"):
            handles.append(model.get_submodule(name[:-4]).register_forward_hook(keep(name, False)))
    try:
        got["logits"] = model(x)
    finally:
        for h in handles:
            h.remove()
    got["pooled"] = model.forward_features(x)
    levels = [int(n.split(".")[1]) for n in names if n.startswith("features.")]
    feats = model.forward_intermediates(x, [f"level{i}" for i in levels])
    got.update({f"features.{i}": feats[f"level{i}"] for i in levels})
    unknown = set(names) - set(got)
    assert not unknown, f"oracle taps this test does not know how to record: {sorted(unknown)}"
    return got


def _load_fixture(oracles, fixture: str):
    cfg = json.loads(_oracle(oracles, f"{fixture}_config.json").read_text())
    model = build_mambavision(**cfg["config"])
    model.load_state_dict(load_file(_oracle(oracles, f"{fixture}.safetensors")), strict=True)
    return model.eval(), load_file(_oracle(oracles, f"{fixture}_io.safetensors"))


@pytest.mark.parametrize("backend", scan.available_backends("cpu"))
@pytest.mark.parametrize("fixture", FIXTURES)
def test_reduced_fixture_every_tap(oracles, fixture, backend):
    model, io = _load_fixture(oracles, fixture)
    prefixes = [p for p in ("", "pad.") if f"{p}input" in io]
    assert prefixes == ["", "pad."]  # square input, and the non-square one that forces window padding
    for p in prefixes:
        names = [k.removeprefix(p) for k in io if k.startswith("pad.") == (p == "pad.")]
        names.remove("input")
        with torch.no_grad(), scan.use_backend(backend):
            got = _hooked_forward(model, io[f"{p}input"], names)
        for n in names:
            torch.testing.assert_close(got[n], io[p + n], **TOL, msg=lambda m, n=n, p=p: f"{p}{n}: {m}")


@pytest.mark.parametrize("fixture", ["reduced_perturbed", "reduced_ls_perturbed"])
def test_stage_taps_match_oracle_maps(oracles, fixture):
    """forward_intermediates' stage taps are the official per-level maps, not just consistent with them."""
    model, io = _load_fixture(oracles, fixture)
    oracle_name = {"stem": "patch_embed.out", "norm": "norm.out"}
    for i in range(4):
        oracle_name[f"level{i}"] = f"features.{i}"
        if i < 3:
            oracle_name[f"level{i}+down"] = f"levels.{i}.out"
    for i in (0, 1):  # conv levels: block outputs are NCHW in the oracle too
        for j in range(len(model.levels[i].blocks)):
            oracle_name[f"level{i}.block{j}"] = f"levels.{i}.blocks.{j}.out"
    for p in ("", "pad."):
        with torch.no_grad():
            got = model.forward_intermediates(io[f"{p}input"], list(oracle_name))
        for tap, name in oracle_name.items():
            torch.testing.assert_close(got[tap], io[p + name], **TOL, msg=lambda m, t=p + tap: f"{t}: {m}")


def test_hybrid_block_taps_are_window_outputs_stitched_back(oracles):
    model, io = _load_fixture(oracles, "reduced_ls_perturbed")
    with torch.no_grad():
        got = model.forward_intermediates(io["pad.input"], ["level2.block1", "level3.block0"])
    for tap, name, ws in (
        ("level2.block1", "levels.2.blocks.1.out", 2),
        ("level3.block0", "levels.3.blocks.0.out", 2),
    ):
        h, w = got[tap].shape[-2:]
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        stitched = window_reverse(io[f"pad.{name}"], ws, hp, wp)[:, :, :h, :w]
        torch.testing.assert_close(got[tap], stitched, **TOL)


@pytest.mark.parametrize("fixture", ["reduced", "reduced_ls"])
def test_seeded_build_reproduces_official_init(oracles, fixture):
    # Same modules, built in the same order, draw the same random numbers as the official constructor.
    # Not bit-exact: vectorized log/erfinv kernels differ in the last bit between CPUs.
    cfg = json.loads(_oracle(oracles, f"{fixture}_config.json").read_text())
    torch.manual_seed(0)
    ours = build_mambavision(**cfg["config"]).state_dict()
    ref = load_file(_oracle(oracles, f"{fixture}.safetensors"))
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_window_partition_roundtrip_and_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    win = window_partition(x, 2)
    assert win.shape == (2 * 2 * 3, 4, 3)
    # window 1 of image 0 is rows 0-1, cols 2-3; its tokens are row-major, channels last
    torch.testing.assert_close(win[1, :, 0], x[0, 0, 0:2, 2:4].reshape(-1))
    torch.testing.assert_close(window_reverse(win, 2, 4, 6), x)


# ----------------------------------------------------------------------------------------------
# 3. the registered encoders


def test_names_are_registered():
    assert set(OFFICIAL + TOYS) <= set(list_encoders())


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_specs_follow_the_paper_tap(name):
    enc = create_encoder(name, device="meta")
    dim = CONFIGS[name.removeprefix("mambavision-")]["dim"]
    s = enc.spec
    assert (s.family, s.tap, s.policy, s.input_size) == (
        "hybrid",
        DEFAULT_TAP,
        "letterbox-center",
        (224, 224),
    )
    assert (s.stride, s.dim, s.tokens) == (16, 4 * dim, 196)
    if name == "mambavision-b":
        assert s.dim == 512  # FACTS.md: level index 1 + its downsample, 512-d


def test_official_encoder_runs_up_to_its_tap_only():
    torch.manual_seed(0)
    enc = create_encoder("mambavision-t").eval()
    ran = []
    for name in (
        "levels.1.blocks.0",
        "levels.1.downsample",
        "levels.2.blocks.0",
        "levels.3.blocks.0",
        "norm",
    ):
        enc.model.get_submodule(name).register_forward_pre_hook(lambda *_, n=name: ran.append(n))
    with torch.no_grad():
        tokens = enc(_pixels(64))  # 64 px: level 2 would be a 4x4 grid that 14x14 windows cannot tile
    assert tokens.shape == (2, 16, 320) and torch.isfinite(tokens).all()
    assert ran == ["levels.1.blocks.0", "levels.1.downsample"]


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", TOYS)
def test_toy_encoder_tokens_and_intermediates(name, size):
    torch.manual_seed(0)
    enc = create_encoder(name, img_size=size).eval()
    x = _pixels(size)
    with torch.no_grad():
        tokens = enc(x)
        inter = enc.intermediates(x)
        logits = enc.model(x)
    s = enc.spec
    assert (s.stride, s.tap, s.family) == (16, DEFAULT_TAP, "hybrid")
    assert tokens.shape == (2, s.tokens, s.dim) == (2, (size // 16) ** 2, s.dim)
    assert torch.isfinite(tokens).all() and torch.isfinite(logits).all()
    assert logits.shape == (2, enc.model.num_classes)
    assert list(inter) == enc.model.stage_taps()
    for tap, fmap in inter.items():
        info = enc.model.tap_info(tap)
        assert fmap.shape == (2, info["channels"], size // info["stride"], size // info["stride"]), tap
    torch.testing.assert_close(tokens, inter[s.tap].flatten(2).transpose(1, 2))
    model = enc.model
    for i in range(3):
        torch.testing.assert_close(inter[f"level{i}+down"], model.levels[i].downsample(inter[f"level{i}"]))
    last = {f"level{i}.block{len(lv.blocks) - 1}": f"level{i}" for i, lv in enumerate(model.levels)}
    with torch.no_grad():
        blocks = enc.intermediates(x, list(last))
    for block_tap, level_tap in last.items():
        torch.testing.assert_close(blocks[block_tap], inter[level_tap])
    torch.testing.assert_close(model.head(inter["norm"].mean((2, 3))), logits)


@pytest.mark.parametrize("name", TOYS)
def test_toy_encoder_trains(name):
    """The full model is differentiable through the scan (toy pretraining trains enc.model)."""
    torch.manual_seed(0)
    model = create_encoder(name, img_size=32).model.train()
    loss = torch.nn.functional.cross_entropy(model(_pixels(32, batch=4)), torch.arange(4))
    loss.backward()
    mixer = model.levels[2].blocks[0].mixer
    for p in (
        mixer.A_log,
        mixer.D,
        mixer.dt_proj.bias,
        mixer.conv1d_z.weight,
        model.patch_embed.conv_down[0].weight,
    ):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_taps_grammar():
    enc = create_encoder("toy-mambavision", tap="level2.block1")
    assert (enc.spec.stride, enc.spec.dim) == (16, 128)
    assert enc.model.tap_info("level2+down") == dict(stride=32, channels=256)
    assert enc.model.tap_info("stem") == dict(stride=4, channels=32)
    assert enc.model.tap_info("norm") == dict(stride=32, channels=256)
    for bad in ("stage3", "level3+down", "level4", "level2.block9", "level1+down.block0"):
        with pytest.raises(ValueError, match="tap"):
            create_encoder("toy-mambavision", tap=bad)


def test_window_sizes_that_do_not_tile_are_an_error():
    enc = create_encoder("toy-mambavision", img_size=64, tap="level2").eval()  # level-2 windows of 4
    with torch.no_grad():
        assert enc(_pixels(128)).shape == (2, 64, 128)  # 8x8 grid: four windows
        with pytest.raises(ValueError, match="do not tile.*allow_window_padding"):
            enc(_pixels(96))  # 6x6 grid
        with pytest.raises(ValueError, match="multiple of 32"):
            create_encoder("toy-mambavision", img_size=48)
        # the official behaviour (zero padding to whole windows) on request
        padded = create_encoder(
            "toy-mambavision", img_size=64, tap="level2", allow_window_padding=True
        ).eval()
        assert padded(_pixels(96)).shape == (2, 36, 128)


# ----------------------------------------------------------------------------------------------
# 4. checkpoints


@pytest.fixture
def toy_pair():
    torch.manual_seed(0)
    src = create_encoder("toy-mambavision", img_size=32)
    torch.manual_seed(1)
    dst = create_encoder("toy-mambavision", img_size=32)
    return src, dst


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_official_training_checkpoint_loads(toy_pair, tmp_path):
    """timm CheckpointSaver layout: 'state_dict' (non-EMA, what the official loader takes) beside
    'state_dict_ema' and metadata; DDP 'module.' prefix; no num_batches_tracked buffers."""
    src, dst = toy_pair
    sd = {
        f"module.{k}": v for k, v in src.model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    ema = {k: torch.zeros_like(v) for k, v in sd.items()}
    path = tmp_path / "mambavision_toy_1k.pth.tar"
    torch.save({"state_dict": sd, "state_dict_ema": ema, "epoch": 3, "arch": "mamba_vision_T"}, path)
    load_checkpoint(dst, path)
    _assert_same_weights(src.model, dst.model)


def test_encoder_prefixed_checkpoint_loads(toy_pair, tmp_path):
    src, dst = toy_pair
    sd = {f"encoder.{k}": v for k, v in src.model.state_dict().items()}
    sd["projector.weight"] = torch.zeros(3)  # official loader: only encoder.* kept when one sorts first
    save_safetensors(sd, tmp_path / "w.safetensors")
    load_checkpoint(dst, tmp_path / "w.safetensors")
    _assert_same_weights(src.model, dst.model)


def test_mismatched_checkpoint_reports_every_problem(toy_pair, tmp_path):
    src, dst = toy_pair
    sd = dict(src.model.state_dict())
    del sd["levels.2.blocks.0.mixer.A_log"]
    sd["levels.2.blocks.0.gamma_1"] = torch.ones(128)  # a layer-scale checkpoint into a model without it
    sd["head.weight"] = torch.zeros(1000, 256)  # an ImageNet head
    save_safetensors(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(dst, tmp_path / "bad.safetensors")
    msg = str(err.value)
    for needle in (
        "missing",
        "levels.2.blocks.0.mixer.A_log",
        "unexpected",
        "levels.2.blocks.0.gamma_1",
        "mis-shaped",
        "head.weight",
        "(1000, 256)",
        "'layer_scale': None",
    ):
        assert needle in msg, needle
