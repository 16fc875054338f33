"""VMamba v2 (vlmlab.encoders.vmamba) against data produced by the official implementation.

Oracles (../shared/oracles/vmamba, see its README): key lists and parameter counts of the official
configs, and reduced models (official init, and re-randomized `_rand` weights where the SSM path
matters) with their inputs and every stage's outputs.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vlmlab.encoders import vmamba as V
from vlmlab.encoders.base import (
    IMAGENET_MEAN,
    MMDET_MEAN,
    TOY_NUM_CLASSES,
    create_encoder,
    list_encoders,
    load_encoder,
)
from vlmlab.encoders.checkpoints import CheckpointError, load_into
from vlmlab.ops import scan

TOL = dict(atol=1e-4, rtol=1e-4)  # oracle README section 5: ~20x float32 noise, ~10x below any fault
CPU_BACKENDS = scan.available_backends("cpu")

KEY_FILES = [
    "keys_vmambav2v_tiny_224.json",
    "keys_vmambav2_tiny_224.json",
    "keys_vmambav2_small_224.json",
    "keys_vmambav2_base_224.json",
    "keys_backbone_tiny.json",
    "keys_backbone_tiny1.json",
    "keys_backbone_small.json",
    "keys_backbone_base.json",
]
# fixture -> (config, weights, inputs/outputs)
REDUCED = {
    "cls": ("reduced_config.json", "reduced_cls.safetensors", "reduced_io.safetensors"),
    "cls_n4": ("reduced_config_n4.json", "reduced_cls_n4.safetensors", "reduced_io_n4.safetensors"),
    "cls_rand": ("reduced_config_rand.json", "reduced_cls_rand.safetensors", "reduced_io_rand.safetensors"),
    "cls_n4_rand": (
        "reduced_config_n4_rand.json",
        "reduced_cls_n4_rand.safetensors",
        "reduced_io_n4_rand.safetensors",
    ),
    "backbone": (
        "reduced_backbone_config.json",
        "reduced_backbone.safetensors",
        "reduced_backbone_io.safetensors",
    ),
    "backbone_rand": (
        "reduced_backbone_rand_config.json",
        "reduced_backbone_rand.safetensors",
        "reduced_backbone_rand_io.safetensors",
    ),
}
CLASSIFIERS = [k for k in REDUCED if k.startswith("cls")]

# registered name -> oracle key list of its architecture
REGISTERED = {
    "vmamba-t": "keys_vmambav2v_tiny_224.json",
    "vmamba-t-s2l5": "keys_vmambav2_tiny_224.json",
    "vmamba-s": "keys_vmambav2_small_224.json",
    "vmamba-b": "keys_vmambav2_base_224.json",
    "vmamba-t-coco": "keys_backbone_tiny.json",
    "vmamba-s-coco": "keys_backbone_small.json",
    "vmamba-b-coco": "keys_backbone_base.json",
    "vmamba-s-ade": "keys_backbone_small.json",
    "toy-vmamba": None,
    "toy-vmamba-b": None,
}
SMALL = dict(depths=(1, 1, 2, 1), dims=16)  # shrinks a full-size config for real-compute tests


def _json(oracles, name: str) -> dict:
    return json.loads((oracles / "vmamba" / name).read_text())


def _build(official_class: str, kwargs: dict) -> V.VSSM:
    """The model of an oracle file's "class" ("VSSM ..." or "Backbone_VSSM ...") from its kwargs."""
    build = V.build_vmamba_backbone if official_class.startswith("Backbone_VSSM") else V.build_vmamba
    return build(**kwargs)


def _reduced(oracles, name: str):
    """(model with the fixture's weights loaded strictly, io tensors, config json)."""
    cfg_file, weights, io = REDUCED[name]
    cfg = _json(oracles, cfg_file)
    model = _build(cfg["class"], cfg["constructor_kwargs"]).eval()
    load_into(model, load_file(oracles / "vmamba" / weights))
    return model, load_file(oracles / "vmamba" / io), cfg


def _taps(model: V.VSSM) -> list[V.Tap]:
    return [V.Tap(-1, 0)] + [V.Tap(i, d - 1) for i, d in enumerate(model.depths)]


# ---- key layout and parameter counts of the official configs ------------------------------------


@pytest.mark.parametrize("key_file", KEY_FILES)
def test_official_keys_shapes_and_param_counts(oracles, key_file):
    ref = _json(oracles, key_file)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = _build(ref["class"], ref["config"])
    sd = model.state_dict()
    assert {k: [list(v.shape), str(v.dtype)] for k, v in sd.items()} == {
        k: [shape, f"torch.{dtype}"] for k, shape, dtype in ref["state_dict"]
    }
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    assert list(model.buffers()) == []  # the official models have none


@pytest.mark.parametrize("name", ["cls", "cls_n4", "backbone"])
def test_seeded_init_reproduces_official_init(oracles, name):
    """Same module creation order as the official code: same random draws, same weights.

    Values agree to float32 rounding (a few last-bit differences in exp/erfinv between CPUs);
    a different draw order or init formula would differ by O(1).
    """
    cfg_file, weights, _ = REDUCED[name]
    cfg = _json(oracles, cfg_file)
    torch.manual_seed(0)
    model = _build(cfg["class"], cfg["constructor_kwargs"])
    sd, ref = model.state_dict(), load_file(oracles / "vmamba" / weights)
    assert list(sd) == cfg["state_dict_keys_in_order"]
    for k, v in ref.items():
        torch.testing.assert_close(sd[k], v, atol=1e-6, rtol=1e-5, msg=k)


# ---- numerical parity ----------------------------------------------------------------------------


def _all_outputs(model: V.VSSM, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every output the oracle io files hold (except debug/), by their names."""
    with torch.no_grad():
        stem, *stages = model.forward_taps(x, _taps(model))
        got = {"stem": stem, **{f"stage{i}": s for i, s in enumerate(stages)}}
        for i in range(len(stages) - 1):
            got[f"downsample{i}"] = model.layers[i].downsample(stages[i])
        if isinstance(model, V.BackboneVSSM):
            got.update({f"out{i}": o for i, o in enumerate(model(x))})
        else:
            got["logits"] = model(x)
            got["pre_logits"] = model.forward_head(stages[-1], pre_logits=True)
    return got


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(REDUCED))
def test_outputs_match_official(oracles, name, backend):
    model, io, _ = _reduced(oracles, name)
    for prefix in ("", "rect/"):  # 64x64 and a non-square, odd-sized 56x72 input
        with scan.use_backend(backend):
            got = _all_outputs(model, io[prefix + "x"])
        expected = {k[len(prefix) :] for k in io if k.startswith(prefix) and "/" not in k[len(prefix) :]}
        assert expected - {"x"} == set(got)
        for k, v in got.items():
            torch.testing.assert_close(v, io[prefix + k], **TOL, msg=f"{name} {backend} {prefix}{k}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["cls_rand", "cls_n4_rand", "backbone_rand"])
def test_float64_outputs_match_official_float64_reference(oracles, name, backend):
    """Run in float64, the model must give the same math as the official float64 run (README 5)."""
    model, io, _ = _reduced(oracles, name)
    model = model.double()
    for prefix in ("", "rect/"):
        with scan.use_backend(backend):
            got = _all_outputs(model, io[prefix + "x"].double())
        for k, v in got.items():
            want = io[f"f64ref/{prefix}{k}"]
            assert want.dtype == v.dtype == torch.float64
            torch.testing.assert_close(v, want, atol=1e-10, rtol=1e-10, msg=f"{name} {backend} {prefix}{k}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_ss2d_internals_and_blocks_match_official(oracles, name, backend):
    model, io, _ = _reduced(oracles, name)
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for mname, module in model.named_modules():
        if f"debug/{mname}" in io:
            hooks.append(module.register_forward_hook(lambda m, i, o, n=mname: outputs.__setitem__(n, o)))
    op = model.get_submodule("layers.1.blocks.0.op")
    op.capture = {}
    with torch.no_grad(), scan.use_backend(backend):
        model(io["x"])
    for h in hooks:
        h.remove()
    for key, want in io.items():
        if not key.startswith("debug/"):
            continue
        where, _, internal = key[len("debug/") :].partition("/")
        got = op.capture[internal] if internal else outputs[where]
        torch.testing.assert_close(got, want, **TOL, msg=f"{name} {backend} {key}")


def test_cross_merge_inverts_cross_scan_on_non_square_maps():
    h, w = 3, 5
    x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    xs = V.cross_scan(x)
    row_major = torch.arange(h * w, dtype=torch.float32)
    col_major = torch.tensor([float(i * w + j) for j in range(w) for i in range(h)])
    for k, order in enumerate([row_major, col_major, row_major.flip(0), col_major.flip(0)]):
        assert torch.equal(xs[0, k, 0], order)
    y = torch.randn(2, 3, h, w)
    assert torch.allclose(V.cross_merge(V.cross_scan(y), h, w).view(2, 3, h, w), 4 * y)


# ---- registry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tf32_conv", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear2d_on_channel_last_maps(monkeypatch, tf32_conv, bias):
    # both branches of the fused path's projection (a 1x1 conv on a channels_last view, or a
    # matrix product) are Linear2d on the NCHW map, returned channel-last and contiguous
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32_conv)
    g = torch.Generator().manual_seed(0)
    layer = V.Linear2d(6, 5, bias=bias)
    x = torch.randn(2, 6, 3, 4, generator=g)
    with torch.no_grad():
        got = V.linear2d_cl(x.permute(0, 2, 3, 1).contiguous(), layer.weight, layer.bias)
        ref = layer(x).permute(0, 2, 3, 1)
    assert got.shape == (2, 3, 4, 5) and got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_all_variants_are_registered():
    assert set(REGISTERED) <= set(list_encoders())


@pytest.mark.parametrize("name", list(REGISTERED))
def test_registered_specs(oracles, name):
    with torch.device("meta"):  # full-size models: spec and parameter count only
        enc = create_encoder(name)
    spec, depths = enc.spec, enc.model.depths
    dense = name.endswith(("-coco", "-ade"))
    assert spec.family == "ssm"
    assert spec.tap == f"stage2.layer{depths[2] - 1}+norm"  # the paper's "stage 3, last layer" + norm
    assert (spec.stride, spec.dim) == (16, enc.model.dims[2])
    assert spec.policy == ("letterbox-corner" if dense else "letterbox-center")
    assert spec.mean == (MMDET_MEAN if dense else IMAGENET_MEAN)  # the same statistics, two conventions
    assert spec.input_size[0] % 16 == 0 and spec.input_size[1] % 16 == 0
    if REGISTERED[name] is not None:
        ref = _json(oracles, REGISTERED[name])
        assert spec.params == ref["num_params"]
        assert {k: list(v.shape) for k, v in enc.model.state_dict().items()} == {
            k: shape for k, shape, _ in ref["state_dict"]
        }
    else:
        assert enc.model.num_classes == TOY_NUM_CLASSES
    if name == "vmamba-s":  # facts of the release: 224 px, 196 tokens of 384 dims
        assert (spec.input_size, spec.tokens, spec.dim) == ((224, 224), 196, 384)
    if name == "vmamba-s-ade":
        assert (spec.input_size, spec.tokens) == ((512, 512), 1024)


@pytest.mark.parametrize("name", list(REGISTERED))
def test_registered_encoders_forward(name):
    kw = {} if name.startswith("toy") else SMALL
    torch.manual_seed(0)
    enc = create_encoder(name, img_size=(64, 96), **kw).eval()
    assert enc.spec.input_size == (64, 96) and enc.spec.tokens == 4 * 6
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        tokens = enc(x)
        maps = enc.intermediates(x)
    assert tokens.shape == (2, 24, enc.spec.dim) and torch.isfinite(tokens).all()
    assert list(maps) == ["stem", "stage0", "stage1", "stage2", "stage3", enc.spec.tap]
    for i in range(4):
        assert maps[f"stage{i}"].shape == (2, enc.model.dims[i], 64 // 2 ** (i + 2), 96 // 2 ** (i + 2))
    tap = maps[enc.spec.tap]
    torch.testing.assert_close(tap.flatten(2).transpose(1, 2), tokens)
    # the tap is the end of stage 2 normalized by the stage norm
    torch.testing.assert_close(tap, enc.model.stage_norm(2, maps["stage2"]))
    with pytest.raises(ValueError, match="multiples of 16"):
        enc(torch.randn(1, 3, 72, 96))


def test_taps_inside_a_stage_and_grammar():
    torch.manual_seed(0)
    enc = create_encoder("toy-vmamba-b", tap="stage2.layer1").eval()  # depths (1, 1, 4, 1)
    assert enc.spec.tap == "stage2.layer1" and enc.spec.stride == 16
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = enc.intermediates(x, ["stage2.layer1", "stage2.layer-3", "stage2.layer3", "stage2"])
        block1 = enc.model.forward_taps(x, [V.Tap(2, 0)])[0]
        block1 = enc.model.layers[2].blocks[1](block1)
    torch.testing.assert_close(maps["stage2.layer1"], block1)
    torch.testing.assert_close(maps["stage2.layer-3"], block1)
    torch.testing.assert_close(maps["stage2.layer3"], maps["stage2"])
    assert not torch.allclose(maps["stage2.layer1"], maps["stage2"])
    depths = enc.model.depths
    assert V.parse_tap("stage2+norm", depths) == V.Tap(2, 3, True)
    assert V.parse_tap("stem", depths) == V.Tap(-1, 0)
    for bad in ["stage4", "stage2.layer4", "stage2.layer-5", "stem+norm", "block2", "stage2+ln"]:
        with pytest.raises(ValueError, match="tap"):
            V.parse_tap(bad, depths)


def test_classifier_stage_norm_is_the_release_choice():
    """Stages 0-2: LayerNorm without affine (release's outnorm at init); last stage: classifier.norm."""
    torch.manual_seed(0)
    enc = create_encoder("toy-vmamba").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        enc.model.classifier.norm.weight.mul_(3.0)
        enc.model.classifier.norm.bias.add_(0.5)
        maps = enc.intermediates(x, ["stage2", "stage2+norm", "stage3", "stage3+norm"])
    per_token = maps["stage2"].permute(0, 2, 3, 1)
    expected = F.layer_norm(per_token, per_token.shape[-1:]).permute(0, 3, 1, 2)
    torch.testing.assert_close(maps["stage2+norm"], expected)
    torch.testing.assert_close(maps["stage3+norm"], enc.model.classifier.norm(maps["stage3"]))


def test_backbone_norm_needs_an_outnorm():
    model = V.build_vmamba_backbone(out_indices=(3,), **SMALL)
    assert not hasattr(model, "outnorm2")
    with pytest.raises(ValueError, match="outnorm2"):
        model.check_tap(V.Tap(2, 1, True))


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    x = torch.randn(2, 3, 32, 32)
    results = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = create_encoder("toy-vmamba", use_checkpoint=use_checkpoint).model.train()
        loss = model(x).square().sum()
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_unsupported_options_raise():
    for bad in (
        dict(forward_type="v2"),
        dict(norm_layer="ln"),
        dict(downsample_version="v1"),
        dict(patchembed_version="v1"),
        dict(gmlp=True),
        dict(posembed=True),
    ):
        with pytest.raises(NotImplementedError, match=next(iter(bad))):
            V.build_vmamba(**SMALL, **bad)
    with pytest.raises(TypeError, match="embed_dims"):
        V.build_vmamba_backbone(embed_dims=96)
    with pytest.raises(ValueError, match="load_encoder"):
        V.build_vmamba_backbone(pretrained="vssm_small.pth", **SMALL)


# ---- checkpoints ---------------------------------------------------------------------------------


def test_strict_load_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    sd = create_encoder("toy-vmamba").model.state_dict()
    width = sd["classifier.head.weight"].shape[1]
    del sd["layers.1.blocks.0.op.Ds"]
    sd["layers.9.blocks.0.norm.weight"] = torch.ones(3)
    sd["classifier.head.weight"] = torch.zeros(10, width)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_encoder("toy-vmamba", weights=str(path))
    msg = str(err.value)
    for needle in (
        "1 missing",
        "layers.1.blocks.0.op.Ds",
        "1 unexpected",
        "layers.9.blocks.0.norm.weight",
        "1 mis-shaped",
        f"classifier.head.weight: checkpoint (10, {width}) vs model (36, {width})",
        "model config",
        "'depths': (1, 1, 2, 1)",
    ):
        assert needle in msg


def test_mmdet_checkpoint_with_backbone_prefix(oracles, tmp_path):
    """An mmengine runner checkpoint: {'meta', 'state_dict': {'backbone.*', 'neck.*', ...}}."""
    _, io, cfg = _reduced(oracles, "backbone_rand")
    weights = load_file(oracles / "vmamba" / REDUCED["backbone_rand"][1])
    state = {f"backbone.{k}": v for k, v in weights.items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(8, 16, 1, 1)
    state["rpn_head.rpn_conv.bias"] = torch.zeros(8)
    path = tmp_path / "mask_rcnn_vssm_fpn_coco_reduced.pth"
    torch.save({"meta": {"epoch": 12, "mmengine_version": "0.10.7"}, "state_dict": state}, path)
    enc = load_encoder("vmamba-s-coco", weights=str(path), **cfg["constructor_kwargs"])
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    with torch.no_grad():
        tokens = enc(io["x"])
        maps = enc.intermediates(io["x"], ["stage1+norm", "stage3+norm"])
    torch.testing.assert_close(tokens, io["out2"].flatten(2).transpose(1, 2), **TOL)
    torch.testing.assert_close(maps["stage1+norm"], io["out1"], **TOL)
    torch.testing.assert_close(maps["stage3+norm"], io["out3"], **TOL)


def test_classification_checkpoint_layouts(tmp_path):
    """'model' first, 'model_ema' alone, legacy names and conv-shaped Linear2d weights all load."""
    torch.manual_seed(0)
    main = create_encoder("toy-vmamba").model.state_dict()
    ema = {k: v + 1 for k, v in main.items()}
    extras = {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "epoch": 3, "max_accuracy": 51.0}
    cases = {
        "both.pth": ({"model": main, "model_ema": ema, **extras}, main),
        "ema.pth": ({"model_ema": ema}, ema),
    }
    legacy = dict(main)
    legacy["norm.weight"] = legacy.pop("classifier.norm.weight")  # official legacy names
    legacy["head.bias"] = legacy.pop("classifier.head.bias")
    legacy["layers.0.blocks.0.mlp.fc1.weight"] = legacy["layers.0.blocks.0.mlp.fc1.weight"][..., None, None]
    cases["legacy.pth"] = ({"model": legacy}, main)
    key = "layers.0.blocks.0.op.in_proj.weight"
    conv_shaped = {**main, key: main[key][..., None, None]}
    create_encoder("toy-vmamba").model.load_state_dict(conv_shaped)  # Linear2d's own load hook, as official
    for file, (content, expected) in cases.items():
        torch.save(content, tmp_path / file)
        got = load_encoder("toy-vmamba", weights=str(tmp_path / file)).model.state_dict()
        for k, v in expected.items():
            assert torch.equal(got[k], v), (file, k)


def test_classification_checkpoint_into_a_backbone(oracles, tmp_path):
    """As the official Backbone_VSSM(pretrained=...): classifier dropped, outnorms at weight 1, bias 0."""
    _, io, cfg = _reduced(oracles, "cls_rand")
    weights = load_file(oracles / "vmamba" / REDUCED["cls_rand"][1])
    torch.save({"model": weights}, tmp_path / "ckpt_epoch_1.pth")
    enc = load_encoder(
        "vmamba-s-ade", weights=str(tmp_path / "ckpt_epoch_1.pth"), **cfg["constructor_kwargs"]
    )
    assert torch.equal(enc.model.outnorm2.weight, torch.ones(64)) and not enc.model.outnorm2.bias.any()
    with torch.no_grad():
        maps = enc.intermediates(io["x"], ["stage2", "stage3"])
    torch.testing.assert_close(maps["stage2"], io["stage2"], **TOL)
    torch.testing.assert_close(maps["stage3"], io["stage3"], **TOL)


def test_vmamba_s_at_224_gives_196_tokens_of_384_dims():
    torch.manual_seed(0)
    enc = create_encoder("vmamba-s").eval()
    with torch.no_grad():
        tokens = enc(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 196, 384) and torch.isfinite(tokens).all()
