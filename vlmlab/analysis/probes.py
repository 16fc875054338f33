"""Probes on frozen encoder tokens: what do the tokens linearly encode?

- linear classification probe on mean-pooled tokens (the toy "ImageNet" label);
- box-regression probe: ridge regression from all tokens to a box (does the grid keep "where"?);
- token-position probe: predict each token's grid index from its feature alone;
- token statistics: norms (high-norm outlier tokens) and effective rank of the token matrix.
All probes are closed-form or full-batch and seeded, so CPU results are deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _standardize(train: torch.Tensor, test: torch.Tensor):
    mu, sd = train.mean(0, keepdim=True), train.std(0, keepdim=True) + 1e-6
    return (train - mu) / sd, (test - mu) / sd


def linear_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    epochs: int = 200,
    lr: float = 0.1,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> float:
    """Test accuracy of a softmax-regression probe on features [N, D] (full-batch Adam, seeded)."""
    torch.manual_seed(seed)
    xtr, xte = _standardize(x_train.float(), x_test.float())
    n_cls = int(max(y_train.max(), y_test.max())) + 1
    lin = torch.nn.Linear(xtr.shape[1], n_cls)
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(lin(xtr), y_train).backward()
        opt.step()
    with torch.no_grad():
        return (lin(xte).argmax(-1) == y_test).float().mean().item()


def ridge_fit_predict(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, alpha: float = 10.0
):
    """Closed-form ridge regression (float64); returns predictions for x_test."""
    xtr, xte = _standardize(x_train.double(), x_test.double())
    xtr = torch.cat([xtr, torch.ones(len(xtr), 1, dtype=xtr.dtype)], 1)
    xte = torch.cat([xte, torch.ones(len(xte), 1, dtype=xte.dtype)], 1)
    # dual form when features outnumber samples
    if xtr.shape[1] > xtr.shape[0]:
        k = xtr @ xtr.T + alpha * torch.eye(len(xtr), dtype=xtr.dtype)
        w = xtr.T @ torch.linalg.solve(k, y_train.double())
    else:
        a = xtr.T @ xtr + alpha * torch.eye(xtr.shape[1], dtype=xtr.dtype)
        w = torch.linalg.solve(a, xtr.T @ y_train.double())
    return (xte @ w).float()


def box_iou_matrix_diag(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding rows of two [N, 4] box tensors (x1, y1, x2, y2)."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda z: (z[:, 2:] - z[:, :2]).clamp(min=0).prod(1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


def box_probe(tokens_train, boxes_train, tokens_test, boxes_test, alpha: float = 10.0) -> dict:
    """Ridge from flattened tokens [N, T*D] to normalised boxes; mean IoU and Acc@0.5 on test."""
    pred = ridge_fit_predict(tokens_train.flatten(1), boxes_train, tokens_test.flatten(1), alpha)
    iou = box_iou_matrix_diag(pred, boxes_test.float())
    return {"mean_iou": iou.mean().item(), "acc50": (iou >= 0.5).float().mean().item()}


def position_probe(tokens: torch.Tensor, n_train: int, epochs: int = 150, seed: int = 0) -> float:
    """Accuracy of predicting each token's grid index from its feature (chance = 1/T)."""
    N, T, D = tokens.shape
    y = torch.arange(T).repeat(N)
    x = tokens.reshape(N * T, D)
    cut = n_train * T
    return linear_probe(x[:cut], y[:cut], x[cut:], y[cut:], epochs=epochs, seed=seed)


def run_probes(
    tokens_train, y_train, boxes_train, tokens_test, y_test, boxes_test, n_position: int = 300
) -> dict:
    """The three probes on one token set [N, T, D]: classification (pooled), box regression, position.

    The position probe trains on the first 2/3 of `n_position` images (train tokens first, then test
    tokens), as the notebook's encoder-level table does.
    """
    n_pos_train = (2 * n_position) // 3
    pos_tokens = torch.cat([tokens_train[:n_pos_train], tokens_test[: n_position - n_pos_train]])
    box = box_probe(tokens_train, boxes_train, tokens_test, boxes_test)
    return {
        "cls_probe_acc": linear_probe(pooled(tokens_train), y_train, pooled(tokens_test), y_test),
        "box_probe_iou": box["mean_iou"],
        "box_probe_acc50": box["acc50"],
        "position_probe_acc": position_probe(pos_tokens, n_train=min(n_pos_train, len(tokens_train))),
        "chance_position": 1 / tokens_train.shape[1],
    }


@torch.no_grad()
def intermediate_tokens(
    encoder,
    root,
    images: list[str],
    policy: str | None,
    img_size: int,
    taps: list[str] | None = None,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Tokens [N, h*w, C] (row-major) of the maps `encoder.intermediates(pixels, taps)` returns
    (taps=None: the encoder's default set), for `images` in order.

    Not cached: the frozen-feature cache (`vlmlab.features`) holds the VLM tap only. Every tap of every
    image is held in memory, so at paper resolutions pass fewer images or `taps`.
    """
    from vlmlab.data.datasets import iter_pixel_batches

    refs = [{"id": im, "image": im} for im in images]
    chunks: dict[str, list[torch.Tensor]] = {}
    for _, pix, _ in iter_pixel_batches(root, refs, encoder.spec, policy, img_size, batch_size, desc="taps"):
        for tap, fmap in encoder.eval().intermediates(pix, taps).items():
            chunks.setdefault(tap, []).append(fmap.flatten(2).transpose(1, 2).float())
    return {tap: torch.cat(c) for tap, c in chunks.items()}


# ----------------------------------------------------------------------------------------------
# token statistics: norms (high-norm outlier tokens) and effective rank


def token_norms(tokens: torch.Tensor, relative: bool = True) -> torch.Tensor:
    """L2 norm of every token, [N, T]; with `relative`, divided by the median token norm of its image."""
    norms = tokens.float().norm(dim=-1)
    if relative:
        norms = norms / norms.median(dim=-1, keepdim=True).values.clamp_min(1e-12)
    return norms


def norm_histogram(tokens: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Share of tokens [N, T, D] whose relative norm (`token_norms`) falls in each bin of `edges`
    ([B+1], increasing); norms past the last edge count in the last bin."""
    rel = token_norms(tokens).flatten().double().clamp(max=float(edges[-1]))
    counts = torch.histogram(rel, bins=edges.double()).hist
    return counts / rel.numel()


def border_mask(grid: tuple[int, int]) -> torch.Tensor:
    """[h*w] bool, row-major: True on the outermost ring of an h x w token grid."""
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)


def token_norm_stats(
    tokens: torch.Tensor, outlier_factor: float = 3.0, grid: tuple[int, int] | None = None
) -> dict:
    """Token-norm statistics and high-norm outlier tokens of tokens [N, T, D] (row-major grid).

    A token is an outlier when its L2 norm exceeds `outlier_factor` x the median token norm of its own
    image. Why a ratio to the median rather than median + k*MAD: high-norm "artifact" tokens (Darcet
    et al. 2024, "Vision Transformers Need Registers"; Sun et al. 2024, "Massive Activations") are a
    matter of *scale* — several times the norm of ordinary tokens — whereas a MAD rule flags the tail
    of any unimodal distribution, and in high dimension norms concentrate (sd ~0.7 around sqrt(D) for
    Gaussian tokens), so median + k*MAD lands a few percent above the median and calls ordinary
    tokens outliers. The ratio is scale-free (comparable across encoders) and never fires on iid
    Gaussian tokens (D >= 8) at the default factor 3. The median is per image so that images whose
    tokens are all large (contrast, clutter) do not count as outliers.

    Args:
        tokens: [N, T, D] tokens of N images.
        outlier_factor: the ratio to the image's median norm above which a token is an outlier.
        grid: (h, w) of the token grid, h*w = T; default: square.

    Returns scalars: mean/median norm; p99 and max of the relative norm (norm / image median);
    outlier_share (over all tokens), outlier_image_share (images with at least one outlier),
    outliers_per_image; where outliers sit: outlier_border_share against border_share_chance (the
    share of grid positions on the border), outlier_mean_row / outlier_mean_col in [0, 1] (0 = top /
    left; NaN where there are no outliers).
    """
    N, T, _ = tokens.shape
    if grid is None:
        side = round(T**0.5)
        if side * side != T:
            raise ValueError(f"token_norm_stats: {T} tokens are not a square grid; pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    if h * w != T:
        raise ValueError(f"token_norm_stats: grid {grid} has {h * w} cells, tokens have {T}")
    norms = token_norms(tokens, relative=False)
    rel = token_norms(tokens, relative=True)
    out = rel > outlier_factor  # [N, T]
    n_out = out.sum()
    border = border_mask(grid).float()
    rows = torch.arange(h).repeat_interleave(w) / max(h - 1, 1)
    cols = torch.arange(w).repeat(h) / max(w - 1, 1)
    per_pos = out.float().sum(0)  # outliers at each grid position
    nan = float("nan")
    return {
        "mean_norm": norms.mean().item(),
        "median_norm": norms.median().item(),
        "p99_over_median": torch.quantile(rel.flatten().double(), 0.99).item(),
        "max_over_median": rel.max().item(),
        "outlier_share": out.float().mean().item(),
        "outlier_image_share": out.any(1).float().mean().item(),
        "outliers_per_image": out.sum(1).float().mean().item(),
        "outlier_border_share": (per_pos @ border / n_out).item() if n_out else nan,
        "border_share_chance": border.mean().item(),
        "outlier_mean_row": (per_pos @ rows / n_out).item() if n_out else nan,
        "outlier_mean_col": (per_pos @ cols / n_out).item() if n_out else nan,
    }


def effective_rank_batched(
    matrices: torch.Tensor, center: bool = False, rtol: float | None = None
) -> torch.Tensor:
    """Effective rank (Roy & Vetterli, 2007) of each matrix in a batch [..., M, D]; returns [...].

    erank = exp(H(p)), p = singular values / their sum, H the Shannon entropy (nats). It lies in
    [1, rank]: equal to the rank when the non-zero singular values are equal, 1 for rank 1, and it is
    unchanged by scaling. Singular values at or below `rtol` x the largest are rounding noise and
    dropped (default rtol: eps(dtype) x max(M, D), as `torch.linalg.matrix_rank`); a zero matrix has
    erank 0. With `center`, each matrix's column mean (its mean row, e.g. the mean token) is removed
    first, so a direction shared by all rows does not count as one dominant dimension.
    """
    if rtol is None:
        eps = torch.finfo(matrices.dtype if matrices.is_floating_point() else torch.float32).eps
        rtol = eps * max(matrices.shape[-2:])
    x = matrices.double()
    if center:
        x = x - x.mean(-2, keepdim=True)
    s = torch.linalg.svdvals(x)
    s = torch.where(s > rtol * s.amax(-1, keepdim=True), s, torch.zeros_like(s))
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(x.dtype).tiny)
    erank = torch.exp(-torch.special.xlogy(p, p).sum(-1))
    return torch.where(total.squeeze(-1) > 0, erank, torch.zeros_like(erank))


def effective_rank(matrix: torch.Tensor, center: bool = False, rtol: float | None = None) -> float:
    """Effective rank (Roy & Vetterli, 2007) of one matrix [M, D]; tokens [N, T, D] are pooled to
    [N*T, D] first (the token matrix of the whole set). See `effective_rank_batched`."""
    return effective_rank_batched(matrix.reshape(-1, matrix.shape[-1]), center, rtol).item()


def effective_rank_per_image(
    tokens: torch.Tensor, center: bool = False, rtol: float | None = None
) -> torch.Tensor:
    """Effective rank of each image's token matrix [T, D], for tokens [N, T, D]; returns [N]."""
    return effective_rank_batched(tokens, center, rtol)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two feature matrices on the same N samples (Kornblith et al., 2019)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    hsic = (x.T @ y).norm() ** 2
    return float(hsic / ((x.T @ x).norm() * (y.T @ y).norm()))


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.float().mean(1)
