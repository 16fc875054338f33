"""Training, feature cache and evaluation on a tiny toy world (CPU, seconds)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from vlmlab.config import load_preset

OVR = ["encoders=[toy-vit]", "train.max_steps=6", "train.ckpt_every=2", "train.log_every=1", "train.batch_size=8",
       "eval.limit=12", "llm.hidden_size=32", "llm.num_layers=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A smoke toy world in a temp data dir (VLMLAB_DATA points there for this module)."""
    from vlmlab.data.toyworld import WORLD_PRESETS, generate_world

    data = tmp_path_factory.mktemp("data")
    old = os.environ.get("VLMLAB_DATA")
    os.environ["VLMLAB_DATA"] = str(data)
    generate_world(WORLD_PRESETS["smoke"], data / "toyworld" / "smoke", progress=False)
    yield data
    if old is None:
        os.environ.pop("VLMLAB_DATA")
    else:
        os.environ["VLMLAB_DATA"] = old


def _losses(run):
    return [{k: m[k] for k in ("step", "loss", "lr", "grad_norm")} for m in
            map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_killed_and_resumed_run_is_bit_identical(world, tmp_path):
    from vlmlab.train import latest_checkpoint, train

    cfg = load_preset("smoke", OVR)
    a = train(cfg, run_dir=tmp_path / "a", device="cpu")
    b = train(cfg, run_dir=tmp_path / "b", device="cpu", stop_after=3)  # "killed" after step 3
    assert not (b / "done.json").exists()
    assert latest_checkpoint(b).name == "step-0000002"  # the checkpoint before the kill
    b = train(cfg, run_dir=tmp_path / "b", device="cpu", resume=True)
    wa = load_file(str(latest_checkpoint(a) / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(b) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert _losses(a) == _losses(b)
    assert _losses(a)[-1]["step"] == 6


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(world, tmp_path):
    from vlmlab.train import NonFiniteError, train

    cfg = load_preset("smoke", OVR + ["train.lr=1e20", "train.warmup_ratio=0.0", "train.grad_clip=1e20"])
    with pytest.raises(NonFiniteError, match=r"at step \d+"):
        train(cfg, run_dir=tmp_path / "nan", device="cpu")
    cfg.train.nan_policy = "skip"
    run = train(cfg, run_dir=tmp_path / "skip", device="cpu")
    assert json.loads((run / "done.json").read_text())["skipped_steps"] > 0


def test_feature_cache_key_and_partial_cache(world, tmp_path):
    from vlmlab.encoders import load_encoder
    from vlmlab.features import cache_key, extract_features
    from vlmlab.train import world_root

    cfg = load_preset("smoke", OVR)
    root = world_root(cfg)
    enc = load_encoder("toy-vit", img_size=32)
    imgs = sorted({p.relative_to(root).as_posix() for p in (root / "images" / "test").glob("*.png")})[:5]
    k = cache_key(enc.spec, None, None, 32, root, imgs)
    assert k != cache_key(enc.spec, None, "resize-naive", 32, root, imgs)
    assert k != cache_key(enc.spec, None, None, 64, root, imgs)
    assert k != cache_key(enc.spec, None, None, 32, root, imgs[:4])
    s1 = extract_features(enc, root, imgs, None, 32, tmp_path)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    shard = next(folder.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])  # a partial shard is detected and rebuilt
    s2 = extract_features(enc, root, imgs, None, 32, tmp_path)
    torch.testing.assert_close(s1.tokens, s2.tokens)
    assert s1.tokens.shape == (5, 4, enc.spec.dim)


def test_evaluation_resumes_and_repairs_a_cut_last_line(world, tmp_path):
    from vlmlab.evaluate.harness import evaluate_run
    from vlmlab.train import train

    cfg = load_preset("smoke", OVR)
    run = train(cfg, run_dir=tmp_path / "ev", device="cpu")
    s = evaluate_run(run, device="cpu")
    for name in ("toy-vqa", "toy-ref"):
        b = s["benchmarks"][name]
        assert b["n"] == b["expected_n"] == 12 and 0 <= b["score"] <= 1
    res = run / "results" / "toy-ref.jsonl"
    lines = res.read_text().splitlines()
    res.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # cut mid-line
    s2 = evaluate_run(run, device="cpu")
    rows = [json.loads(x) for x in res.read_text().splitlines()]
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    assert s2["benchmarks"]["toy-ref"]["n"] == 12
    assert all("transform" in r and len(r["gt_box"]) == 4 for r in rows)
