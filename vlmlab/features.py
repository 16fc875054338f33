"""Frozen-feature cache: the encoder runs once per (encoder, weights, tap, geometry, images).

With the vision tower frozen, its tokens are a pure function of those inputs, so training and
evaluation read them from safetensors shards instead of re-running the encoder. The cache key
hashes every input; a manifest written last marks a complete cache, and each shard's byte size
and sha256 are checked on load, so a partial or stale cache is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmlab import geometry
from vlmlab.data.datasets import iter_pixel_batches
from vlmlab.encoders.checkpoints import save_safetensors
from vlmlab.io import atomic_write_json

SHARD_SIZE = 512
_SHA_CACHE: dict[tuple[str, int, float], str] = {}


def file_sha256(path: str | Path) -> str:
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def cache_key(
    spec, weights: str | None, policy: str | None, img_size: int, root: Path, images: list[str]
) -> str:
    """Changes whenever any input of the frozen features changes."""
    parts = {
        "encoder": spec.name,
        "tap": spec.tap,
        "weights": file_sha256(weights) if weights else "random-init",
        "policy": policy or spec.policy,
        "img_size": img_size,
        "mean": spec.mean,
        "std": spec.std,
        "dataset": str(Path(root).resolve()),
        "dataset_meta": file_sha256(Path(root) / "meta.json") if (Path(root) / "meta.json").is_file() else "",
        "images": hashlib.sha256("\n".join(images).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class FeatureStore:
    """Tokens [N, T, D] of N images, with each image's ImageTransform."""

    tokens: torch.Tensor
    index: dict[str, int]
    transforms: dict[str, geometry.ImageTransform]

    def get(self, images: list[str]) -> torch.Tensor:
        return self.tokens[[self.index[i] for i in images]]


@dataclass
class _ImageRef:
    image: str
    id: str
    metadata: dict | None = None


def _load(path: Path) -> FeatureStore | None:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    tokens = []
    for shard in m["shards"]:
        f = path / shard["file"]
        if not f.is_file() or f.stat().st_size != shard["bytes"] or file_sha256(f) != shard["sha256"]:
            return None
        tokens.append(load_file(str(f))["tokens"])
    images = m["images"]
    return FeatureStore(
        torch.cat(tokens),
        {im: i for i, im in enumerate(images)},
        {im: geometry.ImageTransform.from_dict(t) for im, t in zip(images, m["transforms"], strict=True)},
    )


@torch.no_grad()
def extract_features(
    encoder,
    root: Path,
    images: list[str],
    policy: str | None,
    img_size: int,
    cache_dir: Path | None,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> FeatureStore:
    """Frozen tokens for `images` (paths relative to root); read from / written to `cache_dir` if given."""
    images = sorted(set(images))
    spec = encoder.spec
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{spec.name}-{cache_key(spec, weights, policy, img_size, root, images)}"
        store = _load(path)
        if store is not None:
            return store
        if path.exists():  # partial or stale: rebuild from scratch
            shutil.rmtree(path, ignore_errors=True)
    encoder = encoder.to(device).eval()
    refs = [_ImageRef(im, im) for im in images]
    chunks, tfs = [], []
    for _, pix, tf in iter_pixel_batches(
        root, refs, spec, policy, img_size, batch_size, desc=f"features {spec.name}"
    ):
        chunks.append(encoder(pix.to(device)).float().cpu())
        tfs += tf
    tokens = torch.cat(chunks)
    store = FeatureStore(tokens, {im: i for i, im in enumerate(images)}, dict(zip(images, tfs, strict=True)))
    if path is not None:
        _write_store(path, tokens, images, tfs, spec, weights, policy, img_size)
    return store


def _write_store(path: Path, tokens, images, tfs, spec, weights, policy, img_size) -> None:
    """Writes the shards and manifest into a private folder, then renames it to `path` in one step,
    so concurrent builders of the same key (sweep workers) never see or delete each other's files."""
    final, path = path, path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shards = []
    for s, i in enumerate(range(0, len(images), SHARD_SIZE)):
        f = path / f"shard-{s:05d}.safetensors"
        save_safetensors({"tokens": tokens[i : i + SHARD_SIZE]}, f)
        shards.append({"file": f.name, "bytes": f.stat().st_size, "sha256": file_sha256(f)})
    atomic_write_json(
        path / "manifest.json",
        {
            "encoder": spec.to_dict(),
            "weights": weights,
            "policy": policy or spec.policy,
            "img_size": img_size,
            "images": images,
            "transforms": [t.to_dict() for t in tfs],
            "shards": shards,
        },
    )
    try:
        path.rename(final)
    except OSError:  # another process finished the same store first: keep theirs
        shutil.rmtree(path, ignore_errors=True)
