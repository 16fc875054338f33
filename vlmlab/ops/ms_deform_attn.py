"""Multi-scale deformable attention (Deformable DETR, Zhu et al., ICLR 2021) in pure PyTorch.

The sampling rule is the one of the reference CUDA kernel and of the official pure-PyTorch core
(`ms_deform_attn_core_pytorch` in Deformable-DETR / ViT-Adapter `ops/functions/ms_deform_attn_func.py`):
locations are normalised (x, y) in [0, 1] per level, each point is read by bilinear interpolation at
pixel coordinate `loc * size - 0.5` (grid_sample, align_corners=False), and neighbours outside the
map count as zero (padding_mode="zeros"). The per-level samples are weighted by the attention
weights and summed. This runs on any device; no compiled extension is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn", "reference_points"]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Samples every level at the given locations and sums them with the attention weights.

    Args:
        value: (B, S, heads, D) values of all levels, flattened row-major and concatenated;
            S = sum(H_l * W_l).
        spatial_shapes: (H_l, W_l) of each level, in the order of `value`.
        sampling_locations: (B, Q, heads, L, P, 2) normalised (x, y) in [0, 1].
        attention_weights: (B, Q, heads, L, P), already normalised over L*P.
    Returns:
        (B, Q, heads * D)
    """
    b, _, heads, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    if len(spatial_shapes) != levels:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {levels} levels of sampling locations")
    sizes = [h * w for h, w in spatial_shapes]
    if sum(sizes) != value.shape[1]:
        raise ValueError(
            f"value holds {value.shape[1]} positions; spatial shapes {list(spatial_shapes)} "
            f"sum to {sum(sizes)}"
        )

    out_dtype = value.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        # like the official autograd function (custom_fwd(cast_inputs=float32)): sample in float32
        value, sampling_locations, attention_weights = (
            t.float() for t in (value, sampling_locations, attention_weights)
        )
    grids = 2 * sampling_locations.to(value.dtype) - 1  # grid_sample's [-1, 1] frame
    samples = []
    for lvl, (v, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes, strict=True)):
        # (B, HW, heads, D) -> (B*heads, D, H, W)
        v = v.flatten(2).transpose(1, 2).reshape(b * heads, d, h, w)
        # (B, Q, heads, P, 2) -> (B*heads, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*heads, D, Q, L*P) weighted by (B*heads, 1, Q, L*P), summed over the L*P samples
    stacked = torch.stack(samples, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (stacked * weights.to(value.dtype)).sum(-1).view(b, heads * d, q)
    return out.transpose(1, 2).contiguous().to(out_dtype)


def reference_points(
    spatial_shapes: Sequence[tuple[int, int]], device: torch.device | str | None = None
) -> torch.Tensor:
    """Normalised (x, y) centres of every cell of every level, (1, sum(H*W), 1, 2), in float32.

    Float32 on purpose: the official code builds them in float32 whatever the model dtype, and the
    rounding of (i + 0.5) / H in float32 is visible in a float64 comparison.
    """
    refs = []
    for h, w in spatial_shapes:
        ys = torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device) / h
        xs = torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device) / w
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
    return torch.cat(refs, 0)[None, :, None]
