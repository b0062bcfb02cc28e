"""The built-in templates: alpaca, chatml, llama2, llama3, mistral, zephyr, gemma, phi3, vicuna."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from lorakit.templates.base import Message, Segment, check_messages, merge_segments
from lorakit.templates.format import Template

__all__ = [
    "ALPACA",
    "CHATML",
    "GEMMA",
    "LLAMA2",
    "LLAMA3",
    "MISTRAL",
    "PHI3",
    "VICUNA",
    "ZEPHYR",
    "AlpacaTemplate",
]

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@attrs.frozen
class AlpacaTemplate:
    """The Stanford Alpaca prompt, word for word, with the response and EOS trained.

    The preamble names the input when the first user turn has one. A system message comes first as its own
    paragraph; further user/assistant pairs follow as more ``### Instruction:`` / ``### Response:`` blocks.
    """

    name: str = "alpaca"
    """Shown in plans and saved with the run."""

    def render(
        self, messages: Sequence[Message], *, tokenizer: Any, add_generation_prompt: bool = False
    ) -> list[Segment]:
        """See :meth:`lorakit.templates.PromptTemplate.render`."""
        check_messages(messages, add_generation_prompt=add_generation_prompt)
        eos = tokenizer.eos_token or ""
        segments: list[Segment] = []
        systems = [m["content"] for m in messages if m["role"] == "system"]
        if systems:
            segments.append(("".join(f"{s}\n\n" for s in systems), False))
        first_user = next((m for m in messages if m["role"] == "user"), None)
        has_input = bool(first_user is not None and first_user.get("input"))
        segments.append(((PREAMBLE_WITH_INPUT if has_input else PREAMBLE) + "\n\n", False))
        turns = [m for m in messages if m["role"] != "system"]
        for index, message in enumerate(turns):
            if message["role"] == "user":
                text = f"### Instruction:\n{message['content']}\n\n"
                if message.get("input"):
                    text += f"### Input:\n{message['input']}\n\n"
                segments.append((text, False))
            else:
                segments.append(("### Response:\n", False))
                segments.append((message["content"] + eos, True))
                if index + 1 < len(turns):
                    segments.append(("\n\n", False))
        if add_generation_prompt:
            segments.append(("### Response:\n", False))
        return merge_segments(segments)

    def stop_strings(self, tokenizer: Any) -> list[str]:
        """EOS, and the start of a new instruction block (which a reply never contains)."""
        return [s for s in (tokenizer.eos_token, "### Instruction:") if s]

    def to_dict(self) -> dict[str, Any]:
        """``{"name": "alpaca"}``: the registered built-in."""
        return {"name": self.name}


ALPACA = AlpacaTemplate()

CHATML = Template(
    "chatml",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    generation_prompt="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    after_assistant="\n",
    stop=("<|im_end|>",),
)
"""ChatML (Qwen, SmolLM2, Hermes): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message."""

LLAMA2 = Template(
    "llama2",
    system="<<SYS>>\n{content}\n<</SYS>>\n\n",
    system_in_first_user=True,
    user="{bos}[INST] {content} [/INST]",
    generation_prompt="",
    assistant=" {content} {eos}",
    stop=("{eos}",),
)
"""Llama 2 chat: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {reply} </s>`` per turn.

The trained part is `` {reply} </s>`` (space included), so generation continues right after ``[/INST]``.
"""

LLAMA3 = Template(
    "llama3",
    begin="{bos}",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant="{content}<|eot_id|>",
    stop=("<|eot_id|>", "{eos}"),
)
"""Llama 3 / 3.1 / 3.2 instruct: ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``."""

MISTRAL = Template(
    "mistral",
    begin="{bos}",
    system="{content}\n\n",
    system_in_first_user=True,
    user="[INST] {content} [/INST]",
    assistant="{content}{eos}",
    stop=("{eos}",),
)
"""Mistral / Mixtral instruct (v0.1 form): ``<s>[INST] {user} [/INST]{reply}</s>``; a system message is put
in front of the first user message, as Mistral's own chat template does."""

ZEPHYR = Template(
    "zephyr",
    system="<|system|>\n{content}{eos}\n",
    user="<|user|>\n{content}{eos}\n",
    generation_prompt="<|assistant|>\n",
    assistant="{content}{eos}",
    after_assistant="\n",
    stop=("{eos}",),
)
"""Zephyr: ``<|user|>\\n{content}</s>\\n<|assistant|>\\n{reply}</s>\\n``."""

GEMMA = Template(
    "gemma",
    begin="{bos}",
    system="{content}\n\n",
    system_in_first_user=True,
    user="<start_of_turn>user\n{content}<end_of_turn>\n",
    generation_prompt="<start_of_turn>model\n",
    assistant="{content}<end_of_turn>",
    after_assistant="\n",
    stop=("<end_of_turn>", "{eos}"),
)
"""Gemma / Gemma 2: ``<start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n{reply}<end_of_turn>\\n``;
Gemma has no system role, so a system message opens the first user turn."""

PHI3 = Template(
    "phi3",
    system="<|system|>\n{content}<|end|>\n",
    user="<|user|>\n{content}<|end|>\n",
    generation_prompt="<|assistant|>\n",
    assistant="{content}<|end|>",
    after_assistant="\n",
    stop=("<|end|>", "{eos}"),
)
"""Phi-3 / Phi-3.5: ``<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{reply}<|end|>\\n``."""

VICUNA = Template(
    "vicuna",
    system="{content} ",
    user="USER: {content} ",
    generation_prompt="ASSISTANT:",
    assistant=" {content}{eos}",
    stop=("{eos}", "USER:"),
)
"""Vicuna v1.1: ``{system} USER: {user} ASSISTANT: {reply}</s>USER: ...``. Vicuna's usual system prompt ("A
chat between a curious user and an artificial intelligence assistant. ...") is not added for you: put it in a
system message if you want it."""
