"""Prompt templates: exact rendering, trained spans, registry, round-trips and the model's own template."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import attrs
import pytest

from lorakit.errors import ConfigError, DataError
from lorakit.templates import (
    TEMPLATES,
    AlpacaTemplate,
    ModelTemplate,
    PromptTemplate,
    Template,
    get_template,
    register_template,
    register_template_class,
    template_from_dict,
)

USER_ASSISTANT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"}]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *USER_ASSISTANT]
MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "And?"},
    {"role": "assistant", "content": "world"},
]


def render(
    name: str, messages: list[dict[str, Any]], tokenizer: Any, **kwargs: Any
) -> list[tuple[str, bool]]:
    return get_template(name).render(messages, tokenizer=tokenizer, **kwargs)


class WithChatTemplate:
    """The tiny tokenizer with another chat_template (the session fixture itself stays untouched)."""

    def __init__(self, tokenizer: Any, chat_template: str | None) -> None:
        self._tokenizer = tokenizer
        self.chat_template = chat_template

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, messages: Any, **kwargs: Any) -> Any:
        return self._tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)


# --- alpaca -----------------------------------------------------------------------------------------------


def test_alpaca_without_input_is_the_exact_alpaca_prompt(tiny_tokenizer):
    messages = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello world"}]
    assert render("alpaca", messages, tiny_tokenizer) == [
        (
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nSay hello.\n\n### Response:\n",
            False,
        ),
        ("hello world</s>", True),
    ]


def test_alpaca_with_input_uses_the_input_wording(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "Say hello.", "input": "the fox"},
        {"role": "assistant", "content": "hello world"},
    ]
    assert render("alpaca", messages, tiny_tokenizer) == [
        (
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
            "Say hello.\n\n### Input:\nthe fox\n\n### Response:\n",
            False,
        ),
        ("hello world</s>", True),
    ]


def test_alpaca_system_and_multi_turn(tiny_tokenizer):
    preamble = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    )
    assert render("alpaca", MULTI_TURN, tiny_tokenizer) == [
        (f"Be brief.\n\n{preamble}\n\n### Instruction:\nHi\n\n### Response:\n", False),
        ("hello</s>", True),
        ("\n\n### Instruction:\nAnd?\n\n### Response:\n", False),
        ("world</s>", True),
    ]


def test_alpaca_generation_prompt_ends_with_the_response_header(tiny_tokenizer):
    segments = render("alpaca", USER_ASSISTANT[:1], tiny_tokenizer, add_generation_prompt=True)
    assert segments[-1][0].endswith("### Instruction:\nHi\n\n### Response:\n")
    assert not any(trained for _, trained in segments)
    assert get_template("alpaca").stop_strings(tiny_tokenizer) == ["</s>", "### Instruction:"]


# --- chatml / llama2 --------------------------------------------------------------------------------------


def test_chatml_rendering_trains_reply_and_im_end_but_not_the_newline(tiny_tokenizer):
    assert render("chatml", MULTI_TURN, tiny_tokenizer) == [
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("hello<|im_end|>", True),
        ("\n<|im_start|>user\nAnd?<|im_end|>\n<|im_start|>assistant\n", False),
        ("world<|im_end|>", True),
        ("\n", False),
    ]
    assert render("chatml", USER_ASSISTANT[:1], tiny_tokenizer, add_generation_prompt=True) == [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False)
    ]
    assert get_template("chatml").stop_strings(tiny_tokenizer) == ["<|im_end|>"]


def test_llama2_rendering(tiny_tokenizer):
    assert render("llama2", MULTI_TURN, tiny_tokenizer) == [
        ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]", False),
        (" hello </s>", True),
        ("<s>[INST] And? [/INST]", False),
        (" world </s>", True),
    ]
    assert render("llama2", USER_ASSISTANT[:1], tiny_tokenizer, add_generation_prompt=True) == [
        ("<s>[INST] Hi [/INST]", False)
    ]
    assert get_template("llama2").stop_strings(tiny_tokenizer) == ["</s>"]


def test_non_alpaca_templates_append_the_input_to_the_content(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "Translate.", "input": "bonjour"},
        {"role": "assistant", "content": "hi"},
    ]
    assert render("chatml", messages, tiny_tokenizer)[0][0] == (
        "<|im_start|>user\nTranslate.\n\nbonjour<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_rejects_bad_conversations(tiny_tokenizer):
    with pytest.raises(DataError, match="ends with a user turn, but the last message is a assistant"):
        render("chatml", USER_ASSISTANT, tiny_tokenizer, add_generation_prompt=True)
    with pytest.raises(DataError, match="Message 0 has role 'tool'; use one of system, user, assistant"):
        render("alpaca", [{"role": "tool", "content": "x"}], tiny_tokenizer)


# --- user-defined templates -------------------------------------------------------------------------------

ZEPHYR = Template(
    "zephyr",
    system="<|system|>\n{content}{eos}\n",
    user="<|user|>\n{content}{eos}\n",
    generation_prompt="<|assistant|>\n",
    assistant="{content}{eos}",
    after_assistant="\n",
)


def test_user_defined_template_renders_with_placeholders(tiny_tokenizer):
    assert ZEPHYR.render(WITH_SYSTEM, tokenizer=tiny_tokenizer) == [
        ("<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n", False),
        ("hello</s>", True),
        ("\n", False),
    ]
    assert ZEPHYR.stop_strings(tiny_tokenizer) == ["</s>"]
    assert isinstance(ZEPHYR, PromptTemplate)


def test_placeholders_inside_content_are_left_alone(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "print {eos} and {x}"},
        {"role": "assistant", "content": "{content}"},
    ]
    assert render("chatml", messages, tiny_tokenizer)[:2] == [
        ("<|im_start|>user\nprint {eos} and {x}<|im_end|>\n<|im_start|>assistant\n", False),
        ("{content}<|im_end|>", True),
    ]


def test_template_user_with_input_and_begin(tiny_tokenizer):
    template = Template(
        "qa",
        begin="{bos}",
        user="Q: {content}\n",
        user_with_input="Q: {content}\nContext: {input}\n",
        generation_prompt="A: ",
        assistant="{content}{eos}",
        after_assistant="\n",
    )
    messages = [
        {"role": "user", "content": "Who?", "input": "the fox"},
        {"role": "assistant", "content": "fox"},
    ]
    assert template.render(messages, tokenizer=tiny_tokenizer) == [
        ("<s>Q: Who?\nContext: the fox\nA: ", False),
        ("fox</s>", True),
        ("\n", False),
    ]


def test_template_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"`user` uses unknown placeholder\(s\) \{text\}"):
        Template("bad", user="{text}")
    with pytest.raises(ConfigError, match=r"`assistant` must contain \{content\}"):
        Template("bad", assistant="{eos}")
    with pytest.raises(ConfigError, match="`name` must be a non-empty string"):
        Template("")
    with pytest.raises(ConfigError, match=r"`stop` uses unknown placeholder\(s\) \{end\}"):
        Template("bad", stop=["{end}"])


# --- registry and round-trips -----------------------------------------------------------------------------


def test_get_template_unknown_lists_known_names():
    with pytest.raises(
        ConfigError,
        match="Unknown template 'vicuna2'. Known templates: alpaca, chatml, gemma, llama2, llama3, mistral, "
        "model, phi3, vicuna, zephyr",
    ):
        get_template("vicuna2")
    with pytest.raises(ConfigError, match="`template` must be a name .* got int"):
        get_template(3)


def test_register_template_rejects_duplicates_and_non_templates(monkeypatch):
    monkeypatch.setattr("lorakit.templates.TEMPLATES", dict(TEMPLATES))
    with pytest.raises(
        ConfigError, match="A template named 'chatml' is already registered; pick another name"
    ):
        register_template("chatml", ZEPHYR)
    with pytest.raises(ConfigError, match="needs an object with name, render"):
        register_template("nothing", object())
    with pytest.raises(ConfigError, match="A template named 'zephyr' is already registered"):
        register_template("zephyr", ZEPHYR)
    register_template("my-zephyr", ZEPHYR)
    assert get_template("my-zephyr") is ZEPHYR
    assert template_from_dict({"name": "my-zephyr"}) is ZEPHYR


@register_template_class
@attrs.frozen
class ShoutTemplate:
    """A template that is not a lorakit class: it only satisfies the protocol."""

    name: str = "shout"
    suffix: str = "!"

    def render(self, messages: Any, *, tokenizer: Any, add_generation_prompt: bool = False) -> list:
        segments = []
        for message in messages:
            if message["role"] == "assistant":
                segments += [
                    ("> ", False),
                    (message["content"].upper() + self.suffix + tokenizer.eos_token, True),
                ]
            else:
                segments.append((message["content"] + "\n", False))
        return segments + ([("> ", False)] if add_generation_prompt else [])

    def stop_strings(self, tokenizer: Any) -> list[str]:
        return [tokenizer.eos_token]

    def to_dict(self) -> dict[str, Any]:
        return {"class": f"{__name__}:ShoutTemplate", "name": self.name, "suffix": self.suffix}


@pytest.mark.parametrize(
    "template",
    [
        get_template("alpaca"),
        get_template("chatml"),
        get_template("llama2"),
        get_template("model"),
        ZEPHYR,
        ShoutTemplate(suffix="?!"),
    ],
    ids=lambda t: t.name,
)
def test_to_dict_round_trips_through_json(template):
    data = json.loads(json.dumps(template.to_dict()))
    rebuilt = template_from_dict(data)
    assert rebuilt == template
    assert type(rebuilt) is type(template)
    assert get_template(data) == template


def test_builtins_have_the_expected_types():
    assert isinstance(get_template("alpaca"), AlpacaTemplate)
    assert isinstance(get_template("model"), ModelTemplate)
    assert get_template("chatml").to_dict()["kind"] == "format"
    assert get_template(ZEPHYR) is ZEPHYR
    shout = ShoutTemplate()
    assert get_template(shout) is shout


def test_template_from_dict_errors():
    with pytest.raises(ConfigError, match="Cannot rebuild a template from .*'nope'.* call register_template"):
        template_from_dict({"name": "nope"})
    with pytest.raises(ConfigError, match="'no_such_module:X' is not a registered template class"):
        template_from_dict({"class": "no_such_module:X"})
    with pytest.raises(ConfigError, match="Cannot import template class 'no_such_module:X'"):
        template_from_dict({"class": "no_such_module:X"}, trust_template_classes=True)
    with pytest.raises(ConfigError, match="must look like 'package.module:ClassName'"):
        template_from_dict({"class": "ShoutTemplate"})
    with pytest.raises(ConfigError, match="Unknown Template field"):
        template_from_dict({"kind": "format", "name": "x", "colour": "red"})


# --- template="model" -------------------------------------------------------------------------------------


def test_model_template_matches_chatml_on_a_chatml_chat_template(tiny_tokenizer):
    for messages in (USER_ASSISTANT, WITH_SYSTEM, MULTI_TURN):
        assert render("model", messages, tiny_tokenizer) == render("chatml", messages, tiny_tokenizer)
        prompt = messages[:-1]
        assert render("model", prompt, tiny_tokenizer, add_generation_prompt=True) == render(
            "chatml", prompt, tiny_tokenizer, add_generation_prompt=True
        )
    assert get_template("model").stop_strings(tiny_tokenizer) == ["<|im_end|>", "</s>"]


def test_model_template_needs_a_chat_template():
    tokenizer = SimpleNamespace(chat_template=None, bos_token="<s>", eos_token="</s>", name_or_path="tiny")
    with pytest.raises(
        ConfigError, match="template='model' needs a tokenizer with a chat_template.*'chatml'"
    ):
        render("model", USER_ASSISTANT, tokenizer)


def test_model_template_rejects_non_incremental_chat_templates(tiny_tokenizer):
    counting = (
        "{{ messages|length }} messages\n"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ConfigError, match="does not render conversations incrementally"):
        render("model", USER_ASSISTANT, WithChatTemplate(tiny_tokenizer, counting))


def test_model_template_without_end_marker_trains_eos(tiny_tokenizer):
    plain = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tokenizer = WithChatTemplate(tiny_tokenizer, plain)
    assert render("model", USER_ASSISTANT, tokenizer) == [
        ("user: Hi\nassistant: ", False),
        ("hello</s>", True),
        ("\n", False),
    ]
    assert get_template("model").stop_strings(tokenizer) == ["</s>"]


def test_model_template_wraps_chat_template_errors(tiny_tokenizer):
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ConfigError, match="chat_template failed to render 2 message\\(s\\): no system"):
        render("model", WITH_SYSTEM, WithChatTemplate(tiny_tokenizer, strict))


# --- import cost ------------------------------------------------------------------------------------------


def test_importing_templates_and_data_stays_light():
    code = (
        "import sys, lorakit.templates, lorakit.data\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
