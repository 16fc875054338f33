"""Plotly figure builders (they return Figures and never call .show()) and `save_figure`.

Every figure drawn from the toy world says so in its title.
"""

from __future__ import annotations

import json
from pathlib import Path

import plotly.graph_objects as go

from vlmlab.config import figures_dir

TOY = " (toy world)"


def save_figure(
    fig: go.Figure,
    name: str,
    out_dir: str | Path | None = None,
    png: bool = True,
    data: list[dict] | None = None,
) -> list[Path]:
    """Writes figures/<name>.html (always), .png (where kaleido can render) and, given `data` (the
    rows the figure was drawn from), <name>.csv beside them; returns the paths."""
    out = Path(out_dir) if out_dir else figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.html"]
    fig.write_html(str(paths[0]), include_plotlyjs="cdn", full_html=True)
    if png:
        try:
            fig.write_image(str(out / f"{name}.png"), width=900, height=500, scale=1)
            paths.append(out / f"{name}.png")
        except Exception as e:  # kaleido missing or no browser for it: HTML is still written
            print(f"[plots] {name}.png not written ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if data:
        paths.append(write_csv(data, out / f"{name}.csv"))
    return paths


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Rows (dicts; columns = the union of their keys, in first-seen order) as CSV, written atomically."""
    import csv
    import io

    from vlmlab.io import atomic_write_text

    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, lineterminator="\n")
    w.writeheader()
    w.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def bars_with_ci(
    rows: list[dict], x: str, y: str, lo: str, hi: str, title: str, color: str | None = None
) -> go.Figure:
    """Bar chart of rows[y] with asymmetric error bars [lo, hi]; one trace per rows[color] value."""
    groups = {}
    for r in rows:
        groups.setdefault(r.get(color, "") if color else "", []).append(r)
    fig = go.Figure()
    for g, rs in groups.items():
        fig.add_bar(
            name=str(g),
            x=[r[x] for r in rs],
            y=[r[y] for r in rs],
            error_y=dict(
                type="data",
                symmetric=False,
                array=[r[hi] - r[y] for r in rs],
                arrayminus=[r[y] - r[lo] for r in rs],
            ),
        )
    fig.update_layout(title=title, barmode="group", yaxis_title=y, template="plotly_white")
    return fig


def loss_curves(runs: dict[str, list[dict]], title: str = "Training loss" + TOY) -> go.Figure:
    fig = go.Figure()
    for name, metrics in runs.items():
        fig.add_scatter(
            x=[m["step"] for m in metrics], y=[m["loss"] for m in metrics], mode="lines", name=name
        )
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", template="plotly_white")
    return fig


def histogram(values: dict[str, list[float]], title: str, xaxis: str, nbins: int = 20) -> go.Figure:
    fig = go.Figure()
    for name, v in values.items():
        fig.add_histogram(x=v, name=name, nbinsx=nbins, opacity=0.6)
    fig.update_layout(title=title, barmode="overlay", xaxis_title=xaxis, template="plotly_white")
    return fig


def stacked_shares(shares: dict[str, dict[str, float]], title: str) -> go.Figure:
    """Stacked bars: for each run (key), the share of each category (inner key)."""
    cats = sorted({c for s in shares.values() for c in s})
    fig = go.Figure()
    for c in cats:
        fig.add_bar(name=c, x=list(shares), y=[s.get(c, 0.0) for s in shares.values()])
    fig.update_layout(title=title, barmode="stack", yaxis_title="share", template="plotly_white")
    return fig


def scatter_seeds(points: dict[str, list[float]], title: str, yaxis: str) -> go.Figure:
    """One column of points per encoder (one point per seed)."""
    fig = go.Figure()
    for name, v in points.items():
        fig.add_scatter(x=[name] * len(v), y=v, mode="markers", name=name, marker=dict(size=10))
    fig.update_layout(title=title, yaxis_title=yaxis, template="plotly_white", showlegend=False)
    return fig


def heatmap(matrix, labels: list[str], title: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=matrix, x=labels, y=labels, colorscale="Viridis", zmin=0, zmax=1))
    fig.update_layout(title=title, template="plotly_white")
    return fig


def _cell(v):
    if isinstance(v, float):
        return f"{v:.3f}"
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def table(rows: list[dict], title: str = "") -> go.Figure:
    """A plotly table of dict rows; columns in first-seen order over all rows, blanks where missing."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fig = go.Figure(
        go.Table(
            header=dict(values=cols), cells=dict(values=[[_cell(r.get(c, "")) for r in rows] for c in cols])
        )
    )
    fig.update_layout(title=title)
    return fig
