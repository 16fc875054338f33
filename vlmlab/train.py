"""Connector (+ LLM) training with the frozen encoder: the whole loop, top to bottom.

`python -m vlmlab.train --preset NAME --run-dir DIR [--encoder NAME] [--seed N] [--max-steps N]
[--resume] [key=value ...]` — the same `train()` the notebooks call.

Checkpoints: runs/<id>/checkpoints/step-XXXXXXX/{model,optim}.safetensors + state.json, written
into a temp folder and renamed; `checkpoints/latest` moves only after that. Data order is a pure
function of (seed, epoch), and RNG states are saved, so a resumed run ends bit-identical on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from vlmlab.config import Config, data_dir, load_preset, run_id, runs_dir, save_config
from vlmlab.data.datasets import tokenize_conversation
from vlmlab.data.schema import load_train
from vlmlab.encoders import load_encoder
from vlmlab.encoders.checkpoints import save_safetensors
from vlmlab.features import extract_features
from vlmlab.io import atomic_write_json, atomic_write_text
from vlmlab.vlm.llm import build_toy_tokenizer, load_llm
from vlmlab.vlm.model import VLM
from vlmlab.vlm.prompts import get_template


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped the run."""


# ---------------------------------------------------------------------------------------------
# small helpers


def world_root(cfg: Config) -> Path:
    """The dataset root: a toy world by preset name, or a path to a converted dataset."""
    from vlmlab.data.toyworld import WORLD_PRESETS

    return data_dir() / "toyworld" / cfg.world if cfg.world in WORLD_PRESETS else Path(cfg.world)


def toy_encoder_weights(cfg: Config, encoder: str) -> Path:
    """Where data_prep/pretrain_encoders.py writes the matched-init checkpoint of a toy encoder."""
    return data_dir() / "encoders" / cfg.world / f"{encoder}-{cfg.img_size}px.safetensors"


def encoder_weights(cfg: Config, encoder: str) -> str | None:
    p = toy_encoder_weights(cfg, encoder)
    return str(p) if p.is_file() else None


def get_lr(step: int, total: int, cfg) -> float:
    """Linear warmup for warmup_ratio of the steps, then cosine to zero (the release's schedule)."""
    warmup = max(1, math.ceil(cfg.warmup_ratio * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def tied_free(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops tensors that share storage with an earlier one (tied embeddings) so safetensors can save."""
    seen, out = set(), {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def load_tokenizer_for(cfg: Config, root: Path, run_dir: Path):
    """The tiny LLM's tokenizer is trained on the world's text once and saved with the run."""
    from transformers import PreTrainedTokenizerFast

    tok_dir = run_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(tok_dir)
    template = get_template(cfg.llm.template)
    texts = [template.system, "USER:", "ASSISTANT:"]
    for rec in load_train(root / "train" / "llava.json"):
        texts += [t.value for t in rec.conversations]
    from vlmlab.evaluate.benchmarks import get_benchmark, build_prompt
    from vlmlab.data.schema import load_eval

    for bench in cfg.eval.benchmarks:
        f = root / "eval" / f"{bench}.jsonl"
        if f.is_file():
            b = get_benchmark(bench)
            texts += [build_prompt(b, it.model_dump()) for it in load_eval(f)]
    tok = build_toy_tokenizer(texts)
    tok.save_pretrained(tok_dir)
    return tok


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(run_dir: Path, step: int, model: VLM, opt: torch.optim.Optimizer, extra: dict) -> Path:
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(tied_free(model.trainable_state_dict()), tmp / "model.safetensors")
    osd = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, st in osd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    tensors["rng.torch"] = torch.get_rng_state()
    save_safetensors(tensors, tmp / "optim.safetensors")
    atomic_write_json(tmp / "state.json", {"step": step, "param_groups": osd["param_groups"], **extra})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    f = run_dir / "checkpoints" / "latest"
    if not f.is_file():
        return None
    p = run_dir / "checkpoints" / f.read_text().strip()
    return p if (p / "state.json").is_file() else None


def load_trainable(model: VLM, ckpt: Path) -> None:
    sd = load_file(str(ckpt / "model.safetensors"))
    conn = {k[len("connector.") :]: v for k, v in sd.items() if k.startswith("connector.")}
    llm = {k[len("llm.") :]: v for k, v in sd.items() if k.startswith("llm.")}
    model.connector.load_state_dict(conn, strict=True)
    missing, unexpected = model.llm.load_state_dict(llm, strict=False)
    tied = {"lm_head.weight"} if getattr(model.llm.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{ckpt}: checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")


def load_checkpoint_state(ckpt: Path, model: VLM, opt: torch.optim.Optimizer) -> dict:
    load_trainable(model, ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    tensors = load_file(str(ckpt / "optim.safetensors"))
    osd = {"param_groups": state["param_groups"], "state": {}}
    for k, v in tensors.items():
        if k.startswith("rng."):
            continue
        i, name = k.split(".", 1)
        osd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(osd)
    torch.set_rng_state(tensors["rng.torch"])
    return state


# ---------------------------------------------------------------------------------------------
# the loop


def build_model(cfg: Config, encoder_name: str, run_dir: Path, root: Path, with_encoder: bool = True):
    """Encoder (frozen), tokenizer, LLM and connector of one run; returns (model, tokenizer, encoder, weights)."""
    weights = encoder_weights(cfg, encoder_name)
    encoder = load_encoder(encoder_name, weights=weights, img_size=cfg.img_size)
    tokenizer = load_tokenizer_for(cfg, root, run_dir) if cfg.llm.kind == "tiny" else None
    llm, tokenizer = load_llm(cfg.llm, tokenizer)
    model = VLM(llm, cfg.connector, encoder.spec.dim, encoder if with_encoder else None)
    return model, tokenizer, encoder, weights


def train(
    cfg: Config,
    encoder_name: str | None = None,
    seed: int | None = None,
    run_dir: str | Path | None = None,
    max_steps: int | None = None,
    resume: bool = True,
    device: str | None = None,
    stop_after: int | None = None,
) -> Path:
    """Trains one VLM (connector + LLM, frozen encoder); returns its run directory.

    `stop_after` ends the process's work after that many steps as if killed (for resume tests).
    """
    # 1. what to run, where
    encoder_name = encoder_name or cfg.encoders[0]
    seed = cfg.seeds[0] if seed is None else seed
    run_dir = Path(run_dir) if run_dir else runs_dir() / run_id(encoder_name, cfg, seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (run_dir / "done.json").is_file() and resume:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    root = world_root(cfg)
    torch.manual_seed(seed)

    # 2. encoder, LLM, connector
    model, tokenizer, encoder, weights = build_model(cfg, encoder_name, run_dir, root, with_encoder=False)
    atomic_write_json(
        run_dir / "run.json",
        {"encoder": encoder.spec.to_dict(), "encoder_weights": weights, "seed": seed, "git_commit": git_commit(),
         "world": str(root)},
    )
    template = get_template(cfg.llm.template)

    # 3. data: frozen features once, then tokenized conversations in the frame the encoder sees
    records = load_train(root / "train" / "llava.json")
    cache = data_dir() / "features" if cfg.train.feature_cache else None
    store = extract_features(encoder, root, [r.image for r in records], cfg.policy, cfg.img_size, cache, weights, device)
    examples, truncated = [], 0
    for r in records:
        ids, labels, cut = tokenize_conversation(r, template, tokenizer, store.transforms[r.image], cfg.llm.max_length)
        truncated += cut
        examples.append((r.image, ids, labels))
    if truncated:
        print(f"[train] {truncated} conversations longer than {cfg.llm.max_length} tokens were truncated")

    # 4. optimizer and schedule (derived values right after the config)
    tc = cfg.train
    trainable = list(model.connector.parameters()) + ([] if tc.stage == "align" else list(model.llm.parameters()))
    for p in model.llm.parameters():
        p.requires_grad_(tc.stage != "align")
    model.to(device)
    n_train = sum(p.numel() for p in trainable)
    print(f"[train] {run_dir.name}: training {n_train:,} parameters (connector{' + LLM' if tc.stage != 'align' else ''});"
          f" encoder {encoder.spec.name} frozen")
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, betas=(0.9, 0.999),
    )
    per_step = tc.batch_size * tc.grad_accum
    steps_per_epoch = math.ceil(len(examples) / per_step)
    total = math.ceil(tc.epochs * steps_per_epoch)
    if max_steps or tc.max_steps:
        total = min(total, max_steps or tc.max_steps)

    # 5. resume
    start, skipped = 0, 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint_state(ckpt, model, opt)
        start, skipped = state["step"], state.get("skipped_steps", 0)
    _truncate_metrics(run_dir / "metrics.jsonl", start)

    # 6. train
    amp = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=tc.bf16)
    model.train()
    bar = tqdm(range(start, total), desc=f"train {encoder_name} s{seed}", initial=start, total=total, leave=False)
    t0, tokens = time.time(), 0
    for step in bar:
        epoch, k = divmod(step, steps_per_epoch)
        order = epoch_order(seed, epoch, len(examples))
        lr = get_lr(step, total, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            lo = (k * tc.grad_accum + micro) * tc.batch_size
            idx = order[lo : lo + tc.batch_size].tolist()
            if not idx:
                continue
            batch = [examples[i] for i in idx]
            vision = store.get([b[0] for b in batch]).to(device)
            with amp:
                out = model([b[1] for b in batch], vision, [b[2] for b in batch])
            (out.loss / tc.grad_accum).backward()
            loss_sum += out.loss.item() / tc.grad_accum
            tokens += sum(len(b[1]) + vision.shape[1] for b in batch)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip).item()
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            opt.zero_grad(set_to_none=True)
            if tc.nan_policy == "skip":
                skipped += 1
                continue
            last = latest_checkpoint(run_dir)
            raise NonFiniteError(
                f"{run_dir.name}: non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient'} at step {step} "
                f"(loss={loss_sum}, grad_norm={grad_norm}); last good checkpoint: {last or 'none'}"
            )
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % tc.log_every == 0 or done == total:
            dt = time.time() - t0
            rec = {"step": done, "loss": round(loss_sum, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                   "tokens_per_s": round(tokens / max(dt, 1e-9), 1), "skipped_steps": skipped, **_memory(device)}
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{loss_sum:.3f}")
        if done % tc.ckpt_every == 0 or done == total:
            save_checkpoint(run_dir, done, model, opt, {"skipped_steps": skipped, "total_steps": total})
        if stop_after is not None and done - start >= stop_after and done < total:
            return run_dir  # simulated kill (tests)

    # 7. done
    final = _read_metrics(run_dir / "metrics.jsonl")
    atomic_write_json(run_dir / "done.json", {"steps": total, "skipped_steps": skipped,
                                              "final_loss": final[-1]["loss"] if final else None})
    return run_dir


def _memory(device: str) -> dict:
    if device.startswith("cuda"):
        return {"max_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    try:
        import resource

        return {"max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    except ImportError:
        return {}


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drops metric lines written after the checkpoint we resume from."""
    if path.is_file():
        keep = [m for m in _read_metrics(path) if m["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in keep))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--resume", action="store_true", help="continue from checkpoints/latest if present")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-3")
    a = ap.parse_args(argv)
    cfg = load_preset(a.preset, a.overrides)
    if not a.resume and a.run_dir and Path(a.run_dir, "checkpoints").exists():
        raise SystemExit(f"{a.run_dir} already has checkpoints; pass --resume to continue it")
    out = train(cfg, a.encoder, a.seed, a.run_dir, a.max_steps, resume=a.resume)
    print(out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
