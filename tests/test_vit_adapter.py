"""ViT-Adapter in our code against the official implementation (oracles), the deformable-attention
op, checkpoints, the encoder contract and the toy config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlmlab.encoders import create_encoder, list_encoders, load_encoder
from vlmlab.encoders.base import MMDET_MEAN, MMDET_STD, TOY_NUM_CLASSES
from vlmlab.encoders.checkpoints import CheckpointError
from vlmlab.encoders.vit_adapter import (
    VIT_ADAPTER_CONFIGS,
    Attention,
    MSDeformAttn,
    ViTAdapter,
    WindowedAttention,
    build_vit_adapter,
    checkpoint_filter,
)
from vlmlab.ops.ms_deform_attn import ms_deform_attn, reference_points

TOYS = ["toy-vit-adapter"]
TOL32 = dict(rtol=1e-4, atol=1e-4)  # the oracle README's fp32 check
TOL64 = dict(rtol=1e-9, atol=1e-9)  # its stricter fp64 check
TEXT_KWARGS = ("norm_layer", "act_layer", "pretrained")  # written as text in the JSON


def _kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in TEXT_KWARGS}


def _pixels(h: int, w: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reduced(oracles):
    folder = oracles / "vit_adapter"
    cfg = json.loads((folder / "reduced_config.json").read_text())
    return {
        "cfg": cfg,
        "kwargs": _kwargs(cfg["kwargs"]),
        "sd": load_file(folder / "reduced.safetensors"),
        "io": load_file(folder / "reduced_io.safetensors"),
        "extra": load_file(folder / "reduced_extra.safetensors"),
    }


def _reduced_model(reduced, dtype=torch.float32) -> ViTAdapter:
    model = build_vit_adapter(**reduced["kwargs"])
    model.load_state_dict(reduced["sd"], strict=True)
    return model.to(dtype).eval()


def _layout(model: torch.nn.Module) -> list:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


# ----------------------------------------------------------------------------------------------
# 1. layout


def test_state_dict_layout_matches_official(oracles):
    ref = json.loads((oracles / "vit_adapter" / "keys_deit_base.json").read_text())
    model = build_vit_adapter(**_kwargs(ref["config"]), device="meta")
    ours = _layout(model)
    assert sorted(ours) == sorted(ref["state_dict"])  # keys, shapes, dtypes
    assert ours == ref["state_dict"]  # and the official order
    assert len(ours) == ref["num_state_dict_tensors"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    assert sum(b.numel() for b in model.buffers()) == ref["num_buffer_elements"]
    for top, n in ref["num_params_by_top_module"].items():
        got = sum(p.numel() for k, p in model.named_parameters() if k.split(".")[0] == top)
        assert got == n, top


def test_registered_encoder_is_the_official_config(oracles):
    ref = json.loads((oracles / "vit_adapter" / "keys_deit_base.json").read_text())
    enc = create_encoder("vit-adapter-deit-b", device="meta")
    for k, v in _kwargs(ref["config"]).items():
        assert enc.model_config[k] == v, k
    assert enc.spec.params == ref["num_params"]
    # the paper's tap: feature level index 3 (stride 32) -> 16x16 = 256 tokens at 512 px
    assert (enc.spec.input_size, enc.spec.tap, enc.spec.stride, enc.spec.dim) == (
        (512, 512),
        "level3",
        32,
        768,
    )
    assert enc.spec.tokens == 256
    assert enc.spec.family == "vit" and enc.spec.policy == "letterbox-corner"
    assert (enc.spec.mean, enc.spec.std) == (MMDET_MEAN, MMDET_STD)
    # the released manifest's 1024 tokens are the stride-16 level
    assert create_encoder("vit-adapter-deit-b", tap="level2", device="meta").spec.tokens == 1024
    with pytest.raises(ValueError, match="unknown tap"):
        create_encoder("vit-adapter-deit-b", tap="level4", device="meta")


def test_reduced_layout_matches_official(reduced):
    model = build_vit_adapter(**reduced["kwargs"], device="meta")
    assert _layout(model) == reduced["cfg"]["state_dict_in_module_order"]
    assert sum(p.numel() for p in model.parameters()) == reduced["cfg"]["weights"]["num_params"]


# ----------------------------------------------------------------------------------------------
# 2. numerical parity with the official model


@torch.no_grad()
def test_reduced_outputs_match_official_fp32(reduced):
    outs = _reduced_model(reduced)(reduced["io"]["input"])
    for i, out in enumerate(outs, 1):
        torch.testing.assert_close(out, reduced["io"][f"f{i}"], **TOL32, msg=lambda m, i=i: f"f{i}: {m}")


@torch.no_grad()
def test_reduced_outputs_match_official_fp64(reduced):
    outs = _reduced_model(reduced, torch.float64)(reduced["io"]["input"].double())
    for i, out in enumerate(outs, 1):
        torch.testing.assert_close(out, reduced["io"][f"f{i}_fp64"], **TOL64, msg=lambda m, i=i: f"f{i}: {m}")


def _hooked(model: ViTAdapter, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The oracle's intermediate names, recorded with hooks on the official module names."""
    got, handles = {}, []

    def keep(name):
        def hook(module, args, out):
            if name == "spm.out":
                got.update({f"spm.out.c{i}": c for i, c in enumerate(out, 1)})
            else:
                got[name] = out[0] if name == "patch_embed.out" else out

        return hook

    names = ["spm", "patch_embed", "up", *(f"blocks.{i}" for i in range(len(model.blocks)))]
    for i, inter in enumerate(model.interactions):
        names += [f"interactions.{i}.injector", f"interactions.{i}.extractor"]
        if inter.extra_extractors is not None:
            names += [f"interactions.{i}.extra_extractors.{j}" for j in range(len(inter.extra_extractors))]
    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(keep(f"{n}.out")))
    try:
        outs = model(x)
    finally:
        for h in handles:
            h.remove()
    return got, outs


@torch.no_grad()
@pytest.mark.parametrize("which", ["sq", "rect"])
def test_reduced_intermediates_match_official(reduced, which):
    """SPM, patch embed, every injector/block/extractor, up; `rect` is a 96x128 (non-square) input."""
    extra = reduced["extra"]
    x = reduced["io"]["input"] if which == "sq" else extra["rect.input"]
    got, outs = _hooked(_reduced_model(reduced), x)
    refs = {k.removeprefix(f"{which}."): v for k, v in extra.items() if k.startswith(f"{which}.")}
    traced = {k for k in refs if k != "input" and not k.startswith("f")}
    assert traced <= set(got) and len(traced) == 20
    for name in sorted(traced):
        torch.testing.assert_close(got[name], refs[name], **TOL32, msg=lambda m, n=name: f"{n}: {m}")
    if which == "rect":
        for i, out in enumerate(outs, 1):
            torch.testing.assert_close(out, refs[f"f{i}"], **TOL32)
        outs64 = _reduced_model(reduced, torch.float64)(x.double())
        for i, out in enumerate(outs64, 1):
            torch.testing.assert_close(out, refs[f"f{i}_fp64"], **TOL64)


# ----------------------------------------------------------------------------------------------
# 3. deformable attention and the ViT pieces


def test_ms_deform_attn_sampling_rule():
    """Bilinear at loc*size - 0.5, zeros outside, weighted sum over points (the CUDA kernel's rule)."""
    h, w = 2, 3
    value = torch.arange(1.0, 7.0).view(1, h * w, 1, 1)  # one head, one channel: rows [1 2 3], [4 5 6]

    def sample(x: float, y: float) -> float:
        loc = torch.tensor([x, y]).view(1, 1, 1, 1, 1, 2)
        return ms_deform_attn(value, [(h, w)], loc, torch.ones(1, 1, 1, 1, 1)).item()

    assert sample(0.5 / w, 0.5 / h) == pytest.approx(1.0)  # centre of cell (0, 0)
    assert sample(2.5 / w, 1.5 / h) == pytest.approx(6.0)  # centre of cell (1, 2)
    assert sample(1.0 / w, 0.5 / h) == pytest.approx(1.5)  # half-way between cells (0, 0) and (0, 1)
    assert sample(0.0, 0.5 / h) == pytest.approx(0.5)  # left border: half of it is the zero outside
    assert sample(-1.0, 0.5) == 0.0  # far outside
    # two points, weights 0.25 / 0.75
    loc = torch.tensor([[0.5 / w, 0.5 / h], [2.5 / w, 1.5 / h]]).view(1, 1, 1, 1, 2, 2)
    out = ms_deform_attn(value, [(h, w)], loc, torch.tensor([0.25, 0.75]).view(1, 1, 1, 1, 2))
    assert out.item() == pytest.approx(0.25 * 1 + 0.75 * 6)


def test_reference_points_are_float32_cell_centres():
    ref = reference_points([(2, 4), (1, 2)])
    assert ref.shape == (1, 10, 1, 2) and ref.dtype == torch.float32
    torch.testing.assert_close(
        ref[0, :4, 0], torch.tensor([[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25]])
    )
    torch.testing.assert_close(ref[0, 8:, 0], torch.tensor([[0.25, 0.5], [0.75, 0.5]]))


def test_ms_deform_attn_init_samples_a_ring_per_head():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for p in range(3):
        torch.testing.assert_close(bias[:, 0, p], directions * (p + 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[:, 0], bias[:, 1])
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.attention_weights.weight.abs().sum() == 0


@torch.no_grad()
def test_windowed_attention_matches_global_attention_per_window():
    torch.manual_seed(0)
    dim, h, w = 16, 4, 6
    win = WindowedAttention(dim, num_heads=2, qkv_bias=True, window_size=2).eval()
    full = Attention(dim, num_heads=2, qkv_bias=True).eval()
    full.load_state_dict(win.state_dict())
    x = torch.randn(2, h * w, dim)
    out = win(x, h, w).view(2, h, w, dim)
    grid = x.view(2, h, w, dim)
    for i in range(0, h, 2):
        for j in range(0, w, 2):
            patch = grid[:, i : i + 2, j : j + 2].reshape(2, 4, dim)
            torch.testing.assert_close(out[:, i : i + 2, j : j + 2].reshape(2, 4, dim), full(patch, 2, 2))
    # a window as large as the grid is global attention
    big = WindowedAttention(dim, num_heads=2, qkv_bias=True, window_size=6).eval()
    big.load_state_dict(win.state_dict())
    x6 = torch.randn(2, 36, dim)
    torch.testing.assert_close(big(x6, 6, 6), full(x6, 6, 6))


# ----------------------------------------------------------------------------------------------
# 4. checkpoints


def test_mmseg_checkpoint_loads_via_load_encoder(tmp_path):
    torch.manual_seed(3)
    cfg = VIT_ADAPTER_CONFIGS["toy"]
    ref = build_vit_adapter(**cfg)
    sd = {
        k: (v + 0.05 * torch.randn_like(v)) if v.is_floating_point() else v
        for k, v in ref.state_dict().items()
    }
    ref.load_state_dict(sd)
    ckpt = {
        "meta": {"mmseg_version": "0.20.2", "CLASSES": ["wall", "building"]},
        "state_dict": {
            **{f"backbone.{k}": v for k, v in sd.items()},
            "decode_head.conv_seg.weight": torch.zeros(150, 8, 1, 1),
            "auxiliary_head.conv_seg.weight": torch.zeros(150, 8, 1, 1),
        },
    }
    path = tmp_path / "upernet_toy_adapter.pth"
    torch.save(ckpt, path)

    enc = load_encoder("toy-vit-adapter", weights=str(path))
    got = enc.backbone.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    x = _pixels(64, 96)
    with torch.no_grad():
        expected = ref.eval()(x)[3].flatten(2).transpose(1, 2)
        torch.testing.assert_close(enc(x), expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_filter_strips_mmseg_prefix_only():
    t = torch.zeros(1)
    assert checkpoint_filter({"backbone.level_embed": t, "decode_head.conv_seg.weight": t}) == {
        "level_embed": t
    }
    assert checkpoint_filter({"level_embed": t}) == {"level_embed": t}


def test_wrong_checkpoint_lists_mismatches(tmp_path, reduced):
    path = tmp_path / "reduced.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in reduced["sd"].items()}}, path)
    with pytest.raises(CheckpointError, match="mis-shaped keys") as err:
        load_encoder("toy-vit-adapter", weights=str(path))
    assert "net.level_embed" in str(err.value)


# ----------------------------------------------------------------------------------------------
# 5. the encoder contract on the toy config


def test_names_are_registered():
    assert {"vit-adapter-deit-b", *TOYS} <= set(list_encoders())


@pytest.mark.parametrize("name", TOYS)
def test_toy_encoder_contract(name):
    enc = create_encoder(name).eval()
    cfg = VIT_ADAPTER_CONFIGS["toy"]
    assert enc.spec.tap == "level3" and enc.spec.stride == 32 and enc.spec.family == "vit"
    ref_keys = {f"net.{k}": v.shape for k, v in build_vit_adapter(**cfg, device="meta").state_dict().items()}
    assert {k: v.shape for k, v in enc.model.state_dict().items() if k.startswith("net.")} == ref_keys
    assert {k for k in enc.model.state_dict() if not k.startswith("net.")} == {
        "head.norm.weight",
        "head.norm.bias",
        "head.fc.weight",
        "head.fc.bias",
    }
    with torch.no_grad():
        for h, w in [(32, 32), (64, 64), (64, 96), (128, 128)]:
            tokens = enc(_pixels(h, w))
            assert tokens.shape == (2, (h // 32) * (w // 32), cfg["embed_dim"])
            assert torch.isfinite(tokens).all()
        x = _pixels(64, 96)
        maps = enc.intermediates(x)
        assert list(maps) == ["level0", "level1", "level2", "level3"]
        for i, s in enumerate((4, 8, 16, 32)):
            assert maps[f"level{i}"].shape == (2, cfg["embed_dim"], 64 // s, 96 // s)
        torch.testing.assert_close(maps["level3"], enc.forward_map(x), rtol=0, atol=0)
        assert enc.model(x).shape == (2, TOY_NUM_CLASSES)
    with pytest.raises(ValueError, match="multiples of 32"):
        enc(_pixels(48, 64))
    with pytest.raises(ValueError, match="multiple of 32"):  # level2 has stride 16; the SPM still needs 32
        create_encoder(name, tap="level2")(_pixels(48, 64))
    with torch.no_grad():  # bfloat16 runs (the deformable sampling itself in float32, as upstream)
        tokens = enc.to(torch.bfloat16)(_pixels(64, 64).bfloat16())
        assert tokens.dtype == torch.bfloat16 and torch.isfinite(tokens).all()


@pytest.mark.parametrize("name", TOYS)
def test_toy_taps_and_grad_checkpointing(name):
    enc = create_encoder(name, tap="level1").eval()
    x = _pixels(64, 64)
    with torch.no_grad():
        assert enc(x).shape == (2, (64 // 8) ** 2, VIT_ADAPTER_CONFIGS["toy"]["embed_dim"])

    torch.manual_seed(0)
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
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
