"""The study as a notebook suite: `python -m vlmlab.run --preset toy-cpu`.

Executes notebooks/01..05 (or a chosen subset) with papermill at the preset, writes the executed
notebooks (with their `metadata.papermill`: the record of what ran) to runs/<suite>/notebooks/,
then derives runs/<suite>/summary.json from the per-run results and prints the table. Rerunning
resumes: finished training runs and scored items are skipped.

The suite helpers below (`prepare`, `train_suite`, `evaluate_suite`, `suite_summary`) are what the
notebooks call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from vlmlab.config import Config, load_preset, project_root, run_id, runs_dir
from vlmlab.io import atomic_write_json, read_json

NOTEBOOKS = [
    "01_encoder_loading",
    "02_feature_probing",
    "03_connector_training",
    "04_evaluation",
    "05_localization_instability",
    "06_findings",
    "07_efficiency",
]
TOY_NOTE = "toy-world numbers: they test the pipeline and the study's questions on synthetic data, not the paper's models"


def suite_dir(cfg: Config, run_root: str | Path | None = None) -> Path:
    return Path(run_root) if run_root else runs_dir() / cfg.name


def prepare(cfg: Config, encoders: list[str] | None = None) -> None:
    """Makes sure the toy world exists and the toy encoders are pretrained (matched init)."""
    from vlmlab.data.toyworld import WORLD_PRESETS, generate_world
    from vlmlab.pretrain import pretrain_encoder
    from vlmlab.train import world_root

    if cfg.world in WORLD_PRESETS:
        generate_world(WORLD_PRESETS[cfg.world], world_root(cfg))
    for name in encoders or cfg.encoders:
        if name.startswith("toy-"):
            pretrain_encoder(cfg, name)


def run_dirs(cfg: Config, run_root: str | Path | None = None) -> dict[tuple[str, int], Path]:
    root = suite_dir(cfg, run_root) / "vlm"
    return {(e, s): root / run_id(e, cfg, s) for e in cfg.encoders for s in cfg.seeds}


def train_suite(cfg: Config, run_root: str | Path | None = None) -> dict[tuple[str, int], Path]:
    """Trains every (encoder, seed) of the preset; finished runs are skipped."""
    from vlmlab.train import train

    prepare(cfg)
    dirs = run_dirs(cfg, run_root)
    for (enc, seed), d in dirs.items():
        train(cfg, enc, seed, d)
    return dirs


def evaluate_suite(cfg: Config, run_root: str | Path | None = None) -> dict[tuple[str, int], dict]:
    """Evaluates every trained run of the suite (resumable); returns each run's summary."""
    from vlmlab.evaluate.harness import evaluate_run

    return {k: evaluate_run(d) for k, d in train_suite(cfg, run_root).items()}


def suite_summary(cfg: Config, run_root: str | Path | None = None) -> dict:
    """Per encoder, mean over seeds: VQA accuracy, grounding Acc@0.5, invalid-box rate, baselines."""
    out = {
        "preset": cfg.name,
        "world": cfg.world,
        "note": TOY_NOTE if cfg.world in ("smoke", "toy-cpu", "toy-gpu") else "",
        "vqa_variant": cfg.eval.vqa_variant,
        "encoders": {},
    }
    for enc in cfg.encoders:
        per_seed = {}
        for (e, s), d in run_dirs(cfg, run_root).items():
            if e == enc and (d / "summary.json").is_file():
                per_seed[s] = read_json(d / "summary.json")
        if not per_seed:
            continue
        vqa = [r["benchmarks"]["toy-vqa"]["score"] for r in per_seed.values()]
        loc = [r["benchmarks"]["toy-ref"]["score"] for r in per_seed.values()]
        inv = [r["benchmarks"]["toy-ref"]["invalid_rate"] for r in per_seed.values()]
        base = next(iter(per_seed.values()))["baselines"]
        out["encoders"][enc] = {
            "vqa_accuracy": float(np.mean(vqa)),
            "grounding_acc50": float(np.mean(loc)),
            "invalid_box_rate": float(np.mean(inv)),
            "baselines": {
                "vqa_majority": base["vqa_majority"],
                "grounding_mean_box": base["grounding_mean_box"],
            },
            "seeds": {
                str(s): {"vqa_accuracy": v, "grounding_acc50": g}
                for s, v, g in zip(per_seed, vqa, loc, strict=True)
            },
            "n_seeds": len(per_seed),
        }
    return out


def format_table(summary: dict) -> str:
    rows = [
        f"{'encoder':<22}{'VQA acc':>9}{'Acc@0.5':>9}{'invalid':>9}{'VQA maj.':>10}{'mean box':>10}  seeds"
    ]
    for name, r in summary["encoders"].items():
        b = r["baselines"]
        rows.append(
            f"{name:<22}{r['vqa_accuracy']:>9.3f}{r['grounding_acc50']:>9.3f}{r['invalid_box_rate']:>9.3f}"
            f"{b['vqa_majority']:>10.3f}{b['grounding_mean_box']:>10.3f}  {r['n_seeds']}"
        )
    if summary.get("note"):
        rows.append(f"({summary['note']})")
    return "\n".join(rows)


def run_notebooks(preset: str, suite: Path, notebooks: list[str], overrides: list[str]) -> list[Path]:
    import papermill as pm

    nb_dir = project_root() / "notebooks"
    out_dir = suite / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for nb in notebooks:
        src = nb_dir / f"{nb}.ipynb"
        dst = out_dir / f"{nb}.ipynb"
        t0 = time.time()
        print(f"[run] {nb} ...", flush=True)
        pm.execute_notebook(
            str(src),
            str(dst),
            parameters={"preset": preset, "run_root": str(suite), "overrides": overrides},
            cwd=str(nb_dir),
            progress_bar=False,
            kernel_name="python3",
        )
        print(f"[run] {nb} done in {time.time() - t0:.0f}s -> {dst}", flush=True)
        written.append(dst)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the vlmlab notebook suite with papermill.")
    ap.add_argument("--preset", default="toy-cpu")
    ap.add_argument("--run-id", default=None, help="suite folder under runs/ (default: the preset name)")
    ap.add_argument("--notebooks", nargs="*", default=NOTEBOOKS)
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    a = ap.parse_args(argv)
    cfg = load_preset(a.preset, a.overrides)
    suite = runs_dir() / (a.run_id or cfg.name)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.time()
    run_notebooks(a.preset, suite, a.notebooks, a.overrides)
    summary = suite_summary(cfg, suite)
    summary["wall_seconds"] = round(time.time() - t0, 1)
    atomic_write_json(suite / "summary.json", summary)
    print(format_table(summary))
    print(
        f"[run] wrote {suite / 'summary.json'} and {suite / 'notebooks'}/ in {summary['wall_seconds']:.0f}s"
    )


if __name__ == "__main__":
    sys.exit(main())
