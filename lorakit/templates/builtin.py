"""The built-in templates: alpaca, chatml, llama2."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from lorakit.templates.base import Message, Segment, check_messages, merge_segments
from lorakit.templates.format import Template

__all__ = ["ALPACA", "CHATML", "LLAMA2", "AlpacaTemplate"]

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
