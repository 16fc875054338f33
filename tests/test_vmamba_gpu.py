"""The fused CUDA inference path of VMamba (vlmlab/ops/cross_scan_triton.py) against the reference path.

The reference is the CPU path of vlmlab/encoders/vmamba.py (cross_scan, the chunked selective
scan, cross_merge) in float64; the fused kernels must compute the same function in fp32 and bf16.
Every test needs CUDA and triton (marked `gpu`, skipped elsewhere).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from vlmlab.encoders import create_encoder
from vlmlab.encoders import vmamba as V
from vlmlab.ops.scan import selective_scan

CUDA = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA and triton")]
K = V.K_DIRECTIONS


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all()
    return ((got - ref).norm() / ref.norm()).item()


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter (the init has A = -1, D = 1, zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("A_logs"):
                p.copy_(0.5 * noise)
            elif name.endswith(("Ds", "dt_projs_bias")) or p.dim() == 1:
                p.add_(0.3 * noise)
            else:
                p.add_(0.3 * p.std().clamp(min=1e-3) * noise)


@pytest.fixture(scope="module")
def ops():
    from vlmlab.ops import cross_scan_triton

    return cross_scan_triton


@pytest.mark.parametrize("shape", [(2, 7, 9, 40), (1, 56, 56, 192), (3, 14, 14, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_dwconv_act_matches_conv2d(ops, shape, bias):
    b, h, w, d = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, h, w, d, generator=g)
    weight = torch.randn(d, 1, 3, 3, generator=g)
    bs = torch.randn(d, generator=g) if bias else None
    ref_bias = None if bs is None else bs.double()
    ref = F.conv2d(x.double().permute(0, 3, 1, 2), weight.double(), ref_bias, padding=1, groups=d)
    ref = F.silu(ref).permute(0, 2, 3, 1)
    got = ops.dwconv_act(x.cuda(), weight.cuda(), None if bs is None else bs.cuda())
    assert rel_err(got, ref) < 1e-6


def direction_reference(u, x_dbl, dt_weight, dt_bias, A_logs, Ds):
    """Each direction's scan output at its row-major position, (B, K, D, H, W), via cross_scan."""
    b, h, w, d = u.shape
    r = dt_weight.shape[-1]
    xs = V.cross_scan(u.permute(0, 3, 1, 2))  # (B, K, D, L) in scan order
    rows = x_dbl.view(b, h, w, K * (r + 2)).permute(0, 3, 1, 2)
    proj = V.cross_scan(rows).view(b, K, K, r + 2, h * w)  # (B, order, direction, R+2, L)
    proj = torch.stack([proj[:, k, k] for k in range(K)], dim=1)  # direction k in its own order
    dts = torch.einsum("bkrl,kdr->bkdl", proj[:, :, :r], dt_weight)
    Bs, Cs = proj[:, :, r : r + 1].contiguous(), proj[:, :, r + 1 :].contiguous()  # grouped, d_state 1
    us, dts = xs.reshape(b, K * d, -1), dts.reshape(b, K * d, -1)
    ys = selective_scan(
        us,
        dts,
        -torch.exp(A_logs),
        Bs,
        Cs,
        Ds,
        delta_bias=dt_bias.flatten(),
        delta_softplus=True,
        backend="chunked",
    ).view(b, K, d, h * w)
    ys = torch.cat([ys[:, :2], ys[:, 2:].flip(-1)], dim=1)  # undo the reversals
    cols = ys[:, 1::2].unflatten(-1, (w, h)).transpose(-1, -2)  # column-major back to rows
    out = torch.stack([ys[:, 0].view(b, d, h, w), cols[:, 0], ys[:, 2].view(b, d, h, w), cols[:, 1]], dim=1)
    return out


@pytest.mark.parametrize(
    "shape", [(2, 5, 7, 24, 2), (2, 14, 14, 64, 4), (1, 56, 56, 32, 6), (1, 9, 70, 40, 3)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cross_scan_fused_matches_each_direction(ops, shape, dtype):
    b, h, w, d, r = shape
    g = torch.Generator().manual_seed(1)
    u = torch.randn(b, h, w, d, generator=g, dtype=torch.float64)
    x_dbl = torch.randn(b * h * w, K * (r + 2), generator=g, dtype=torch.float64)
    dt_weight = torch.randn(K, d, r, generator=g, dtype=torch.float64) / r**0.5
    dt_bias = torch.randn(K, d, generator=g, dtype=torch.float64) - 2
    A_logs = 0.5 * torch.randn(K * d, 1, generator=g, dtype=torch.float64)
    Ds = torch.randn(K * d, generator=g, dtype=torch.float64)
    ref = direction_reference(u.to(dtype).double(), x_dbl.to(dtype).double(), dt_weight, dt_bias, A_logs, Ds)
    params = [t.float().cuda() for t in (dt_weight, dt_bias, A_logs, Ds)]
    ys = ops.cross_scan_fused(u.to(dtype).cuda(), x_dbl.to(dtype).cuda(), *params)
    assert ys.dtype == dtype and ys.shape == (b * h * w, K, d)
    got = ys.view(b, h, w, K, d).permute(0, 3, 4, 1, 2)
    assert rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("d", [24, 192, 1536])
def test_merge_layernorm(ops, d):
    g = torch.Generator().manual_seed(2)
    ys = 3 * torch.randn(37, K, d, generator=g) + 1
    weight, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    ref = F.layer_norm(ys.double().sum(1), (d,), weight.double(), bias.double(), 1e-5)
    got = ops.merge_layernorm(ys.cuda(), weight.cuda(), bias.cuda(), 1e-5)
    assert rel_err(got, ref) < 1e-6
    assert (
        ops.merge_layernorm(ys.cuda(), weight.cuda(), bias.cuda(), 1e-5, torch.bfloat16).dtype
        == torch.bfloat16
    )


@pytest.mark.parametrize("d", [96, 384])
def test_layer_norm_with_residual(ops, d):
    g = torch.Generator().manual_seed(5)
    x, res = torch.randn(3, 5, 7, d, generator=g), 2 * torch.randn(3, 5, 7, d, generator=g)
    weight, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    ref_sum = x.double() + res.double()
    ref = F.layer_norm(ref_sum, (d,), weight.double(), bias.double(), 1e-6)
    got, got_sum = ops.layer_norm(x.cuda(), weight.cuda(), bias.cuda(), 1e-6, residual=res.cuda())
    assert got_sum.shape == res.shape and rel_err(got_sum, ref_sum) < 1e-7
    assert rel_err(got.view_as(ref), ref) < 1e-6
    plain, none = ops.layer_norm(x.cuda(), weight.cuda(), bias.cuda(), 1e-6, out_dtype=torch.bfloat16)
    assert none is None and plain.dtype == torch.bfloat16
    ref = F.layer_norm(x.double(), (d,), weight.double(), bias.double(), 1e-6)
    assert rel_err(plain.view_as(ref), ref) < 1e-2


@pytest.mark.parametrize("tile", [(16, 8, 1), (32, 16, 1), (64, 4, 1), (128, 32, 4)])
def test_cross_scan_tiles(ops, monkeypatch, tile):
    """Tiles shorter than a line, several lines per tile, several warps: the same result."""
    monkeypatch.setattr(ops, "SCAN_TILES", {})
    monkeypatch.setattr(ops, "SCAN_TILE_DEFAULT", tile)
    test_cross_scan_fused_matches_each_direction(ops, (2, 30, 21, 24, 5), torch.float32)


def test_ss2d_forward_fused_matches_reference(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the 1x1 projections in IEEE fp32
    op = V.SS2D(48, ssm_ratio=2.0).eval()
    randomize_(op, 3)
    x = torch.randn(2, 48, 10, 13)
    with torch.no_grad():
        ref = op.double()(x.double())
        got = op.float().cuda().forward_fused(x.cuda().permute(0, 2, 3, 1).contiguous())
    assert rel_err(got.permute(0, 3, 1, 2), ref) < 1e-5


@pytest.mark.parametrize(("name", "size"), [("toy-vmamba", (64, 64)), ("vmamba-t", (96, 160))])
@pytest.mark.parametrize("tf32", [False, True])
def test_model_fused_matches_reference(monkeypatch, name, size, tf32):
    # every convolution, the 1x1 projections of the fused path included, follows cuDNN's setting;
    # TF32 keeps 10 mantissa bits, so with it on the bound is looser (a wiring error is O(1))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    tol = 2e-2 if tf32 else 1e-4
    enc = create_encoder(name, img_size=size).eval()
    randomize_(enc.model, 4)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = enc.model.double()(x.double())
        ref_tap = enc.double().forward_map(x.double())
        model = enc.model.float().cuda()
        blocks = [m for m in model.modules() if isinstance(m, V.VSSBlock)]
        assert all(blk._can_fuse(x.cuda()) for blk in blocks)
        got = model(x.cuda())
        got_tap = enc.forward_map(x.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got_bf16 = model(x.cuda())
    assert rel_err(got, ref) < tol
    assert rel_err(got_tap, ref_tap) < tol
    assert rel_err(got_bf16, ref) < 5e-2


def test_training_uses_autograd_path(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # NCHW and NHWC convs round apart
    enc = create_encoder("toy-vmamba").cuda()  # frozen by create_encoder: unfreeze to train
    enc.model.requires_grad_(True)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    blocks = [m for m in enc.model.modules() if isinstance(m, V.VSSBlock)]
    enc.model.train()
    assert not any(blk._can_fuse(x) for blk in blocks)  # training mode
    enc.model.eval()
    assert not any(blk._can_fuse(x) for blk in blocks)  # parameters need gradients
    out = enc.model(x)
    out.square().mean().backward()
    assert all(p.grad is not None for p in enc.model.parameters() if p.requires_grad)
    with torch.no_grad():
        assert all(blk._can_fuse(x) for blk in blocks)
        fused = enc.model(x)
        monkeypatch.setattr(V, "FUSED", False)
        assert rel_err(fused, enc.model(x)) < 1e-4
