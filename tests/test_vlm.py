"""The VLM pieces: prompt formats, connectors, visual-token placement, label masking, generation."""

import pytest
import torch

from vlmlab.config import LLMConfig
from vlmlab.data.datasets import format_box, prompt_ids, tokenize_conversation
from vlmlab.data.schema import TrainRecord
from vlmlab.evaluate.generate import cut_at_stop, greedy_generate
from vlmlab.vlm.connectors import CONNECTORS, build_connector
from vlmlab.vlm.llm import build_toy_tokenizer, tiny_llama
from vlmlab.vlm.model import IGNORE, VLM
from vlmlab.vlm.prompts import VICUNA_SYSTEM, get_template

TEXTS = [
    VICUNA_SYSTEM,
    "USER: What color is the red circle? ASSISTANT:",
    "red",
    "blue",
    "green",
    "yes",
    "no",
    'Please provide the bounding box coordinate of the region this sentence describes: "the red circle"',
]


@pytest.fixture(scope="module")
def tok():
    return build_toy_tokenizer(TEXTS)


def test_vicuna_v15_format_is_the_releases():
    t = get_template("vicuna_v15")
    assert t.turn(0, "<image>\nWhat is it?") == f"{VICUNA_SYSTEM} USER: What is it? ASSISTANT: "
    assert t.turn(1, "red") == "red</s>"
    assert t.turn(2, "And now?") == "USER: And now? ASSISTANT: "
    assert t.generation_prompt("<image>\nWhat is it?").endswith("ASSISTANT:")


def test_chatml_and_llama2_formats():
    c = get_template("chatml")
    assert c.turn(0, "hi").endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert c.turn(1, "yo") == "yo<|im_end|>\n"
    assert get_template("llama2_chat").turn(0, "hi").startswith("[INST] <<SYS>>\n")
    with pytest.raises(KeyError, match="vicuna_v15"):
        get_template("nope")


def test_toy_tokenizer_round_trips_words_and_boxes(tok):
    for s in ["What color is the red circle?", "[0.12, 0.34, 0.56, 1.00]", "yes"]:
        assert tok.decode(tok(s, add_special_tokens=False).input_ids) == s
    assert tok.unk_token_id not in tok("[0.98, 0.07, 0.5, 0.31]", add_special_tokens=False).input_ids


@pytest.mark.parametrize("kind", CONNECTORS)
def test_connectors_shapes(kind):
    c = build_connector(kind, 24, 40)
    assert c(torch.randn(2, 5, 24)).shape == (2, 5, 40)


def test_fused_gelu_mlp_is_three_linear_layers():
    c = build_connector("fused-gelu-mlp", 8, 16)
    lin = [m for m in c if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(8, 32), (32, 16), (16, 16)]


def _model(tok, hidden=32):
    torch.manual_seed(0)
    llm = tiny_llama(LLMConfig(hidden_size=hidden, num_layers=2, num_heads=2, intermediate_size=64), tok)
    return VLM(llm, "gelu-mlp", vision_dim=12).eval()


def test_labels_only_on_assistant_tokens(tok):
    rec = TrainRecord.model_validate(
        {
            "id": "a",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the red circle?"},
                {"from": "gpt", "value": "red"},
            ],
        }
    )
    ids, labels, cut = tokenize_conversation(rec, get_template("vicuna_v15"), tok, None, 512)
    assert ids[0] == tok.bos_token_id and not cut
    learned = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE]
    assert tok.decode(learned) == "red</s>" or tok.decode(learned, skip_special_tokens=True) == "red"
    assert learned[-1] == tok.eos_token_id


def test_visual_tokens_sit_right_after_bos(tok):
    m = _model(tok)
    ids = [[tok.bos_token_id, 5, 6, 7], [tok.bos_token_id, 8]]
    vision = torch.randn(2, 3, 12)
    emb, mask, pos, lab = m.assemble(ids, vision, [[IGNORE, 5, 6, 7], [IGNORE, 8]], padding_side="right")
    proj = m.connector(vision)
    torch.testing.assert_close(emb[0, 1:4], proj[0])
    torch.testing.assert_close(emb[1, 1:4], proj[1])
    assert (lab[:, 1:4] == IGNORE).all() and lab[0, 4:].tolist() == [5, 6, 7]
    assert mask[1].tolist() == [1, 1, 1, 1, 1, 0, 0]
    emb_l, mask_l, pos_l, _ = m.assemble(ids, vision, padding_side="left")
    assert mask_l[1].tolist() == [0, 0, 1, 1, 1, 1, 1] and pos_l[1, 2:].tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(emb_l[1, 3:6], proj[1])


def test_batched_generation_equals_batch_of_one(tok):
    m = _model(tok, hidden=48)
    t = get_template("vicuna_v15")
    prompts = [
        "What color is the red circle?",
        "yes",
        'Please provide the bounding box coordinate of the region this sentence describes: "the red circle"',
        "no",
    ]
    ids = [prompt_ids(p, t, tok) for p in prompts]
    vision = torch.randn(len(ids), 4, 12)
    batched = greedy_generate(m, ids, vision, tok.eos_token_id, max_new_tokens=12)
    single = [
        greedy_generate(m, [i], vision[k : k + 1], tok.eos_token_id, max_new_tokens=12)[0]
        for k, i in enumerate(ids)
    ]
    assert batched == single
    assert all(len(g) <= 12 for g in batched)


def test_greedy_generate_stops_each_row_at_its_own_eos():
    # a scripted LLM: at step t row b's argmax is script[b][t]; EOS is 0
    from types import SimpleNamespace

    script = [[5, 6, 0, 7, 7], [8, 0, 9, 9, 9], [4, 4, 4, 4, 4]]
    calls = []

    def llm(**kw):
        t = len(calls)
        calls.append(kw)
        logits = torch.zeros(3, 1, 10)
        for b, row in enumerate(script):
            logits[b, 0, row[t]] = 1.0
        return SimpleNamespace(logits=logits)

    llm.forward = lambda cache=None, **kw: None  # what `_cache_kwarg` inspects
    model = SimpleNamespace(
        llm=llm,
        assemble=lambda ids, vision, padding_side: (
            torch.zeros(3, 2, 4),
            torch.ones(3, 2, dtype=torch.long),
            torch.arange(2).expand(3, 2),
            None,
        ),
    )
    got = greedy_generate(model, [[1], [1], [1]], torch.zeros(3, 1, 4), eos_id=0, max_new_tokens=4)
    assert got == [[5, 6], [8], [4, 4, 4, 4]]  # tokens before each row's first EOS; row 2 runs out
    assert len(calls) == 4  # the prompt + 3 steps: the 4th token ends the budget, no 5th call
    calls.clear()
    script[2] = [4, 4, 0, 4, 4]
    assert greedy_generate(model, [[1]] * 3, torch.zeros(3, 1, 4), eos_id=0, max_new_tokens=4)[2] == [4, 4]
    assert len(calls) == 3  # every row has ended after step 3: no further call
    assert greedy_generate(model, [[1]] * 3, torch.zeros(3, 1, 4), eos_id=0, max_new_tokens=0) == [[]] * 3


def test_cut_at_stop_and_format_box():
    assert cut_at_stop("red</s>blue") == "red"
    assert cut_at_stop(" yes USER: more") == "yes"
    assert format_box([0.1234, -0.2, 1.5, 0.5]) == "[0.12, 0.00, 1.00, 0.50]"
