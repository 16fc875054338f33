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


def token_norm_stats(tokens: torch.Tensor, outlier_factor: float = 3.0) -> dict:
    """Token L2 norms: mean, max/median ratio, and the share of tokens above factor x median."""
    norms = tokens.float().norm(dim=-1)
    med = norms.median()
    return {
        "mean_norm": norms.mean().item(),
        "max_over_median": (norms.max() / med).item(),
        "outlier_share": (norms > outlier_factor * med).float().mean().item(),
    }


def effective_rank(tokens: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of the centred token matrix [N*T, D] (Roy & Vetterli)."""
    x = tokens.reshape(-1, tokens.shape[-1]).double()
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two feature matrices on the same N samples (Kornblith et al., 2019)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    hsic = (x.T @ y).norm() ** 2
    return float(hsic / ((x.T @ x).norm() * (y.T @ y).norm()))


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.float().mean(1)
