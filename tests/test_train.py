"""Training, feature cache and evaluation on a tiny toy world (CPU, seconds)."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from vlmlab.config import load_preset

OVR = [
    "encoders=[toy-vit]",
    "train.max_steps=6",
    "train.ckpt_every=2",
    "train.log_every=1",
    "train.batch_size=8",
    "eval.limit=12",
    "llm.hidden_size=32",
    "llm.num_layers=1",
]


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
    return [
        {k: m[k] for k in ("step", "loss", "lr", "grad_norm")}
        for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    ]


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


def _tensors(path):
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def test_non_finite_stop_leaves_last_good_checkpoint_intact(world, tmp_path, monkeypatch):
    """A NaN at step 5 stops the run; checkpoint 4 is untouched and resuming from it ends as a clean run."""
    from vlmlab.train import NonFiniteError, latest_checkpoint, train
    from vlmlab.vlm.model import VLM

    cfg = load_preset("smoke", OVR)
    clean = train(cfg, run_dir=tmp_path / "clean", device="cpu")
    forward, calls = VLM.forward, {"n": 0}

    def poisoned(self, *a, **k):
        out = forward(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 5:  # grad_accum 1: the 5th forward is step 5 (after checkpoint 4)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(VLM, "forward", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteError, match=r"at step 4 .*last good checkpoint: .*step-0000004"):
        train(cfg, run_dir=run, device="cpu")
    monkeypatch.setattr(VLM, "forward", forward)
    assert latest_checkpoint(run).name == "step-0000004" and not (run / "done.json").exists()
    for f in ("model.safetensors", "optim.safetensors"):
        a, b = (
            _tensors(clean / "checkpoints/step-0000004" / f),
            _tensors(run / "checkpoints/step-0000004" / f),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    train(cfg, run_dir=run, device="cpu", resume=True)
    assert _losses(run) == _losses(clean)
    a, b = (
        _tensors(latest_checkpoint(clean) / "model.safetensors"),
        _tensors(latest_checkpoint(run) / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def _world_copy_with_bad_image(world, tmp_path):
    """A copy of the smoke world whose first image in epoch-0 order is a truncated PNG."""
    import shutil

    from vlmlab.data.schema import load_train
    from vlmlab.train import epoch_order

    root = tmp_path / "world"
    shutil.copytree(world / "toyworld" / "smoke", root)
    records = load_train(root / "train" / "llava.json")
    bad = records[int(epoch_order(7, 0, len(records))[0])]
    png = root / bad.image
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])  # header intact, pixel data cut
    return root, bad, len(records)


@pytest.mark.parametrize("feature_cache", [True, False])
def test_unreadable_image_fails_or_is_skipped_under_the_flag(world, tmp_path, feature_cache):
    from vlmlab.data.schema import DataError
    from vlmlab.train import train

    root, bad, n = _world_copy_with_bad_image(world, tmp_path)
    ovr = OVR + [f"world={root}", "train.max_steps=2", f"train.feature_cache={feature_cache}"]
    with pytest.raises(DataError, match=bad.image):
        train(load_preset("smoke", ovr), run_dir=tmp_path / "strict", device="cpu")
    run = train(
        load_preset("smoke", ovr + ["train.skip_bad_images=true"]), run_dir=tmp_path / "skip", device="cpu"
    )
    assert (run / "done.json").is_file()
    logged = [json.loads(x) for x in (run / "bad_images.jsonl").read_text().splitlines()]
    assert [(x["image"], x["record_ids"]) for x in logged] == [(bad.image, [bad.id])]
    info = json.loads((run / "run.json").read_text())
    # with the cache the record is dropped before training; without, it leaves its batch when it fails to load
    assert info["examples"] == (n - 1 if feature_cache else n) and info["bad_images"] == (
        1 if feature_cache else 0
    )


def test_long_conversations_are_truncated_and_counted(world, tmp_path, capsys):
    from vlmlab.data.datasets import tokenize_conversation
    from vlmlab.data.schema import load_train
    from vlmlab.train import train, world_root
    from vlmlab.vlm.prompts import get_template

    max_len = 190  # smoke conversations are ~140-210 tokens: some, not all, get cut
    cfg = load_preset("smoke", OVR + ["train.max_steps=1", f"llm.max_length={max_len}"])
    run = train(cfg, run_dir=tmp_path / "trunc", device="cpu")
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(run / "tokenizer")
    t = get_template(cfg.llm.template)
    lengths = [
        len(tokenize_conversation(r, t, tok, None, 10**6)[0])
        for r in load_train(world_root(cfg) / "train/llava.json")
    ]
    expected = sum(n > max_len for n in lengths)
    assert 0 < expected < len(lengths)
    assert f"{expected} conversations longer than {max_len} tokens were truncated" in capsys.readouterr().out
    assert json.loads((run / "run.json").read_text())["truncated_conversations"] == expected


def test_encoder_per_batch_matches_the_feature_cache(world, tmp_path):
    from vlmlab.train import train

    a = train(load_preset("smoke", OVR + ["train.max_steps=3"]), run_dir=tmp_path / "cache", device="cpu")
    b = train(
        load_preset("smoke", OVR + ["train.max_steps=3", "train.feature_cache=false"]),
        run_dir=tmp_path / "live",
        device="cpu",
    )
    for x, y in zip(_losses(a), _losses(b), strict=True):
        assert (
            x["step"] == y["step"]
            and abs(x["loss"] - y["loss"]) < 1e-5
            and abs(x["grad_norm"] - y["grad_norm"]) < 1e-4
        )


def test_gradient_checkpointing_changes_memory_not_losses(world, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from vlmlab.train import train

    calls = []
    name = next(
        n
        for n in ("activation_checkpointing_enable", "gradient_checkpointing_enable")
        if hasattr(LlamaForCausalLM, n)
    )
    enable = getattr(LlamaForCausalLM, name)
    monkeypatch.setattr(LlamaForCausalLM, name, lambda self, **k: (calls.append(k), enable(self, **k))[1])
    ovr = OVR + ["train.max_steps=3", "llm.num_layers=2"]
    a = train(load_preset("smoke", ovr), run_dir=tmp_path / "plain", device="cpu")
    assert not calls
    b = train(
        load_preset("smoke", ovr + ["train.grad_checkpointing=true"]), run_dir=tmp_path / "gc", device="cpu"
    )
    assert len(calls) == 1 and list(calls[0].values()) == [{"use_reentrant": False}]
    for x, y in zip(_losses(a), _losses(b), strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-6 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-5


def test_align_trains_connector_only_then_finetune_starts_from_it(world, tmp_path):
    from vlmlab.train import train

    base = OVR + ["train.max_steps=2", "train.ckpt_every=1"]
    align = train(
        load_preset("smoke", base + ["train.stage=align", "train.lr=1e-2"]),
        run_dir=tmp_path / "al",
        device="cpu",
    )
    s1, s2 = (_tensors(align / f"checkpoints/step-000000{i}/model.safetensors") for i in (1, 2))
    assert any(not torch.equal(s1[k], s2[k]) for k in s1 if k.startswith("connector."))
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if k.startswith("llm."))  # frozen LLM
    assert json.loads((align / "checkpoints/step-0000002/state.json").read_text())["stage"] == "align"
    with pytest.raises(ValueError, match="init_from"):
        train(load_preset("smoke", base + ["train.stage=finetune"]), run_dir=tmp_path / "x", device="cpu")
    # lr 0: the finetune run's weights stay where init_from put them
    ft = train(
        load_preset("smoke", base + ["train.stage=finetune", f"train.init_from={align}", "train.lr=0"]),
        run_dir=tmp_path / "ft",
        device="cpu",
    )
    f2 = _tensors(ft / "checkpoints/step-0000002/model.safetensors")
    assert f2.keys() == s2.keys() and all(torch.equal(f2[k], s2[k]) for k in s2)
    with pytest.raises(ValueError, match="finetune starts from an align run"):
        train(
            load_preset("smoke", base + ["train.stage=finetune", f"train.init_from={ft}"]),
            run_dir=tmp_path / "y",
            device="cpu",
        )


def test_align_examples_learn_the_caption_only():
    from vlmlab.data.schema import TrainRecord
    from vlmlab.train import caption_example
    from vlmlab.vlm.llm import build_toy_tokenizer
    from vlmlab.vlm.model import IGNORE

    tok = build_toy_tokenizer(["a red circle on grass", "Describe the image."])
    rec = TrainRecord.model_validate(
        {
            "id": "c",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "Describe the image.\n<image>"},
                {"from": "gpt", "value": "a red circle on grass"},
            ],
        }
    )
    ids, labels, cut = caption_example(rec, tok, None, 64)
    body = tok("a red circle on grass", add_special_tokens=False).input_ids
    assert ids == [tok.bos_token_id] + body + [tok.eos_token_id] and labels == [IGNORE] + body + [
        tok.eos_token_id
    ]
    assert not cut and caption_example(rec, tok, None, 3)[2]


def test_grad_accum_from_global_batch():
    from types import SimpleNamespace as NS

    from vlmlab.train import _grad_accum

    paper = NS(global_batch_size=128, batch_size=16, grad_accum=1)  # the release: 128 = 16 per GPU x 8 GPUs
    assert [_grad_accum(paper, w) for w in (1, 2, 8)] == [8, 4, 1]
    assert _grad_accum(NS(global_batch_size=None, batch_size=16, grad_accum=3), 4) == 3
    with pytest.raises(ValueError, match="not a multiple"):
        _grad_accum(paper, 3)
    with pytest.raises(ValueError, match="contradicts"):
        _grad_accum(NS(global_batch_size=128, batch_size=16, grad_accum=2), 1)


def test_paper_presets_carry_the_release_recipe():
    """Every number of FACTS.md "Setting" that the presets hold."""
    for name in ("paper-224", "paper-dense"):
        cfg = load_preset(name)
        t = cfg.train
        assert (t.stage, t.epochs, t.global_batch_size, t.batch_size, t.lr, t.weight_decay) == (
            "no-align",
            1,
            128,
            16,
            2e-5,
            0.1,
        )
        assert (t.warmup_ratio, t.grad_clip, t.bf16, t.grad_checkpointing, t.parallel) == (
            0.03,
            1.0,
            True,
            True,
            "auto",
        )
        assert (cfg.seeds, cfg.llm.max_length, cfg.llm.template, cfg.connector) == (
            [7],
            2048,
            "vicuna_v15",
            "gelu-mlp",
        )
        assert t.align_world


def test_frozen_tower_dtype_follows_the_release():
    from vlmlab.encoders import load_encoder
    from vlmlab.features import cache_key
    from vlmlab.train import FrozenTower, tower_dtype

    fp32 = [
        "vmamba-s",
        "vmamba-s-coco",
        "maxvit-t",
        "mambavision-b",
        "vit-adapter-deit-b",
        "toy-vmamba",
        "toy-maxvit",
    ]
    for name in fp32:
        assert tower_dtype(name, bf16=True) == torch.float32, name
    for name in ["vit-s", "vitdet-b", "toy-vit"]:
        assert (
            tower_dtype(name, bf16=True) == torch.bfloat16 and tower_dtype(name, bf16=False) == torch.float32
        )
    enc = load_encoder("toy-vit", img_size=32)
    spec = enc.spec
    t32, t16 = FrozenTower(copy.deepcopy(enc), torch.float32), FrozenTower(enc, torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)
    assert t16(x).dtype == torch.float32 and next(t16.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(t16(x), t32(x), atol=0.1, rtol=0.05)
    keys = {cache_key(t.spec, None, None, 32, ".", ["a.png"]) for t in (t16, t32)}
    assert len(keys) == 2 and t32.spec == spec  # bf16 tokens never share the fp32 cache


def test_peak_flops_table(monkeypatch):
    from vlmlab.train import peak_flops

    assert peak_flops("cpu") is None
    for name, flops in [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("Tesla T4", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert peak_flops("cuda:0") == flops, name


def test_metrics_and_run_record(world, tmp_path):
    from vlmlab.train import train

    run = train(load_preset("smoke", OVR + ["train.max_steps=2"]), run_dir=tmp_path / "m", device="cpu")
    m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"] for r in m)
    assert "mfu" not in m[0]  # no peak for a CPU
    info = json.loads((run / "run.json").read_text())
    assert (
        info["git_commit"]
        and info["world_size"] == 1
        and info["parallel"] == "none"
        and info["global_batch"] == 8
    )
    assert load_preset(str(run / "config.yaml")).train.max_steps == 2
