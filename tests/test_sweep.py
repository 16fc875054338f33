"""The suite grid: cells, resumable runs, sweep.csv, and paired effects of one factor."""

import csv
import json
import multiprocessing as mp
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import vlmlab.run as suite
from vlmlab.analysis import sweep
from vlmlab.config import load_preset, run_id


def _grid_cfg(**sweep_kw):
    cfg = load_preset("smoke")
    cfg.seeds = [7, 8]
    for k, v in sweep_kw.items():
        setattr(cfg.sweep, k, v)
    return cfg


def test_cells_are_the_full_product_with_distinct_run_ids():
    cfg = _grid_cfg(inits=["classification", "detection"], connectors=["gelu-mlp", "fused-gelu-mlp"])
    cells = suite.sweep_cells(cfg)
    assert len(cells) == len(cfg.encoders) * 2 * 2 * len(cfg.sweep.policies) * 2
    assert len({run_id(c.encoder, c.config(cfg), c.seed) for c in cells}) == len(cells)
    c = next(c for c in cells if c.init == "detection")
    assert "@det" in run_id(c.encoder, c.config(cfg), c.seed) and c.config(cfg).init == "detection"


def test_empty_sweep_lists_fall_back_to_the_preset_values():
    cfg = _grid_cfg(inits=[], connectors=[], policies=[])
    cells = suite.sweep_cells(cfg)
    assert {(c.init, c.connector, c.policy) for c in cells} == {(cfg.init, cfg.connector, cfg.policy)}
    assert len(cells) == len(cfg.encoders) * len(cfg.seeds)


def _fake_summary(d, vqa, ref):
    d.mkdir(parents=True, exist_ok=True)
    (d / "results").mkdir(exist_ok=True)
    (d / "results" / "toy-vqa.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "score": s}) + "\n" for i, s in enumerate(vqa))
    )
    rows = [
        {
            "id": f"r{i}",
            "score": s,
            "status": "correct" if s else "wrong-location",
            "parsed": [0.1, 0.1, 0.5, 0.5],
            "gt_box": [0.1, 0.1, 0.5, 0.5],
        }
        for i, s in enumerate(ref)
    ]
    (d / "results" / "toy-ref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = lambda x: {"score": float(np.mean(x)), "n": len(x), "invalid_rate": 0.0}  # noqa: E731
    (d / "summary.json").write_text(
        json.dumps(
            {
                "benchmarks": {"toy-vqa": bench(vqa), "toy-ref": bench(ref)},
                "baselines": {"vqa_majority": 0.3, "grounding_mean_box": 0.01},
                "eval_seconds": 2.5,
            }
        )
    )
    (d / "done.json").write_text(json.dumps({"steps": 3, "loop_seconds": 7.25}))


def test_run_suite_skips_finished_cells_and_writes_the_table(tmp_path, monkeypatch):
    cfg = _grid_cfg(
        inits=["classification"], connectors=["gelu-mlp", "fused-gelu-mlp"], policies=["letterbox-center"]
    )
    ran = []

    def fake_run_cell(cfg_, cell, d, evaluate=True):
        ran.append(cell)
        _fake_summary(d, [1, 0, 1], [0, 1, 0])
        return d

    monkeypatch.setattr(suite, "run_cell", fake_run_cell)
    monkeypatch.setattr(suite, "prepare", lambda cfg_, **kw: None)
    dirs = suite.run_dirs(cfg, tmp_path)
    first = next(iter(dirs))
    _fake_summary(dirs[first], [1, 1, 1], [1, 1, 1])  # finished before: must be skipped
    suite.run_suite(cfg, tmp_path)
    assert first not in ran and len(ran) == len(dirs) - 1
    assert [c.seed for c in ran] == sorted(c.seed for c in ran)  # seed-major order
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(dirs) and set(table[0]) == set(suite.SWEEP_COLUMNS)
    row = next(r for r in table if r["run"] == dirs[first].name)
    assert float(row["grounding_acc50"]) == 1.0 and row["connector"] == first.connector
    assert float(row["train_loop_s"]) == 7.25 and float(row["eval_s"]) == 2.5  # where the time went
    ran.clear()
    suite.run_suite(cfg, tmp_path)  # everything finished: nothing runs again
    assert ran == []


def test_a_failed_cell_does_not_stop_the_others(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import torch

    cfg = _grid_cfg(inits=["classification"], connectors=["gelu-mlp"], policies=["letterbox-center"])
    cfg.sweep.workers = 2
    dirs = suite.run_dirs(cfg, tmp_path)
    bad = next(iter(dirs))

    def fake_job(cfg_dict, cell, d, evaluate):
        if suite.Cell(*cell) == bad:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        _fake_summary(Path(d), [1, 0], [1, 0])
        return d

    monkeypatch.setattr(suite, "_run_cell_job", fake_job)
    monkeypatch.setattr(suite, "process_pool", lambda n: ThreadPoolExecutor(n))
    monkeypatch.setattr(suite, "prepare", lambda cfg_, **kw: None)
    with pytest.raises(RuntimeError, match=f"1 of {len(dirs)} cells failed") as info:
        suite.run_suite(cfg, tmp_path)
    assert str(dirs[bad]) in str(info.value) and "OutOfMemoryError" in str(info.value)
    with open(tmp_path / "sweep.csv") as f:  # every other cell finished and is in the table
        assert {r["run"] for r in csv.DictReader(f)} == {d.name for c, d in dirs.items() if c != bad}


def _cell(**kw):
    base = {
        "encoder": "toy-vit",
        "init": "classification",
        "connector": "gelu-mlp",
        "policy": "letterbox-center",
        "seed": 7,
    }
    return suite.Cell(**{**base, **kw})


def test_pool_workers_are_spread_round_robin_over_the_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    gpus = suite.visible_gpus()
    assert gpus == ["3", "5"]
    counter, seen = mp.Value("i", 0), []
    for _ in range(5):  # what five workers' initializers do, in start order
        suite._pin_worker(counter, gpus)
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["3", "5", "3", "5", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: nothing is pinned
    suite._pin_worker(counter, suite.visible_gpus())
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_gpu_worker_cap_fits_cells_into_the_smallest_card(monkeypatch):
    import torch

    cards = [SimpleNamespace(total_memory=80 * 2**30), SimpleNamespace(total_memory=141 * 2**30)]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: cards[i])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert suite.gpu_worker_cap(7.5) == 2 * 10  # 80 GiB holds 10 cells of 7.5 GiB
    assert suite.gpu_worker_cap(100.0) == 2  # at least one cell per card
    assert suite.gpu_worker_cap(None) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert suite.gpu_worker_cap(7.5) is None  # no GPU: the workers share the CPU


def test_paired_effect_pairs_cells_differing_in_one_factor_only():
    rng = np.random.default_rng(0)
    items = {}
    for enc in ("toy-vit", "toy-vmamba"):
        for seed in (7, 8):
            base = rng.integers(0, 2, 400).astype(float)
            better = np.maximum(base, rng.integers(0, 2, 400) * (rng.random(400) < 0.3))
            for conn, scores in (("gelu-mlp", base), ("fused-gelu-mlp", better)):
                items[_cell(encoder=enc, seed=seed, connector=conn)] = {
                    "toy-ref": {f"r{i}": s for i, s in enumerate(scores)}
                }
    items[_cell(encoder="toy-vit", seed=9, policy="letterbox-corner")] = {
        "toy-ref": {"r0": 1.0}
    }  # no partner
    eff = sweep.paired_effect(items, "connector", "gelu-mlp", "fused-gelu-mlp")
    assert eff["n_pairs"] == 4 and eff["n_up"] == 4 and eff["n_down"] == 0
    assert 0.05 < eff["delta"] < 0.3 and eff["lo"] <= eff["delta"] <= eff["hi"]
    assert all(r["p"] < 0.05 for r in eff["pairs"])
    none = sweep.paired_effect(items, "connector", "gelu-mlp", "ln-gelu-mlp")
    assert none["n_pairs"] == 0 and np.isnan(sweep.effect_row(none)["delta"])


def test_paired_effect_of_identical_runs_is_zero_and_not_significant():
    scores = {f"r{i}": float(i % 2) for i in range(100)}
    items = {_cell(policy=p): {"toy-ref": dict(scores)} for p in ("letterbox-center", "letterbox-corner")}
    eff = sweep.paired_effect(items, "policy", "letterbox-corner", "letterbox-center")
    assert eff["delta"] == 0 and eff["pairs"][0]["p"] == pytest.approx(1.0)


def test_constant_box_reference_brackets_the_collapse_thresholds():
    gt = np.random.default_rng(0).uniform(0, 1, (500, 4))
    ref = sweep.constant_box_reference(gt)
    assert ref["gt_near_constant_share"] < 0.05 and ref["mean_box_near_constant_share"] == 1.0


def test_grid_agreement_compares_only_shared_cells():
    def row(enc, seed, vqa, acc, init="classification"):
        return {
            "encoder": enc,
            "init": init,
            "connector": "gelu-mlp",
            "policy": "letterbox-center",
            "seed": seed,
            "vqa_accuracy": vqa,
            "grounding_acc50": acc,
        }

    a = [row("e1", 7, 0.1, 0.0), row("e2", 7, 0.2, 0.3), row("e3", 7, 0.3, 0.1), row("e3", 8, 0.9, 0.9)]
    b = [
        row("e1", "7", 0.15, 0.2),
        row("e2", "7", 0.25, 0.1),
        row("e3", "7", 0.35, 0.0),
        row("e4", "7", 0.5, 0.5),
    ]  # e4 and e3/seed 8 are in one grid only; seeds read as text or int
    per_encoder, summary = sweep.grid_agreement(a, b, ["vqa_accuracy", "grounding_acc50"])
    assert summary["shared_cells"] == 3 and [r["encoder"] for r in per_encoder] == ["e1", "e2", "e3"]
    assert per_encoder[2]["vqa_accuracy_a"] == pytest.approx(0.3)  # seed 8's 0.9 is not shared
    assert summary["vqa_accuracy"]["spearman_encoder_means"] == pytest.approx(1.0)
    assert summary["vqa_accuracy"]["mean_b"] == pytest.approx(0.25)
    assert summary["grounding_acc50"]["spearman_cells"] == pytest.approx(-0.5)
    _, only8 = sweep.grid_agreement(a, a, ["vqa_accuracy"], seeds=[8])
    assert only8["shared_cells"] == 1
    with pytest.raises(ValueError, match="share no"):
        sweep.grid_agreement(a, b, ["vqa_accuracy"], seeds=[9])


def test_bench_cells_reports_aggregate_rates(tmp_path, monkeypatch):
    """`python -m vlmlab.bench cells` on the CPU: two processes per workload, one row each."""
    from vlmlab import bench

    monkeypatch.setenv("VLMLAB_RUNS", str(tmp_path))
    argv = ["cells", "--preset", "smoke", "--procs", "2", "--seconds", "0.5", "--device", "cpu"]
    bench.main([*argv, "--modes", "train", "train-hf-norm", "eval-4", "--text-tokens", "20", "40"])
    (path,) = (tmp_path / "bench").glob("cells-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["workload"] for r in rows] == ["train", "train-hf-norm", "eval-4"]
    assert all(r["procs"] == 2 and r["per_proc"] > 0 for r in rows)
    assert rows[0]["samples_per_s"] == pytest.approx(2 * rows[0]["per_proc"], rel=0.01)
    assert rows[2]["items_per_s"] > 0
    with pytest.raises(ValueError, match="unknown workload"):
        bench.main([*argv, "--modes", "infer"])


@pytest.mark.parametrize("sizes, grid", [("toy-gpu-sizes", "toy-gpu"), ("toy-cpu-sizes", "toy-cpu-sweep")])
def test_size_presets_hold_every_family_at_two_sizes_and_reuse_their_grids_runs(sizes, grid):
    from vlmlab.encoders import create_encoder

    s, g = load_preset(sizes), load_preset(grid)
    assert s.world == g.world
    base = sorted({n.removesuffix("-b") for n in s.encoders})
    assert sorted(s.encoders) == sorted([*base, *(f"{n}-b" for n in base)])  # each toy encoder and its -b
    families = {create_encoder(n).spec.family for n in s.encoders}
    assert families == {"ssm", "hybrid", "vit", "cnn"}
    # matched-init cells of the grid's encoders are the grid's own runs (same config, same run id),
    # so the size study adds only the -b encoders' runs
    ids = {d.name for d in suite.run_dirs(s).values()}
    shared = ids & {d.name for d in suite.run_dirs(g).values()}
    assert len(shared) == len(set(s.encoders) & set(g.encoders)) * len(s.seeds) > 0
