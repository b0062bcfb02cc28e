"""Every built-in template: the exact text, token ids and labels, single and multi-turn; a property test."""

from __future__ import annotations

import re
from typing import Any

import pytest
from conftest import CHATML_TEMPLATE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.data import IGNORE_INDEX, encode, encode_prompt
from lorakit.errors import ConfigError
from lorakit.templates import TEMPLATES, ModelTemplate, get_template, template_from_dict

SINGLE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
]
MULTI = [
    *SINGLE[:2],
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "And?"},
    {"role": "assistant", "content": "world"},
]

# The expected rendering, written out by hand from each model family's published format. Trained text is
# between [[ and ]]; everything else carries no loss. The tiny tokenizer's BOS is <s>, EOS </s>.
EXPECTED: dict[str, tuple[str, str]] = {
    "alpaca": (
        "<s>Be brief.\n\nBelow is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nHi\n\n### Response:\n[[Hello there</s>]]",
        "<s>Be brief.\n\nBelow is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nHi\n\n### Response:\n[[hello</s>]]\n\n"
        "### Instruction:\nAnd?\n\n### Response:\n[[world</s>]]",
    ),
    "chatml": (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n[[Hello there<|im_end|>]]\n",
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n[[hello<|im_end|>]]\n<|im_start|>user\nAnd?<|im_end|>\n"
        "<|im_start|>assistant\n[[world<|im_end|>]]\n",
    ),
    "llama2": (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST][[ Hello there </s>]]",
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST][[ hello </s>]]<s>[INST] And? [/INST][[ world </s>]]",
    ),
    "llama3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n[[Hello there<|eot_id|>]]",
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n[[hello<|eot_id|>]]"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n[[world<|eot_id|>]]",
    ),
    "mistral": (
        "<s>[INST] Be brief.\n\nHi [/INST][[Hello there</s>]]",
        "<s>[INST] Be brief.\n\nHi [/INST][[hello</s>]][INST] And? [/INST][[world</s>]]",
    ),
    "zephyr": (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n[[Hello there</s>]]\n",
        "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n[[hello</s>]]\n"
        "<|user|>\nAnd?</s>\n<|assistant|>\n[[world</s>]]\n",
    ),
    "gemma": (
        "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        "[[Hello there<end_of_turn>]]\n",
        "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n[[hello<end_of_turn>]]\n"
        "<start_of_turn>user\nAnd?<end_of_turn>\n<start_of_turn>model\n[[world<end_of_turn>]]\n",
    ),
    "phi3": (
        "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n[[Hello there<|end|>]]\n",
        "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n[[hello<|end|>]]\n"
        "<|user|>\nAnd?<|end|>\n<|assistant|>\n[[world<|end|>]]\n",
    ),
    "vicuna": (
        "<s>Be brief. USER: Hi ASSISTANT:[[ Hello there</s>]]",
        "<s>Be brief. USER: Hi ASSISTANT:[[ hello</s>]]USER: And? ASSISTANT:[[ world</s>]]",
    ),
}
# A Llama-3-style Jinja chat template without {% generation %} markers: the spans are found by rendering.
LLAMA3_JINJA = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
EXPECTED["model"] = EXPECTED["chatml"]  # the tiny tokenizer's chat_template is ChatML
EXPECTED[CHATML_TEMPLATE] = EXPECTED["chatml"]  # a Jinja string is used like the tokenizer's own
EXPECTED[LLAMA3_JINJA] = EXPECTED["llama3"]
JINJA_IDS = {CHATML_TEMPLATE: "jinja-chatml", LLAMA3_JINJA: "jinja-llama3"}

# What each template trains for an assistant reply `c`: the reply and its end-of-turn text.
REPLY = {
    "alpaca": "{c}</s>",
    "chatml": "{c}<|im_end|>",
    "llama2": " {c} </s>",
    "llama3": "{c}<|eot_id|>",
    "mistral": "{c}</s>",
    "zephyr": "{c}</s>",
    "gemma": "{c}<end_of_turn>",
    "phi3": "{c}<|end|>",
    "vicuna": " {c}</s>",
    "model": "{c}<|im_end|>",
}
REPLY_ANY = {**REPLY, CHATML_TEMPLATE: REPLY["chatml"], LLAMA3_JINJA: REPLY["llama3"]}


def expected_encoding(tokenizer: Any, marked: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of a marked string, tokenized piece by piece like the encoder."""
    ids: list[int] = []
    labels: list[int] = []
    for index, piece in enumerate(re.split(r"\[\[(.*?)\]\]", marked, flags=re.DOTALL)):
        tokens = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        ids.extend(tokens)
        labels.extend(tokens if index % 2 else [IGNORE_INDEX] * len(tokens))
    return ids, labels


def test_every_registered_template_has_an_expected_rendering():
    assert set(TEMPLATES) == set(EXPECTED) - set(JINJA_IDS)
    assert set(TEMPLATES) == set(REPLY)


@pytest.mark.parametrize("name", list(EXPECTED), ids=lambda n: JINJA_IDS.get(n, n))
@pytest.mark.parametrize("turns", ["single", "multi"])
def test_exact_ids_and_labels(tiny_tokenizer, name, turns):
    messages, marked = (SINGLE, EXPECTED[name][0]) if turns == "single" else (MULTI, EXPECTED[name][1])
    row = encode(messages, get_template(name), tiny_tokenizer, max_length=1024)
    ids, labels = expected_encoding(tiny_tokenizer, marked)
    assert row.input_ids == ids
    assert row.labels == labels
    assert tiny_tokenizer.decode(row.input_ids) == marked.replace("[[", "").replace("]]", "")
    assert ids[:2] != [tiny_tokenizer.bos_token_id] * 2  # no double BOS


@pytest.mark.parametrize("name", list(EXPECTED), ids=lambda n: JINJA_IDS.get(n, n))
def test_generation_prompt_is_the_training_prompt(tiny_tokenizer, name):
    template = get_template(name)
    row = encode(MULTI, template, tiny_tokenizer, max_length=1024)
    prompt = encode_prompt(MULTI[:-1], template, tiny_tokenizer)
    last_reply_start = row.spans[-1][0]
    assert row.labels[last_reply_start - 1] == IGNORE_INDEX != row.labels[last_reply_start]
    assert prompt == row.input_ids[:last_reply_start]


@pytest.mark.parametrize("name", [n for n in REPLY if n != "alpaca"])
def test_stop_strings_are_the_end_of_turn(tiny_tokenizer, name):
    end = REPLY[name].format(c="").strip()
    assert end in get_template(name).stop_strings(tiny_tokenizer)


def test_jinja_string_template_round_trips_and_reports_errors(tiny_tokenizer):
    template = get_template(CHATML_TEMPLATE)
    assert isinstance(template, ModelTemplate) and template.chat_template == CHATML_TEMPLATE
    assert template_from_dict(template.to_dict()) == template
    assert template.stop_strings(tiny_tokenizer) == ["<|im_end|>", "</s>"]
    broken = get_template("{% for m in messages %}{{ m['content'] }{% endfor %}")
    with pytest.raises(ConfigError, match="chat_template failed to render"):
        broken.render(SINGLE, tokenizer=tiny_tokenizer)


# --- the property: trained tokens are exactly the assistant turns plus their end-of-turn -----------------

TEXT = (
    st.text(
        alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!'-:\n"),
        min_size=1,
        max_size=40,
    )
    .map(str.strip)
    .filter(bool)
)


@st.composite
def conversations(draw: Any) -> list[dict[str, str]]:
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        messages.append({"role": "assistant", "content": draw(TEXT)})
    return messages


def trained_runs(labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for index, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if index == 0 or labels[index - 1] == IGNORE_INDEX:
            runs.append([])
        runs[-1].append(label)
    return runs


@pytest.mark.parametrize("name", list(REPLY_ANY), ids=lambda n: JINJA_IDS.get(n, n))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_trained_tokens_are_exactly_the_replies_and_their_end_of_turn(tiny_tokenizer, name, messages):
    row = encode(messages, get_template(name), tiny_tokenizer, max_length=4096)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = [
        tiny_tokenizer(REPLY_ANY[name].format(c=reply), add_special_tokens=False)["input_ids"]
        for reply in replies
    ]
    assert trained_runs(row.labels) == expected
    assert row.n_trained_tokens == sum(map(len, expected))
    assert [ids for ids, label in zip(row.input_ids, row.labels, strict=True) if label != IGNORE_INDEX] == [
        token for run in expected for token in run
    ]
    # train_on_inputs labels everything, and the template's spans are still the replies.
    everything = encode(messages, get_template(name), tiny_tokenizer, max_length=4096, train_on_inputs=True)
    assert everything.labels == everything.input_ids
    assert len(everything.spans) == len(replies)
