"""Configs as dataclasses, presets as YAML (vlmlab/presets/*.yaml) plus dotted overrides, run ids.

"What" lives here (facts and knobs); "how" (building, training) lives in the modules that read it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def project_root() -> Path:
    """The repository root (where pyproject.toml is) if vlmlab runs from a checkout, else the cwd."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def data_dir() -> Path:
    return Path(os.environ.get("VLMLAB_DATA", project_root() / "data"))


def runs_dir() -> Path:
    return Path(os.environ.get("VLMLAB_RUNS", project_root() / "runs"))


def figures_dir() -> Path:
    return Path(os.environ.get("VLMLAB_FIGURES", project_root() / "figures"))


@dataclass
class LLMConfig:
    kind: str = "tiny"  # tiny (random-init Llama from this config) | hf (local dir) | gguf (local file)
    path: str | None = None  # local HF directory or GGUF file for kind hf/gguf
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_length: int = 2048
    template: str = "vicuna_v15"

    @property
    def id(self) -> str:
        if self.kind == "tiny":
            return f"tinyllama-h{self.hidden_size}l{self.num_layers}"
        return Path(self.path or self.kind).name.removesuffix(".gguf")


@dataclass
class PretrainConfig:
    """The one recipe every toy encoder is pretrained with ("matched initialization")."""

    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    seed: int = 0


@dataclass
class TrainConfig:
    """Connector + LLM training (single stage, "no-align"); paper numbers in presets/paper-*.yaml."""

    # no-align: connector + LLM in one stage (the paper) | align: connector only (on align_world) |
    # finetune: connector + LLM, starting from the connector of the align run named by init_from
    stage: str = "no-align"
    init_from: str | None = None  # finetune: run directory of an align run
    align_world: str | None = None  # training data of the align stage (LLaVA-558k); None = `world`
    epochs: float = 1.0
    max_steps: int | None = None  # stop early (tests, smoke)
    batch_size: int = 16  # per process per micro-batch
    grad_accum: int = 1  # micro-batches per step; global batch = batch_size * grad_accum * world_size
    global_batch_size: int | None = None  # if set, grad_accum is derived from it and the world size
    lr: float = 2e-5
    weight_decay: float = 0.1
    warmup_ratio: float = 0.03
    grad_clip: float = 1.0
    bf16: bool = False
    grad_checkpointing: bool = False  # activation checkpointing of the LLM's layers
    parallel: str = "auto"  # auto | ddp | fsdp | none (auto: FSDP for a training LLM >= 1B params, else DDP)
    feature_cache: bool = True  # frozen tokens from the on-disk cache; False: the encoder runs on every batch
    skip_bad_images: bool = False  # drop (and log) records whose image cannot be read, instead of failing
    log_every: int = 10
    ckpt_every: int = 200
    nan_policy: str = "stop"  # stop | skip


@dataclass
class EvalConfig:
    benchmarks: list[str] = field(default_factory=lambda: ["toy-vqa", "toy-ref"])
    batch_size: int = 32
    max_new_tokens: int = 32
    limit: int | None = None  # items per benchmark (None = all)
    vqa_variant: str = "official"


INITS = ("classification", "detection", "segmentation")


@dataclass
class SweepConfig:
    """The grid a suite runs: encoders x inits x connectors x policies x seeds.

    Empty lists mean "just the preset's own value" (`init`, `connector`, `policy`), so a preset
    without a `sweep:` block runs encoders x seeds only. `workers` trains/evaluates that many cells at
    once (processes; on one GPU they share it). `cell_gpu_gib`, the GPU memory one cell may take at
    its peak, caps them at what the visible cards hold (None: no cap).
    """

    inits: list[str] = field(default_factory=list)
    connectors: list[str] = field(default_factory=list)
    policies: list[str | None] = field(default_factory=list)
    workers: int = 1
    cell_gpu_gib: float | None = None


@dataclass
class Config:
    """One preset: the world, the encoders swept, the VLM and the recipe."""

    name: str = "smoke"
    world: str = "smoke"  # vlmlab.data.toyworld.WORLD_PRESETS key, or a path to a dataset root
    encoders: list[str] = field(default_factory=lambda: ["toy-vmamba", "toy-vit"])
    img_size: int = 32  # encoder input (square); tokens = (img_size / 16)^2 for the toy taps
    policy: str | None = None  # geometry policy; None = the encoder's default
    # encoder weights: classification (matched init) | detection | segmentation (toy dense adaptation,
    # data_prep/adapt_encoders.py); real encoders take their weights from the checkpoint instead
    init: str = "classification"
    connector: str = "gelu-mlp"
    seeds: list[int] = field(default_factory=lambda: [7])
    llm: LLMConfig = field(default_factory=LLMConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _apply(obj: Any, updates: dict, where: str) -> Any:
    """Recursively sets dataclass fields from a dict; unknown keys are errors that list known ones."""
    for key, value in updates.items():
        if not hasattr(obj, key) or key.startswith("_"):
            known = ", ".join(f.name for f in dataclasses.fields(obj))
            raise KeyError(f"{where}: unknown key {key!r}; known: {known}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _apply(current, value, f"{where}.{key}")
        else:
            setattr(obj, key, value)
    return obj


def _parse_value(text: str):
    """YAML scalar/list parsing, plus floats YAML 1.1 reads as strings ("1e-3")."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str, overrides: list[str] | dict | None = None) -> Config:
    """Config of a named preset (or a YAML path), with overrides `["train.lr=1e-3", ...]` applied."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(list_presets())}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    cfg = _apply(Config(), raw, str(path))
    if isinstance(overrides, dict):
        overrides = [f"{k}={v}" for k, v in overrides.items()]
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        nested: dict = {}
        cur = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = _parse_value(value)
        _apply(cfg, nested, f"override {item!r}")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    from vlmlab.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(d: dict) -> Config:
    return _apply(Config(), d, "config")


def run_id(encoder: str, cfg: Config, seed: int) -> str:
    """Spells out what was trained: encoder (+ its init if not classification) + llm + stage +
    connector + geometry + seed."""
    policy = cfg.policy or "default"
    init = "" if cfg.init == "classification" else f"@{cfg.init[:3]}"
    return f"{encoder}{init}+{cfg.llm.id}+{cfg.train.stage}+{cfg.connector}+{policy}+s{seed}"
