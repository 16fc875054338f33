"""Chat prompt templates, turn by turn, as the training and evaluation code tokenizes them.

Each builder returns the text of one turn, so labels can be masked per turn (only assistant
turns are learned). Formats are the models' own:
- vicuna_v15: LLaVA-1.5 / prismatic-vlms (`VicunaV15ChatPromptBuilder`): system prompt + " ",
  "USER: {msg} ASSISTANT: ", then "{answer}</s>".
- llama2_chat: "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{msg} [/INST] ", "{answer}</s>" (Llama-2-chat).
- chatml: "<|im_start|>system\n...<|im_end|>\n<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n",
  "{answer}<|im_end|>\n" (SmolLM2-Instruct, Qwen).
- plain: "{msg}\n", "{answer}</s>" (LLaVA "plain" alignment format).
The "<image>" placeholder is removed from the text: visual tokens go right after BOS.
"""

from __future__ import annotations

from dataclasses import dataclass

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA2_SYSTEM = "You are a helpful language and vision assistant."
CHATML_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: str
    human_first: str  # format of the first human turn: {system}, {msg}
    human: str  # later human turns: {msg}
    gpt: str  # assistant turn: {msg}, {eos}
    eos: str = "</s>"
    # SentencePiece (Llama) tokenizers add a token for a trailing space, so the release rstrips every
    # turn before tokenizing (prismatic FinetuneDataset); ChatML turns end in a meaningful newline.
    strip_turns: bool = True

    def turn(self, index: int, message: str) -> str:
        """Text of turn `index` (even: human, odd: assistant)."""
        message = message.replace("<image>", "").strip()
        if index % 2 == 0:
            fmt = self.human_first if index == 0 else self.human
            return fmt.format(system=self.system, msg=message)
        return self.gpt.format(msg=message if message else " ", eos=self.eos)

    def tokenized_turn(self, index: int, message: str) -> str:
        """The text of a turn as it is tokenized (rstripped where the template says so)."""
        text = self.turn(index, message)
        return text.rstrip() if self.strip_turns else text

    def generation_prompt(self, message: str) -> str:
        """The text fed for generation: one human turn, ending where the answer starts."""
        return self.tokenized_turn(0, message)

    def turns(self, messages: list[str]) -> list[str]:
        return [self.turn(i, m) for i, m in enumerate(messages)]


TEMPLATES = {
    "vicuna_v15": PromptTemplate(
        "vicuna_v15",
        VICUNA_SYSTEM,
        "{system} USER: {msg} ASSISTANT: ",
        "USER: {msg} ASSISTANT: ",
        "{msg}{eos}",
    ),
    "llama2_chat": PromptTemplate(
        "llama2_chat",
        LLAMA2_SYSTEM,
        "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{msg} [/INST] ",
        "[INST] {msg} [/INST] ",
        " {msg} {eos}",
    ),
    "chatml": PromptTemplate(
        "chatml",
        CHATML_SYSTEM,
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n",
        "{msg}{eos}\n",
        eos="<|im_end|>",
        strip_turns=False,
    ),
    "plain": PromptTemplate("plain", "", "{msg}\n", "{msg}\n", "{msg}{eos}"),
}


def get_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise KeyError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
