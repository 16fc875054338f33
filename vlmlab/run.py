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
import itertools
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vlmlab.config import Config, load_preset, project_root, run_id, runs_dir
from vlmlab.io import atomic_write_json, atomic_write_text, read_json

NOTEBOOKS = [
    "01_encoder_loading",
    "02_feature_probing",
    "03_connector_training",
    "04_evaluation",
    "05_localization_instability",
    "06_findings",
    "07_efficiency",
]
TOY_NOTE = (
    "toy-world numbers: they test the pipeline and the study's questions on synthetic data, "
    "not the paper's models"
)


def suite_dir(cfg: Config, run_root: str | Path | None = None) -> Path:
    return Path(run_root) if run_root else runs_dir() / cfg.name


class Cell(NamedTuple):
    """One cell of a suite's grid: what one VLM run trains (everything else is the preset's)."""

    encoder: str
    init: str
    connector: str
    policy: str | None
    seed: int

    def config(self, cfg: Config) -> Config:
        return replace(cfg, init=self.init, connector=self.connector, policy=self.policy)

    def label(self) -> str:
        """encoder[@init] / connector / policy, without the seed (what seeds are repeats of)."""
        init = "" if self.init == "classification" else f"@{self.init[:3]}"
        return f"{self.encoder}{init} / {self.connector} / {self.policy or 'default'}"


def sweep_cells(cfg: Config) -> list[Cell]:
    """encoders x inits x connectors x policies x seeds (`cfg.sweep`; empty lists = the preset's value)."""
    sw = cfg.sweep
    grid = itertools.product(
        cfg.encoders,
        sw.inits or [cfg.init],
        sw.connectors or [cfg.connector],
        sw.policies or [cfg.policy],
        cfg.seeds,
    )
    return [Cell(*g) for g in grid]


def prepare(cfg: Config, encoders: list[str] | None = None, workers: int = 1) -> None:
    """Makes sure the toy world exists and the toy encoders are pretrained (matched init) and, where
    the sweep asks for them, adapted on toy detection / segmentation; `workers` encoders at a time."""
    from vlmlab.data.toyworld import WORLD_PRESETS, generate_world
    from vlmlab.train import world_root

    if cfg.world in WORLD_PRESETS:
        generate_world(WORLD_PRESETS[cfg.world], world_root(cfg), workers=min(8, os.cpu_count() or 1))
    names = [n for n in encoders or cfg.encoders if n.startswith("toy-")]
    tasks = sorted({c.init for c in sweep_cells(cfg)} - {"classification"})
    _in_pool(_prepare_job, [(cfg.to_dict(), n, None) for n in names], workers)  # matched init first
    _in_pool(_prepare_job, [(cfg.to_dict(), n, t) for n in names for t in tasks], workers)


def _prepare_job(cfg_dict: dict, name: str, task: str | None) -> str:
    """Pretrains (task None) or adapts one toy encoder; finished ones are skipped inside."""
    from vlmlab.adapt import adapt_encoder
    from vlmlab.config import config_from_dict
    from vlmlab.pretrain import pretrain_encoder

    cfg = config_from_dict(cfg_dict)
    return str(pretrain_encoder(cfg, name) if task is None else adapt_encoder(cfg, name, task))


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _pin_worker(counter, gpus: list[str]) -> None:
    """Pool initializer: the k-th worker started sees only GPU k mod len(gpus) (before CUDA starts)."""
    with counter.get_lock():
        k = counter.value
        counter.value += 1
    if len(gpus) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
    # many processes share a card: growable segments keep each one's cached-but-free memory small
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def gpu_worker_cap(cell_gpu_gib: float | None) -> int | None:
    """How many cells the visible GPUs hold at once if each may take `cell_gpu_gib` GiB at its peak
    (cards of a host alike: the smallest counts); None without a GPU or an estimate."""
    gpus = visible_gpus() if cell_gpu_gib else []
    import torch

    if not gpus or not torch.cuda.is_available():
        return None
    gib = min(torch.cuda.get_device_properties(i).total_memory for i in range(len(gpus))) / 2**30
    return len(gpus) * max(1, int(gib // cell_gpu_gib))


def process_pool(workers: int):
    """A pool of spawned workers spread round-robin over the visible GPUs (one GPU each), so a sweep
    on an N-GPU host runs about workers / N cells per GPU; on CPU or one GPU nothing is pinned."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    return ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_pin_worker, initargs=(ctx.Value("i", 0), visible_gpus())
    )


def _in_pool(fn, jobs: list[tuple], workers: int) -> list:
    """fn(*job) for every job: in this process if workers <= 1, else in spawned processes."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    with process_pool(min(workers, len(jobs))) as pool:
        return list(pool.map(fn, *zip(*jobs, strict=True)))


def run_dirs(cfg: Config, run_root: str | Path | None = None) -> dict[Cell, Path]:
    root = suite_dir(cfg, run_root) / "vlm"
    return {c: root / run_id(c.encoder, c.config(cfg), c.seed) for c in sweep_cells(cfg)}


def run_cell(cfg: Config, cell: Cell, run_dir: Path, evaluate: bool = True) -> Path:
    """Trains (and evaluates) one cell; finished work is skipped, so a rerun resumes."""
    from vlmlab.evaluate.harness import evaluate_run
    from vlmlab.train import train

    c = cell.config(cfg)
    train(c, cell.encoder, cell.seed, run_dir)
    if evaluate and not (run_dir / "summary.json").is_file():
        evaluate_run(run_dir)
    return run_dir


def _run_cell_job(cfg_dict: dict, cell: tuple, run_dir: str, evaluate: bool) -> str:
    """Process-pool entry point (picklable arguments only)."""
    import torch

    from vlmlab.config import config_from_dict

    torch.set_num_threads(int(os.environ.get("VLMLAB_CELL_THREADS", "1")))  # workers share the cores
    return str(run_cell(config_from_dict(cfg_dict), Cell(*cell), Path(run_dir), evaluate))


def run_suite(
    cfg: Config, run_root: str | Path | None = None, evaluate: bool = True, workers: int | None = None
) -> dict[Cell, Path]:
    """Runs every cell of the suite's grid, `cfg.sweep.workers` at a time; finished cells are skipped."""
    dirs = run_dirs(cfg, run_root)
    todo = {
        c: d for c, d in dirs.items() if not (d / ("summary.json" if evaluate else "done.json")).is_file()
    }
    # seed-major order: a sweep stopped early leaves whole replicates of the grid, not whole encoders;
    # connector next, so cells that start together read different feature caches (the connector is
    # the only factor the cache does not depend on) instead of building the same one twice
    conns = list(dict.fromkeys(c.connector for c in dirs))  # the grid's connectors, in grid order
    todo = dict(
        sorted(todo.items(), key=lambda kv: (cfg.seeds.index(kv[0].seed), conns.index(kv[0].connector)))
    )
    workers = min(workers or cfg.sweep.workers, len(todo)) if todo else 1
    cap = gpu_worker_cap(cfg.sweep.cell_gpu_gib)
    if cap is not None and workers > cap:  # more would run the cards out of memory mid-sweep
        print(f"[suite] {workers} workers would not fit the GPUs' memory: running {cap}")
        workers = cap
    if todo:
        # encoder training is heavier than a cell: at most 4 jobs per GPU
        prepare(cfg, workers=min(workers, 4 * max(1, len(visible_gpus()))))
    done = len(dirs) - len(todo)
    print(f"[suite] {len(dirs)} cells, {done} finished, {len(todo)} to run ({workers} at a time)")
    failed: list[tuple[Cell, BaseException]] = []  # pool cells that raised: the others still run
    if workers <= 1:
        for c, d in todo.items():
            run_cell(cfg, c, d, evaluate)
            if evaluate:  # the table grows as cells finish, so a stopped sweep still has one
                write_sweep_csv(cfg, run_root)
    else:
        from concurrent.futures import as_completed

        with process_pool(workers) as pool:
            jobs = {
                pool.submit(_run_cell_job, cfg.to_dict(), tuple(c), str(d), evaluate): c
                for c, d in todo.items()
            }
            for i, job in enumerate(as_completed(jobs), 1):
                c = jobs[job]
                if (err := job.exception()) is not None:
                    failed.append((c, err))
                    print(
                        f"[suite] {i}/{len(todo)} FAILED {todo[c]}: {type(err).__name__}: {err}", flush=True
                    )
                    continue
                print(f"[suite] {i}/{len(todo)} {c.label()} s{c.seed}", flush=True)
                if evaluate:
                    write_sweep_csv(cfg, run_root)
    if evaluate:
        write_sweep_csv(cfg, run_root)
    if failed:
        names = "\n".join(f"  {todo[c]}: {e!r}" for c, e in failed[:20])
        raise RuntimeError(
            f"{len(failed)} of {len(todo)} cells failed (rerunning retries just those):\n{names}"
        ) from failed[0][1]
    return dirs


def train_suite(cfg: Config, run_root: str | Path | None = None) -> dict[Cell, Path]:
    """Trains every cell of the suite (resumable)."""
    return run_suite(cfg, run_root, evaluate=False)


def evaluate_suite(cfg: Config, run_root: str | Path | None = None) -> dict[Cell, dict]:
    """Trains and evaluates every cell of the suite (resumable); returns each run's summary."""
    return {c: read_json(d / "summary.json") for c, d in run_suite(cfg, run_root).items()}


SWEEP_COLUMNS = [
    "encoder", "family", "params", "toy_top1", "init", "connector", "policy", "seed",
    "vqa_accuracy", "grounding_acc50", "invalid_box_rate", "near_constant_share", "pred_box_std",
    "gt_box_std", "n_vqa", "n_ref", "vqa_majority", "grounding_mean_box", "run",
    "train_loop_s", "eval_s",
]  # fmt: skip


def sweep_rows(cfg: Config, run_root: str | Path | None = None) -> list[dict]:
    """One row per finished cell: its grid coordinates, encoder facts and scores."""
    from vlmlab.pretrain import pretrain_report

    facts = {}
    for enc in cfg.encoders:
        try:
            facts[enc] = pretrain_report(cfg, [enc])[0]
        except FileNotFoundError:
            facts[enc] = {}
    rows = []
    for c, d in run_dirs(cfg, run_root).items():
        if not (d / "summary.json").is_file():
            continue
        summ = read_json(d / "summary.json")
        vqa, ref = summ["benchmarks"]["toy-vqa"], summ["benchmarks"]["toy-ref"]
        sig = _cached_signals(d)
        f = facts[c.encoder]
        done = read_json(d / "done.json") if (d / "done.json").is_file() else {}
        rows.append(
            {
                "encoder": c.encoder,
                "family": f.get("family", ""),
                "params": f.get("params", ""),
                "toy_top1": f.get("toy_top1", ""),
                "init": c.init,
                "connector": c.connector,
                "policy": c.policy or "default",
                "seed": c.seed,
                "vqa_accuracy": vqa["score"],
                "grounding_acc50": ref["score"],
                "invalid_box_rate": ref["invalid_rate"],
                "near_constant_share": sig["near_constant_share"],
                "pred_box_std": sig["pred_box_std"],
                "gt_box_std": sig["gt_box_std"],
                "n_vqa": vqa["n"],
                "n_ref": ref["n"],
                "vqa_majority": summ["baselines"]["vqa_majority"],
                "grounding_mean_box": summ["baselines"]["grounding_mean_box"],
                "run": d.name,
                # where a cell's time goes (wall seconds of its last training / evaluation process)
                "train_loop_s": done.get("loop_seconds", ""),
                "eval_s": summ.get("eval_seconds", ""),
            }
        )
    return rows


def _cached_signals(run_dir: Path) -> dict:
    """A finished run's collapse signals, computed once (the table is rewritten after every cell)."""
    from vlmlab.analysis.instability import collapse_signals
    from vlmlab.evaluate.harness import read_results

    cache, summary = run_dir / "collapse_signals.json", run_dir / "summary.json"
    stamp = summary.stat().st_mtime_ns
    if cache.is_file() and (hit := read_json(cache)).get("summary_mtime_ns") == stamp:
        return hit["signals"]
    sig = collapse_signals(read_results(run_dir / "results" / "toy-ref.jsonl"))
    atomic_write_json(cache, {"summary_mtime_ns": stamp, "signals": sig})
    return sig


def write_sweep_csv(cfg: Config, run_root: str | Path | None = None) -> Path:
    """runs/<suite>/sweep.csv: every finished cell, one row each (rewritten atomically)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, SWEEP_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(sweep_rows(cfg, run_root))
    out = suite_dir(cfg, run_root) / "sweep.csv"
    atomic_write_text(out, buf.getvalue())
    return out


def suite_summary(cfg: Config, run_root: str | Path | None = None) -> dict:
    """Per encoder (per grid cell label when the suite sweeps inits/connectors/policies), mean over
    seeds: VQA accuracy, grounding Acc@0.5, invalid-box rate, baselines."""
    out = {
        "preset": cfg.name,
        "world": cfg.world,
        "note": TOY_NOTE if cfg.world in ("smoke", "toy-cpu", "toy-gpu") else "",
        "vqa_variant": cfg.eval.vqa_variant,
        "encoders": {},
    }
    groups: dict[str, dict[int, dict]] = {}
    cells = run_dirs(cfg, run_root)
    one_config = len({c[1:4] for c in cells}) == 1  # a plain encoders x seeds suite: key by encoder
    for c, d in cells.items():
        if (d / "summary.json").is_file():
            groups.setdefault(c.encoder if one_config else c.label(), {})[c.seed] = read_json(
                d / "summary.json"
            )
    for enc, per_seed in groups.items():
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
    w = max([22] + [len(k) + 2 for k in summary["encoders"]])
    rows = [
        f"{'encoder':<{w}}{'VQA acc':>9}{'Acc@0.5':>9}{'invalid':>9}{'VQA maj.':>10}{'mean box':>10}  seeds"
    ]
    for name, r in summary["encoders"].items():
        b = r["baselines"]
        rows.append(
            f"{name:<{w}}{r['vqa_accuracy']:>9.3f}{r['grounding_acc50']:>9.3f}{r['invalid_box_rate']:>9.3f}"
            f"{b['vqa_majority']:>10.3f}{b['grounding_mean_box']:>10.3f}  {r['n_seeds']}"
        )
    if summary.get("note"):
        rows.append(f"({summary['note']})")
    return "\n".join(rows)


def run_notebooks(
    preset: str, suite: Path, notebooks: list[str], overrides: list[str], extra: dict | None = None
) -> list[Path]:
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
            parameters={"preset": preset, "run_root": str(suite), "overrides": overrides, **(extra or {})},
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
    ap.add_argument(
        "--sweep-only",
        action="store_true",
        help="train and evaluate the preset's grid without the notebooks (e.g. on a headless GPU box); "
        "run the notebooks afterwards: they reuse the finished cells",
    )
    ap.add_argument(
        "--no-train",
        action="store_true",
        help="notebooks 05/06 analyse the finished cells only (train_missing=False), e.g. a GPU-swept grid",
    )
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    a = ap.parse_args(argv)
    cfg = load_preset(a.preset, a.overrides)
    suite = runs_dir() / (a.run_id or cfg.name)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.time()
    if a.sweep_only:
        run_suite(cfg, suite)
    else:
        extra = {"train_missing": False} if a.no_train else None
        run_notebooks(a.preset, suite, a.notebooks, a.overrides, extra)
    summary = suite_summary(cfg, suite)
    if any((d / "summary.json").is_file() for d in run_dirs(cfg, suite).values()):
        print(f"[run] wrote {write_sweep_csv(cfg, suite)}")
    summary["wall_seconds"] = round(time.time() - t0, 1)
    atomic_write_json(suite / "summary.json", summary)
    print(format_table(summary))
    print(
        f"[run] wrote {suite / 'summary.json'} and {suite / 'notebooks'}/ in {summary['wall_seconds']:.0f}s"
    )


if __name__ == "__main__":
    sys.exit(main())
