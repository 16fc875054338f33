"""Connector (+ LLM) training with the frozen encoder: the whole loop, top to bottom.

`python -m vlmlab.train --preset NAME --run-dir DIR [--encoder NAME] [--seed N] [--max-steps N]
[--resume] [key=value ...]` — the same `train()` the notebooks call. The same command runs on N
processes under `torchrun --nproc_per_node N -m vlmlab.train ...` (DDP or FSDP, see vlmlab/dist.py).

Stages (the release's prismatic-vlms trainer, `scripts/train.py` and `preprocessing/datasets`):
- no-align: connector + LLM in one stage, fresh connector (the paper's recipe);
- align: connector only; the human prompt is dropped and the model learns BOS + caption + EOS
  (prismatic's AlignDataset); data from `train.align_world` (LLaVA-558k) when set;
- finetune: connector + LLM, the connector initialized from the align run in `train.init_from`.

Checkpoints: runs/<id>/checkpoints/step-XXXXXXX/{model,optim}.safetensors + state.json, written
into a temp folder and renamed by rank 0; `checkpoints/latest` moves only after that. The optimizer
state is keyed by parameter name, so a checkpoint resumes under 1 process, DDP or FSDP alike. Data
order is a pure function of (seed, epoch), and RNG states are saved, so a resumed run ends
bit-identical on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from vlmlab import dist
from vlmlab.config import Config, data_dir, load_preset, run_id, runs_dir, save_config
from vlmlab.data.datasets import plan_for, render_answer, to_tensor, tokenize_conversation
from vlmlab.data.schema import DataError, load_image, load_train
from vlmlab.encoders import load_encoder
from vlmlab.encoders.base import freeze
from vlmlab.encoders.checkpoints import save_safetensors
from vlmlab.features import extract_features
from vlmlab.io import atomic_write_json, atomic_write_text
from vlmlab.vlm.llm import build_toy_tokenizer, load_llm
from vlmlab.vlm.model import IGNORE, VLM
from vlmlab.vlm.prompts import get_template

STAGES = ("no-align", "align", "finetune")

# FACTS.md "Setting" (the release): these towers stay in fp32 under bf16 training; others run in bf16.
FP32_TOWERS = ("vmamba", "maxvit", "mambavision", "vit-adapter")

# Dense bf16 tensor-core peak per GPU in FLOP/s (NVIDIA datasheets, without sparsity), for the MFU
# estimate. Matched as substrings of torch.cuda.get_device_name(), first match wins.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped the run."""


# ---------------------------------------------------------------------------------------------
# small helpers


def world_root(cfg: Config) -> Path:
    """The dataset root: a toy world by preset name, or a path to a converted dataset."""
    from vlmlab.data.toyworld import WORLD_PRESETS

    return data_dir() / "toyworld" / cfg.world if cfg.world in WORLD_PRESETS else Path(cfg.world)


def train_root(cfg: Config) -> Path:
    """Where the training conversations come from: `align_world` for the align stage if set, else `world`."""
    if cfg.train.stage == "align" and cfg.train.align_world:
        return world_root(replace(cfg, world=cfg.train.align_world))
    return world_root(cfg)


def toy_encoder_weights(cfg: Config, encoder: str, init: str | None = None) -> Path:
    """Where a toy encoder's checkpoint lives: data_prep/pretrain_encoders.py writes the matched-init
    (classification) one, data_prep/adapt_encoders.py the detection / segmentation adapted ones."""
    from vlmlab.config import INITS

    init = init or cfg.init
    if init not in INITS:
        raise ValueError(f"unknown encoder init {init!r}; known: {', '.join(INITS)}")
    suffix = "" if init == "classification" else f"-{init}"
    return data_dir() / "encoders" / cfg.world / f"{encoder}-{cfg.img_size}px{suffix}.safetensors"


def encoder_weights(cfg: Config, encoder: str) -> str | None:
    """The toy checkpoint of `encoder` for the config's init, if it exists (None: real/random weights).

    An adapted init (detection/segmentation) that was never made is an error, never a silent
    fallback to another init."""
    p = toy_encoder_weights(cfg, encoder)
    if cfg.init != "classification" and encoder.startswith("toy-") and not p.is_file():
        raise FileNotFoundError(f"{p}: no {cfg.init}-adapted checkpoint; run data_prep/adapt_encoders.py")
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
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
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
    from vlmlab.data.schema import load_eval
    from vlmlab.evaluate.benchmarks import build_prompt, get_benchmark

    for bench in cfg.eval.benchmarks:
        f = root / "eval" / f"{bench}.jsonl"
        if f.is_file():
            b = get_benchmark(bench)
            texts += [build_prompt(b, it.model_dump()) for it in load_eval(f)]
    tok = build_toy_tokenizer(texts)
    tok.save_pretrained(tok_dir)
    return tok


def caption_example(record, tokenizer, tf, max_length: int) -> tuple[list[int], list[int], bool]:
    """Align-stage tokens: BOS + last answer + EOS, learned but BOS (prismatic AlignDataset, no prompt)."""
    pair = (len(record.conversations) - 1) // 2
    text = record.conversations[-1].value.strip()
    caption = render_answer(record, pair, text, tf) if tf is not None else text
    body = tokenizer(caption, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids, labels = [tokenizer.bos_token_id] + body, [IGNORE] + body
    return ids[:max_length], labels[:max_length], len(ids) > max_length


def tower_dtype(encoder_name: str, bf16: bool) -> torch.dtype:
    """The frozen tower's dtype: fp32 for the families the release keeps in fp32 (VMamba, MaxViT,
    MambaVision, ViT-Adapter), else the training dtype."""
    if bf16 and not any(f in encoder_name for f in FP32_TOWERS):
        return torch.bfloat16
    return torch.float32


class FrozenTower(nn.Module):
    """The frozen encoder in its run dtype; takes float pixels, returns float32 tokens.

    Its `spec.tap` carries the dtype when not fp32 (e.g. "block-2@bfloat16"): the feature-cache key
    hashes the tap, so bf16 tokens never mix with fp32 ones.
    """

    def __init__(self, encoder: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.encoder = freeze(encoder).to(dtype)
        self.run_dtype = dtype
        tap = (
            encoder.spec.tap
            if dtype == torch.float32
            else f"{encoder.spec.tap}@{str(dtype).removeprefix('torch.')}"
        )
        self.spec = replace(encoder.spec, tap=tap)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels.to(self.run_dtype)).float()


def find_bad_images(root: Path, records) -> dict[str, str]:
    """Images that cannot be opened and decoded -> the error (reads every image once)."""
    bad, seen = {}, set()
    for r in records:
        if r.image in seen:
            continue
        seen.add(r.image)
        try:
            load_image(root, r)
        except DataError as e:
            bad[r.image] = str(e)
    return bad


def header_transforms(root: Path, records, spec, policy, img_size: int, skip_bad: bool):
    """Each image's ImageTransform from its header only (the encoder-per-batch path decodes later).

    Returns (transforms, bad) where bad maps unreadable images to their error (only with skip_bad).
    """
    tfs, bad = {}, {}
    for r in records:
        if r.image in tfs or r.image in bad:
            continue
        try:
            with Image.open(root / r.image) as im:
                size = im.size
        except (OSError, SyntaxError, ValueError) as e:
            err = DataError(
                f"{root / r.image}: cannot read image of record {r.id!r}: {type(e).__name__}: {e}",
                path=root / r.image,
                record_id=r.id,
                field="image",
            )
            if not skip_bad:
                raise err from e
            bad[r.image] = str(err)
            continue
        tfs[r.image] = plan_for(size, spec, policy, img_size)
    return tfs, bad


def enable_grad_checkpointing(llm: nn.Module) -> None:
    """HF activation checkpointing of every decoder layer, non-reentrant (works under DDP and FSDP)."""
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    llm.config.use_cache = False  # no KV cache while training (HF warns otherwise)


def linear_params(module: nn.Module) -> int:
    """Weights of the Linear layers (lm_head included): the matmuls that dominate a transformer's FLOPs."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def peak_flops(device: str) -> float | None:
    """Dense bf16 peak of this GPU from PEAK_BF16_FLOPS; None on the CPU or an unlisted GPU."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(
    run_dir: Path, step: int, model_sd: dict[str, torch.Tensor], optim_sd: dict, extra: dict
) -> Path:
    """Writes one checkpoint atomically (temp folder, rename, then `latest`). Rank 0 only.

    Args:
        model_sd: trainable tensors, keys "connector.*" / "llm.*".
        optim_sd: {"state": {param name: {key: tensor}}, "param_groups": [... "params": [names]]}.
    """
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(tied_free(model_sd), tmp / "model.safetensors")
    tensors = {
        f"state/{name}/{k}": v
        for name, st in optim_sd["state"].items()
        for k, v in st.items()
        if torch.is_tensor(v)
    }
    tensors["rng/torch"] = torch.get_rng_state()
    save_safetensors(tensors, tmp / "optim.safetensors")
    atomic_write_json(tmp / "state.json", {"step": step, "param_groups": optim_sd["param_groups"], **extra})
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
    """Loads a checkpoint's connector, and its LLM where the checkpoint holds one (align runs of a
    pretrained LLM hold only the connector: their LLM is the base model's)."""
    sd = load_file(str(ckpt / "model.safetensors"))
    state = json.loads((ckpt / "state.json").read_text())
    conn = {k[len("connector.") :]: v for k, v in sd.items() if k.startswith("connector.")}
    llm = {k[len("llm.") :]: v for k, v in sd.items() if k.startswith("llm.")}
    model.connector.load_state_dict(conn, strict=True)
    if not llm and "llm" not in state.get("saved", ["connector", "llm"]):
        return
    missing, unexpected = model.llm.load_state_dict(llm, strict=False)
    tied = {"lm_head.weight"} if getattr(model.llm.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"{ckpt}: checkpoint does not fit the model: missing {missing}, unexpected {unexpected}"
        )


def init_from_align_run(model: VLM, run: Path, encoder_name: str) -> Path:
    """Starts a finetune run from the connector (and a tiny LLM) of an align run's last checkpoint."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"train.init_from={run}: no checkpoint there; train the align stage first")
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    if info.get("stage", "align") != "align":
        raise ValueError(
            f"train.init_from={run} is a {info['stage']!r} run; finetune starts from an align run"
        )
    if info.get("encoder", {}).get("name", encoder_name) != encoder_name:
        raise ValueError(f"train.init_from={run} aligned {info['encoder']['name']!r}, not {encoder_name!r}")
    load_trainable(model, ckpt)
    return ckpt


def optimizer_state(opt: torch.optim.Optimizer, names: list[str]) -> dict:
    """The optimizer's state with parameters named instead of numbered (as FSDP's full state dict is)."""
    osd = opt.state_dict()
    return {
        "state": {names[i]: st for i, st in osd["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]],
    }


def load_optimizer_state(
    ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer, names: list[str], mode: str
) -> dict:
    """Restores optimizer state and RNG from a checkpoint; returns its state.json."""
    state = json.loads((ckpt / "state.json").read_text())
    tensors = load_file(str(ckpt / "optim.safetensors"))
    per_param: dict[str, dict] = {}
    for key, v in tensors.items():
        if key.startswith("state/"):
            name, k = key[len("state/") :].rsplit("/", 1)
            per_param.setdefault(name, {})[k] = v
    groups = state["param_groups"]
    if mode == "fsdp":
        dist.load_full_optimizer_state(model, opt, {"state": per_param, "param_groups": groups})
    else:
        index = {n: i for i, n in enumerate(names)}
        saved = [n for g in groups for n in g["params"]]
        if sorted(saved) != sorted(names):
            raise RuntimeError(
                f"{ckpt}: optimizer state is for other parameters ({len(saved)} vs {len(names)} tensors)"
            )
        opt.load_state_dict(
            {
                "state": {index[n]: st for n, st in per_param.items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
            }
        )
    torch.set_rng_state(tensors["rng/torch"])
    return state


def gather_state(
    model: nn.Module, core: VLM, opt, names: list[str], mode: str, save_llm: bool
) -> tuple[dict, dict]:
    """What a checkpoint holds, unsharded; collective under FSDP (complete on rank 0 only)."""
    if mode == "fsdp":
        msd, osd = dist.full_state_dicts(model, opt)
    else:
        msd, osd = core.state_dict(), optimizer_state(opt, names)
    keep = ("connector.", "llm.") if save_llm else ("connector.",)
    return {k: v for k, v in msd.items() if k.startswith(keep)}, osd


# ---------------------------------------------------------------------------------------------
# the loop


def build_model(cfg: Config, encoder_name: str, run_dir: Path, root: Path, with_encoder: bool = True):
    """Encoder (frozen), tokenizer, LLM and connector of a run: (model, tokenizer, encoder, weights)."""
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

    Under torchrun every rank calls this; rank 0 alone writes files. `stop_after` ends the
    process's work after that many steps as if killed (for resume tests).
    """
    # 1. what to run, where
    tc = cfg.train
    if tc.stage not in STAGES:
        raise ValueError(f"unknown train.stage {tc.stage!r}; known: {', '.join(STAGES)}")
    if (tc.stage == "finetune") != bool(tc.init_from):
        raise ValueError(
            "train.init_from (an align run's directory) is required by, and only by, stage finetune"
        )
    env = dist.setup(device)
    log = print if env.is_main else (lambda *a, **k: None)
    encoder_name = encoder_name or cfg.encoders[0]
    seed = cfg.seeds[0] if seed is None else seed
    run_dir = Path(run_dir) if run_dir else runs_dir() / run_id(encoder_name, cfg, seed)
    if (run_dir / "done.json").is_file() and resume:
        return run_dir
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    root, data_root = world_root(cfg), train_root(cfg)
    torch.manual_seed(seed)

    # 2. encoder (frozen, in its release dtype), LLM, connector
    with dist.main_first(env):  # rank 0 trains and saves a tiny LLM's tokenizer; the others read it
        model, tokenizer, encoder, weights = build_model(cfg, encoder_name, run_dir, root, with_encoder=False)
    tower = FrozenTower(encoder, tower_dtype(encoder.spec.name, tc.bf16))
    if tc.stage == "finetune":
        start_ckpt = init_from_align_run(model, Path(tc.init_from), encoder.spec.name)
        log(f"[train] finetune starts from {start_ckpt}")
    llm_trains = tc.stage != "align"
    if tc.grad_checkpointing:
        enable_grad_checkpointing(model.llm)
    template = get_template(cfg.llm.template)

    # 3. data: frozen features (cache) or image headers (encoder per batch), then tokenized conversations
    t_data = time.time()
    records = load_train(data_root / "train" / "llava.json")
    if tc.feature_cache:
        store, bad = None, {}
        if env.is_main:  # rank 0 builds the cache; the others wait in the broadcast, then read it
            store, bad = _cached_features(
                tower, data_root, records, cfg, weights, env.device, tc.skip_bad_images
            )
        bad = dist.broadcast_object(bad, env)
        if store is None:
            images = [r.image for r in records if r.image not in bad]
            store = extract_features(
                tower,
                data_root,
                images,
                cfg.policy,
                cfg.img_size,
                data_dir() / "features",
                weights,
                env.device,
            )
        transforms = store.transforms
    else:
        store = None
        transforms, bad = header_transforms(
            data_root, records, tower.spec, cfg.policy, cfg.img_size, tc.skip_bad_images
        )
        tower.to(env.device)
    records = _drop_bad_records(records, bad, run_dir, log, env)
    examples, truncated = [], 0
    for r in records:
        tf = transforms[r.image]
        if tc.stage == "align":
            ids, labels, cut = caption_example(r, tokenizer, tf, cfg.llm.max_length)
        else:
            ids, labels, cut = tokenize_conversation(r, template, tokenizer, tf, cfg.llm.max_length)
        truncated += cut
        examples.append((r.image, ids, labels, r.id))
    if truncated:
        log(f"[train] {truncated} conversations longer than {cfg.llm.max_length} tokens were truncated")
    data_seconds = time.time() - t_data

    # 4. parallelism, optimizer and schedule (derived values right after the config)
    for p in model.llm.parameters():
        p.requires_grad_(llm_trains)
    n_linear = {
        "trained": linear_params(model.connector) + (linear_params(model.llm) if llm_trains else 0),
        "frozen": 0 if llm_trains else linear_params(model.llm),
    }
    llm_params = sum(p.numel() for p in model.llm.parameters())
    mode = dist.resolve_parallel(tc.parallel, env.world_size, llm_trains, llm_params)
    grad_accum = _grad_accum(tc, env.world_size)
    global_batch = tc.batch_size * grad_accum * env.world_size
    steps_per_epoch = math.ceil(len(examples) / global_batch)
    total = math.ceil(tc.epochs * steps_per_epoch)
    if max_steps or tc.max_steps:
        total = min(total, max_steps or tc.max_steps)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        load_trainable(model, ckpt)  # before sharding: every rank reads the same full tensors
    core = model
    if mode == "fsdp":
        layers = [m for m in model.llm.modules() if type(m).__name__ in (model.llm._no_split_modules or [])]
        model = dist.shard_fsdp(model, layers, env, tc.bf16)
    else:
        model.to(env.device)
        if mode == "ddp":
            model = dist.wrap_ddp(model, env)
    named = [(f"connector.{n}", p) for n, p in core.connector.named_parameters()]
    named += [(f"llm.{n}", p) for n, p in core.llm.named_parameters()] if llm_trains else []
    decay = [(n, p) for n, p in named if p.dim() >= 2]  # no decay on biases and norms (as the release)
    no_decay = [(n, p) for n, p in named if p.dim() < 2]
    names = [n for n, _ in decay + no_decay]  # the optimizer's parameter order
    trainable = [p for _, p in decay + no_decay]
    opt = torch.optim.AdamW(
        [
            {"params": [p for _, p in decay], "weight_decay": tc.weight_decay},
            {"params": [p for _, p in no_decay], "weight_decay": 0.0},
        ],
        lr=tc.lr,
        betas=(0.9, 0.999),
    )
    what, n_train = ("connector + LLM" if llm_trains else "connector"), sum(p.numel() for p in trainable)
    log(
        f"[train] {run_dir.name}: stage {tc.stage}, training {n_train:,} parameters "
        f"({what}); encoder {encoder.spec.name} frozen in {tower.run_dtype}; {env.world_size} process(es), "
        f"parallel={mode}, global batch {global_batch} = {tc.batch_size} x {grad_accum} accum x "
        f"{env.world_size}; {total} steps"
    )

    # 5. resume
    start, skipped = 0, 0
    if ckpt is not None:
        state = load_optimizer_state(ckpt, model, opt, names, mode)
        start, skipped = state["step"], state.get("skipped_steps", 0)
    if env.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", start)
        atomic_write_json(
            run_dir / "run.json",
            {
                "encoder": encoder.spec.to_dict(),
                "encoder_weights": weights,
                "encoder_dtype": str(tower.run_dtype),
                "seed": seed,
                "stage": tc.stage,
                "init_from": tc.init_from,
                "git_commit": git_commit(),
                "world": str(root),
                "train_data": str(data_root),
                "examples": len(examples),
                "truncated_conversations": truncated,
                "bad_images": len(bad),
                "world_size": env.world_size,
                "parallel": mode,
                "global_batch": global_batch,
                "grad_accum": grad_accum,
            },
        )
    # a frozen pretrained LLM is the base model; a random-init tiny one is reproducible only from its weights
    save_llm = llm_trains or cfg.llm.kind == "tiny"
    peak = peak_flops(env.device) if tc.bf16 else None
    # model FLOPs per token: forward 2N, backward 4N for trained weights, 2N (input grads) for frozen ones
    flops_per_token = 6 * n_linear["trained"] + 4 * n_linear["frozen"]

    # 6. train
    amp = torch.autocast(device_type=env.device.split(":")[0], dtype=torch.bfloat16, enabled=tc.bf16)
    model.train()
    bar = tqdm(
        range(start, total),
        desc=f"train {encoder_name} s{seed}",
        initial=start,
        total=total,
        leave=False,
        disable=not env.is_main,
    )
    t0, tokens, samples, order_epoch, order = time.time(), 0, 0, None, None
    for step in bar:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(seed, epoch, len(examples)), epoch
        step_idx = order[k * global_batch : (k + 1) * global_batch].tolist()
        n_chunks = math.ceil(len(step_idx) / tc.batch_size)
        # ranks average gradients, so scaling by world/n_chunks makes the step's gradient the mean of
        # its chunks' mean-token losses: the same as one process accumulating n_chunks micro-batches
        loss_scale = env.world_size / n_chunks
        lr = get_lr(step, total, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum, step_tokens, step_samples = 0.0, 0, 0
        micro_batches = dist.rank_micro_batches(step_idx, tc.batch_size, grad_accum, env.rank)
        for m, idx in enumerate(micro_batches):
            batch = [examples[i] for i in idx]
            if store is not None:
                vision = store.get([b[0] for b in batch]).to(env.device) if batch else None
            else:
                batch, vision = _encode_batch(
                    tower, data_root, batch, transforms, tc.skip_bad_images, run_dir, env
                )
            weight = loss_scale
            if not batch:  # short last step: a zero-weight pass keeps this rank in the collectives
                batch, weight = [examples[step_idx[0]]], 0.0
                vision = _placeholder_vision(store, tower, cfg.img_size, env.device)
            with dist.grad_sync(model, mode, last_micro=m == grad_accum - 1):
                with amp:
                    out = model([b[1] for b in batch], vision, [b[2] for b in batch])
                (out.loss * weight).backward()
            if weight:
                loss_sum += out.loss.item() / n_chunks
                step_tokens += sum(len(b[1]) + vision.shape[1] for b in batch)
                step_samples += len(batch)
        loss_sum, step_tokens, step_samples = dist.all_reduce_sum([loss_sum, step_tokens, step_samples], env)
        tokens, samples = tokens + step_tokens, samples + step_samples
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            opt.zero_grad(set_to_none=True)
            if tc.nan_policy == "skip":
                skipped += 1
                continue
            what, last = ("loss" if not math.isfinite(loss_sum) else "gradient"), latest_checkpoint(run_dir)
            raise NonFiniteError(
                f"{run_dir.name}: non-finite {what} at step {step} (loss={loss_sum}, grad_norm={grad_norm}); "
                f"last good checkpoint: {last or 'none'}"
            )
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if env.is_main and (done % tc.log_every == 0 or done == total):
            dt = max(time.time() - t0, 1e-9)
            rec = {
                "step": done,
                "loss": round(loss_sum, 6),
                "lr": lr,
                "grad_norm": round(grad_norm, 6),
                "tokens_per_s": round(tokens / dt, 1),
                "samples_per_s": round(samples / dt, 2),
                "skipped_steps": skipped,
                **_memory(env.device),
            }
            if peak:
                rec["mfu"] = round(flops_per_token * tokens / dt / (peak * env.world_size), 4)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{loss_sum:.3f}")
        if done % tc.ckpt_every == 0 or done == total:
            msd, osd = gather_state(model, core, opt, names, mode, save_llm)
            if env.is_main:
                extra = {
                    "skipped_steps": skipped,
                    "total_steps": total,
                    "stage": tc.stage,
                    "saved": ["connector", "llm"] if save_llm else ["connector"],
                }
                save_checkpoint(run_dir, done, msd, osd, extra)
            dist.barrier(env)
        if stop_after is not None and done - start >= stop_after and done < total:
            return run_dir  # simulated kill (tests)

    # 7. done
    if env.is_main:
        final = _read_metrics(run_dir / "metrics.jsonl")
        atomic_write_json(
            run_dir / "done.json",
            {
                "steps": total,
                "skipped_steps": skipped,
                "final_loss": final[-1]["loss"] if final else None,
                "data_seconds": round(data_seconds, 3),
                "loop_seconds": round(time.time() - t0, 3),
            },
        )
    dist.barrier(env)
    return run_dir


def _grad_accum(tc, world_size: int) -> int:
    """Micro-batches per rank per step: from global_batch_size when set, else train.grad_accum."""
    if not tc.global_batch_size:
        return tc.grad_accum
    per_pass = tc.batch_size * world_size
    if tc.global_batch_size % per_pass:
        raise ValueError(
            f"train.global_batch_size={tc.global_batch_size} is not a multiple of batch_size x "
            f"world_size = {tc.batch_size} x {world_size}"
        )
    accum = tc.global_batch_size // per_pass
    if tc.grad_accum not in (1, accum):
        raise ValueError(
            f"train.grad_accum={tc.grad_accum} contradicts global_batch_size={tc.global_batch_size}"
            f" (which gives {accum} on {world_size} process(es)); leave grad_accum at 1"
        )
    return accum


def _cached_features(tower, root: Path, records, cfg: Config, weights, device: str, skip_bad: bool):
    """The feature cache of the records' images; with skip_bad, unreadable images are found and left out.

    Returns (store, bad): bad maps each dropped image to its error. The common case (no bad image)
    reads every image once; only after a failure is every image checked, then the cache rebuilt.
    """
    cache = data_dir() / "features"
    images = [r.image for r in records]
    try:
        return extract_features(tower, root, images, cfg.policy, cfg.img_size, cache, weights, device), {}
    except DataError:
        if not skip_bad:
            raise
    bad = find_bad_images(root, records)
    good = [im for im in images if im not in bad]
    return extract_features(tower, root, good, cfg.policy, cfg.img_size, cache, weights, device), bad


def _log_bad_image(run_dir: Path, image: str, record_ids: list[str], error: str, env) -> None:
    """One line per skipped image, in the console and in bad_images.jsonl (appends are atomic per line)."""
    ids = ", ".join(record_ids)
    print(f"[train rank {env.rank}] skipping unreadable image {image} (records {ids}): {error}")
    with open(run_dir / "bad_images.jsonl", "a") as f:
        f.write(json.dumps({"image": image, "record_ids": record_ids, "error": error}) + "\n")


def _drop_bad_records(records, bad: dict[str, str], run_dir: Path, log, env):
    if not bad:
        return records
    by_image: dict[str, list[str]] = {}
    for r in records:
        if r.image in bad:
            by_image.setdefault(r.image, []).append(r.id)
    if env.is_main:
        for image, ids in by_image.items():
            _log_bad_image(run_dir, image, ids, bad[image], env)
    kept = [r for r in records if r.image not in bad]
    log(f"[train] skipped {len(bad)} unreadable image(s): kept {len(kept)} of {len(records)} records")
    return kept


def _encode_batch(tower, root: Path, batch: list, transforms: dict, skip_bad: bool, run_dir: Path, env):
    """The encoder-per-batch path: decode, transform and encode the batch's images (feature_cache off).

    With skip_bad, an image that fails to decode is logged and its examples leave the batch.
    Returns (batch, vision tokens [B, N, D] on the device, or None if the batch emptied).
    """
    pixels, kept = [], []
    spec = tower.spec
    for b in batch:
        image, rid = b[0], b[3]
        try:
            img = load_image(root, {"id": rid, "image": image})
        except DataError as e:
            if not skip_bad:
                raise
            _log_bad_image(run_dir, image, [rid], str(e), env)
            continue
        pixels.append(to_tensor(transforms[image].apply(img), spec.mean, spec.std))
        kept.append(b)
    if not kept:
        return [], None
    return kept, tower(torch.stack(pixels).to(env.device))


def _placeholder_vision(store, tower, img_size: int, device: str) -> torch.Tensor:
    """Vision tokens of the right shape for a zero-weight pass (their values never reach a gradient)."""
    if store is not None:
        return torch.zeros_like(store.tokens[:1]).to(device)
    return tower(torch.zeros(1, 3, img_size, img_size, device=device))


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
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda where available)")
    ap.add_argument("--resume", action="store_true", help="continue from checkpoints/latest if present")
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # simulated kill (tests)
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-3")
    a = ap.parse_intermixed_args(argv)  # options may follow the overrides
    cfg = load_preset(a.preset, a.overrides)
    if not a.resume and a.run_dir and Path(a.run_dir, "checkpoints").exists():
        raise SystemExit(f"{a.run_dir} already has checkpoints; pass --resume to continue it")
    try:
        out = train(
            cfg,
            a.encoder,
            a.seed,
            a.run_dir,
            a.max_steps,
            resume=a.resume,
            device=a.device,
            stop_after=a.stop_after,
        )
        if int(os.environ.get("RANK", "0")) == 0:
            print(out)
    finally:
        dist.teardown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
