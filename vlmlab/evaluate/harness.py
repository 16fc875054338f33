"""Evaluate a trained run: batched greedy generation over benchmarks, one JSONL line per item.

Results stream to runs/<id>/results/<benchmark>.jsonl (appended per batch, flushed); an interrupted
evaluation resumes where it stopped, never scores an item twice, and re-generates a corrupted last
line. Ground-truth boxes are projected into the frame the model saw (the run's ImageTransform),
and that transform is stored with every grounding item. Summaries are derived from the JSONL.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vlmlab.config import config_from_dict, data_dir
from vlmlab.data.datasets import prompt_ids
from vlmlab.data.schema import load_eval, load_train
from vlmlab.evaluate import metrics, stats
from vlmlab.evaluate.benchmarks import build_prompt, get_benchmark
from vlmlab.evaluate.generate import answer_probabilities, cut_at_stop, greedy_generate
from vlmlab.features import extract_features
from vlmlab.io import atomic_write_json
from vlmlab.vlm.prompts import get_template


def read_results(path: Path) -> list[dict]:
    """Complete result lines; a corrupted (cut) last line is dropped so it gets re-generated."""
    if not path.is_file():
        return []
    rows, lines = [], path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(
                    f"{path}: line {i + 1} is corrupt (not the last line; refusing to guess)"
                ) from None
    if len(rows) < len(lines):  # rewrite without the broken tail
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def gt_box_in_frame(item, tf) -> list[float]:
    """The item's ground-truth box (original pixels) in the normalised frame the model saw."""
    return tf.box_to_normalized(tf.box_to_input(item.box))


# per-item scorers of generated text, by the benchmark's metric (official-parity functions)
TEXT_SCORERS = {
    "vqa-accuracy": lambda text, item, variant: metrics.vqa_accuracy(text, item.answers, variant=variant),
    "textvqa-accuracy": lambda text, item, variant: metrics.textvqa_accuracy(text, item.answers),
    "vizwiz-accuracy": lambda text, item, variant: metrics.vizwiz_accuracy(text, item.answers),
    "gqa-accuracy": lambda text, item, variant: float(metrics.gqa_correct(text, item.answers[0])),
}


def score_item(bench, item, text: str, tf, vqa_variant: str) -> dict:
    if bench.group == "loc":
        gt = gt_box_in_frame(item, tf)
        st = metrics.grounding_status(text, gt, thr=bench.iou_threshold)
        return {
            "score": float(st["status"] == "correct"),
            "status": st["status"],
            "parsed": st["box"],
            "iou": st["iou"],
            "gt_box": gt,
            "transform": tf.to_dict(),
        }
    if bench.metric not in TEXT_SCORERS:
        raise KeyError(
            f"{bench.name}: no text scorer for metric {bench.metric!r}; known: {', '.join(TEXT_SCORERS)}"
        )
    return {"score": TEXT_SCORERS[bench.metric](text, item, vqa_variant), "parsed": text}


def score_probabilities(bench, item, probs: list[float]) -> dict:
    """Probability-scored benchmarks (POPE, VSR, TallyQA, AI2D): the most likely answer string wins."""
    label = item.answers[0] if item.answers else None
    pred = bench.answer_strings[metrics.argmax_first(probs)]
    return {
        "score": float(label is not None and pred.lower() == str(label).lower()),
        "parsed": pred,
        "probs": probs,
        "label": label,
    }


def load_run_model(run_dir: Path, device: str):
    """Rebuilds (cfg, model, tokenizer, encoder, weights) of a finished run from its files."""
    import yaml

    from vlmlab.train import (
        FrozenTower,
        build_model,
        latest_checkpoint,
        load_trainable,
        tower_dtype,
        world_root,
    )

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    run = json.loads((run_dir / "run.json").read_text())
    root = world_root(cfg)
    model, tok, enc, weights = build_model(cfg, run["encoder"]["name"], run_dir, root, with_encoder=False)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to evaluate")
    load_trainable(model, ckpt)
    tower = FrozenTower(enc, tower_dtype(enc.spec.name, cfg.train.bf16))  # the dtype training saw
    return cfg, model.to(device).eval(), tok, tower, weights, root


def evaluate_run(
    run_dir: str | Path,
    benchmarks: list[str] | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
) -> dict:
    """Generates and scores every benchmark item of a run; writes results/*.jsonl and summary.json."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, tok, enc, weights, root = load_run_model(run_dir, device)
    benchmarks = benchmarks or cfg.eval.benchmarks
    limit = cfg.eval.limit if limit is None else limit
    batch_size = batch_size or cfg.eval.batch_size
    template = get_template(cfg.llm.template)
    summary = {
        "run": run_dir.name,
        "encoder": enc.spec.name,
        "vqa_variant": cfg.eval.vqa_variant,
        "benchmarks": {},
    }
    for name in benchmarks:
        bench = get_benchmark(name)
        items = load_eval(root / "eval" / f"{name}.jsonl")
        items = items[:limit] if limit else items
        out_path = run_dir / "results" / f"{name}.jsonl"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        done = {r["id"] for r in read_results(out_path)}
        todo = [it for it in items if it.id not in done]
        if todo:
            cache = data_dir() / "features" if cfg.train.feature_cache else None
            store = extract_features(
                enc, root, [it.image for it in todo], cfg.policy, cfg.img_size, cache, weights, device
            )
            with open(out_path, "a") as f:
                for i in tqdm(range(0, len(todo), batch_size), desc=f"eval {name}", leave=False):
                    chunk = todo[i : i + batch_size]
                    prompts = [build_prompt(bench, {**it.metadata, **it.model_dump()}) for it in chunk]
                    ids = [prompt_ids(p, template, tok) for p in prompts]
                    vision = store.get([it.image for it in chunk]).to(device)
                    if bench.scoring == "probabilities":
                        first = [tok(a, add_special_tokens=False).input_ids[0] for a in bench.answer_strings]
                        probs = answer_probabilities(model, ids, vision, first)
                        rows = [
                            {
                                "id": it.id,
                                "prompt": p,
                                "generation": None,
                                **score_probabilities(bench, it, pr),
                            }
                            for it, p, pr in zip(chunk, prompts, probs, strict=True)
                        ]
                    else:
                        gen = greedy_generate(model, ids, vision, tok.eos_token_id, cfg.eval.max_new_tokens)
                        rows = []
                        for it, p, g in zip(chunk, prompts, gen, strict=True):
                            text = cut_at_stop(tok.decode(g, skip_special_tokens=True))
                            tf = store.transforms[it.image]
                            rows.append(
                                {
                                    "id": it.id,
                                    "prompt": p,
                                    "generation": text,
                                    **score_item(bench, it, text, tf, cfg.eval.vqa_variant),
                                }
                            )
                    f.write("".join(json.dumps(r) + "\n" for r in rows))
                    f.flush()
        rows = read_results(out_path)
        summary["benchmarks"][name] = summarize(bench, rows, expected=len(items))
    summary["baselines"] = baselines(cfg, root, enc, benchmarks, limit)
    summary["eval_seconds"] = round(time.perf_counter() - t0, 1)  # this call's wall time (a resume's own)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def summarize(bench, rows: list[dict], expected: int) -> dict:
    scores = np.array([r["score"] for r in rows], dtype=float)
    point, lo, hi = stats.bootstrap_ci(scores) if len(scores) else (float("nan"),) * 3
    out = {
        "metric": bench.metric,
        "group": bench.group,
        "score": float(point),
        "ci95": [float(lo), float(hi)],
        "n": len(rows),
        "expected_n": expected,
        "complete": len(rows) == expected,
    }
    if bench.group == "loc":
        counts = Counter(r["status"] for r in rows)
        out["status_rates"] = {k: v / max(len(rows), 1) for k, v in sorted(counts.items())}
        out["invalid_rate"] = sum(v for k, v in counts.items() if k.startswith("invalid")) / max(len(rows), 1)
        boxes = np.array([r["parsed"] for r in rows if r["parsed"] is not None], dtype=float).reshape(-1, 4)
        out["pred_box_std"] = float(boxes.std(0).mean()) if len(boxes) > 1 else 0.0
    return out


def baselines(cfg, root: Path, enc, benchmarks: list[str], limit: int | None) -> dict:
    """Majority answer per question type (VQA) and the mean training box (grounding), on the same items."""
    from vlmlab.data.datasets import plan_for, turn_metadata
    from vlmlab.evaluate.metrics import box_iou

    train = load_train(root / "train" / "llava.json")
    answers, boxes = defaultdict(Counter), []
    for r in train:
        tf = None
        for k in range(len(r.conversations) // 2):
            meta = turn_metadata(r, k)
            if meta.get("task") == "vqa":
                answers[meta.get("qtype")][r.conversations[2 * k + 1].value.strip().lower()] += 1
            elif meta.get("task") == "ref":
                tf = tf or plan_for(tuple(r.metadata["image_size"]), enc.spec, cfg.policy, cfg.img_size)
                boxes.append(tf.box_to_normalized(tf.box_to_input(meta["box"])))
    majority = {q: c.most_common(1)[0][0] for q, c in answers.items()}
    mean_box = np.mean(boxes, axis=0).tolist() if boxes else [0.25, 0.25, 0.75, 0.75]
    out = {"majority_answers": majority, "mean_box": mean_box}
    for name in benchmarks:
        bench = get_benchmark(name)
        items = load_eval(root / "eval" / f"{name}.jsonl")
        items = items[:limit] if limit else items
        if bench.group == "loc":
            hits = []
            for it in items:
                tf = plan_for(tuple(it.image_size), enc.spec, cfg.policy, cfg.img_size)
                hits.append(float(box_iou(mean_box, gt_box_in_frame(it, tf)) >= bench.iou_threshold))
            out["grounding_mean_box"] = float(np.mean(hits)) if hits else float("nan")
        else:
            fallback = Counter(a for c in answers.values() for a in c.elements()).most_common(1)[0][0]
            sc = [
                metrics.vqa_accuracy(majority.get((it.metadata or {}).get("qtype"), fallback), it.answers)
                for it in items
            ]
            out["vqa_majority"] = float(np.mean(sc)) if sc else float("nan")
    return out
