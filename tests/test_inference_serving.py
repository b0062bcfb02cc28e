"""InferenceModel for services: render equality, batching, streaming, chat, several adapters, merge checks,
export with the training chat template, and provenance."""

from __future__ import annotations

import json
import threading
import warnings

import pytest
import torch

import lorakit as lk
from lorakit.data import IGNORE_INDEX, encode
from lorakit.errors import ConfigError
from lorakit.generation import Sampling, StopCutter, cut_at_stops
from lorakit.inference import InferenceModel
from lorakit.templates import TEMPLATES, get_template
from lorakit.templates.jinja import to_chat_template

ROWS_A = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Say hello.", "input": "", "output": "hello world"},
    {"instruction": "Route this ticket.", "input": "I was charged twice.", "output": "billing"},
    {"instruction": "Route this ticket.", "input": "My parcel never came.", "output": "shipping"},
    {"instruction": "Count to three.", "input": "", "output": "0 1 2"},
    {"instruction": "Name a colour.", "input": "", "output": "brown"},
    {"instruction": "How are you?", "input": "", "output": "I am fine, thank you."},
    {"instruction": "Name an animal.", "input": "", "output": "the lazy dog"},
]
# The same questions with other answers, trained with another template: adapter "b".
ROWS_B = [
    {**row, "output": answer}
    for row, answer in zip(
        ROWS_A,
        ["brown", "the quick fox", "shipping", "billing", "Paris.", "0 1 2", "hello", "fine"],
        strict=True,
    )
]


def _train(model_dir, rows, template, out, steps=30):
    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=8, alpha=16, dropout=0.0)
        .with_dataset(rows, template=template, val_split=0.0, max_length=128)
        .with_training(
            max_steps=steps, lr=5e-3, batch_size=4, logging_steps=10, warmup_ratio=0.0, scheduler="constant"
        )
        .train(out)
    ).output_dir


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    return {
        "a": _train(tiny_model_dir, ROWS_A, "alpaca", root / "a"),
        "b": _train(tiny_model_dir, ROWS_B, "chatml", root / "b"),
    }


@pytest.fixture(scope="module")
def model_a(runs):
    return InferenceModel.load(runs["a"])


# --- the inference render is the training render's prompt, token for token --------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello world"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Route this ticket.", "input": "I was charged twice."},
        {"role": "assistant", "content": "billing"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "0 1 2"},
    ],
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_inference_prompt_equals_training_prompt_tokens(name, tiny_tokenizer):
    template = get_template(name)
    model = InferenceModel(None, tiny_tokenizer, template)
    for conversation in CONVERSATIONS:
        trained = encode(conversation, template, tiny_tokenizer, max_length=1024)
        prompt = model.encode(conversation[:-1])
        assert prompt == trained.input_ids[: len(prompt)]
        # The last trained span (the final reply) starts right where the inference prompt ends.
        assert trained.spans[-1][0] == len(prompt)
        assert trained.labels[len(prompt) - 1] == IGNORE_INDEX and trained.labels[len(prompt)] != IGNORE_INDEX
    # The alpaca-row and plain-string forms render the same prompt as the equivalent conversation.
    row = {"instruction": "Say hello.", "input": "", "output": "hello world"}
    trained = encode(CONVERSATIONS[0], template, tiny_tokenizer, max_length=1024)
    assert model.encode(row) == model.encode("Say hello.") == trained.input_ids[: len(model.encode(row))]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_exported_chat_template_renders_the_training_prompt(name, tiny_tokenizer):
    template = get_template(name)
    jinja = to_chat_template(template, tiny_tokenizer)
    for conversation in CONVERSATIONS:
        if name == "model" and any(m.get("input") for m in conversation):
            continue
        prompt_messages = conversation[:-1]
        expected = InferenceModel(None, tiny_tokenizer, template).encode(prompt_messages)
        ids = tiny_tokenizer.apply_chat_template(
            prompt_messages, add_generation_prompt=True, chat_template=jinja, tokenize=True, return_dict=False
        )
        assert list(ids) == expected


# --- sampling options and stop strings ------------------------------------------------------------------


def test_sampling_options_are_validated():
    with pytest.raises(ConfigError, match=r"`top_p` must be a number > 0 and <= 1, got 1.5"):
        Sampling(top_p=1.5)
    with pytest.raises(ConfigError, match=r"`temperature` must be a number >= 0, got -1"):
        Sampling(temperature=-1)
    with pytest.raises(ConfigError, match=r"`top_k` must be a non-negative integer, got 2.5"):
        Sampling(top_k=2.5)
    with pytest.raises(ConfigError, match=r"`max_new_tokens` must be positive, got 0"):
        Sampling(max_new_tokens=0)
    with pytest.raises(ConfigError, match=r"`stop` must be a non-empty string"):
        Sampling(stop=[""])
    assert Sampling().generate_kwargs() == {
        "max_new_tokens": 256,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    assert Sampling(temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.1).generate_kwargs() == {
        "max_new_tokens": 256,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "repetition_penalty": 1.1,
    }


@pytest.mark.parametrize(
    "chunks",
    [
        ["  hel", "lo wor", "ld <|im", "_end|> junk"],
        ["hello", " ", "world", "\n", "<", "|im_end|>"],
        ["hello world"],
        ["hello world  ", " "],
        ["<|im_end|>"],
        ["hello <", "b>", " world"],  # a false start of a stop string is released
    ],
)
def test_stop_cutter_equals_cutting_the_whole_text(chunks):
    stops = ["<|im_end|>", "</s>"]
    assert "".join(StopCutter(stops).cut(chunks)) == cut_at_stops("".join(chunks), stops)


# --- generation -----------------------------------------------------------------------------------------


def test_batched_generation_equals_one_by_one(model_a):
    prompts = [row["instruction"] for row in ROWS_A] + [
        {"instruction": "Route this ticket.", "input": "My parcel never came."}
    ]
    one_by_one = [model_a.generate(p, max_new_tokens=10) for p in prompts]
    assert model_a.generate(prompts, max_new_tokens=10) == one_by_one
    assert one_by_one[1] == "hello world" and one_by_one[-1] == "shipping"


def test_stream_yields_chunks_that_join_to_generate(model_a):
    chunks = list(model_a.stream("How are you?", max_new_tokens=16))
    assert "".join(chunks) == model_a.generate("How are you?", max_new_tokens=16) == "I am fine, thank you."
    assert len(chunks) > 1  # word by word, not one final string
    # Leaving early stops the background generation and frees the lock for the next call.
    stream = model_a.stream("How are you?", max_new_tokens=200)
    next(stream)
    stream.close()
    assert model_a.generate("Say hello.", max_new_tokens=8) == "hello world"


def test_stop_strings_and_sampling_options(model_a):
    assert model_a.generate("How are you?", max_new_tokens=16, stop=",") == "I am fine"
    assert "".join(model_a.stream("How are you?", max_new_tokens=16, stop=[","])) == "I am fine"
    first = model_a.generate("Name a colour.", max_new_tokens=8, temperature=1.5, top_k=50, seed=3)
    again = model_a.generate("Name a colour.", max_new_tokens=8, temperature=1.5, top_k=50, seed=3)
    assert first == again  # seeded sampling is reproducible
    with pytest.raises(ConfigError, match="top_p"):
        model_a.generate("Say hello.", top_p=0)


def test_chat_renders_messages_with_the_run_template(model_a):
    messages = [{"role": "user", "content": "Say hello."}]
    assert model_a.chat(messages, max_new_tokens=8) == "hello world"
    assert "".join(model_a.chat(messages, max_new_tokens=8, stream=True)) == "hello world"
    with pytest.raises(
        ConfigError, match="chat\\(\\): add_generation_prompt=True needs a conversation that ends"
    ):
        model_a.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    with pytest.raises(ConfigError, match="chat\\(\\) takes a list of messages"):
        model_a.chat("Say hello.")


# --- several adapters on one base -----------------------------------------------------------------------


def test_several_adapters_concurrently(runs, tiny_model_dir):
    model = InferenceModel.load(runs["a"])
    assert model.load_adapter(runs["b"], name="b") == "b"
    assert model.adapters == ["default", "b"]
    assert model.template_for("b").name == "chatml" and model.template_for().name == "alpaca"
    prompts = ["Say hello.", "Name a colour.", "What is the capital of France?"]
    expected = {
        "default": ["hello world", "brown", "Paris."],
        "b": ["the quick fox", "0 1 2", "brown"],
    }
    for name, answers in expected.items():
        assert model.generate(prompts, max_new_tokens=10, adapter=name) == answers
    results: dict[tuple[str, int], list[str]] = {}
    errors: list[BaseException] = []

    def worker(name: str, index: int) -> None:
        try:
            for _ in range(3):
                out = (
                    "".join(model.stream(prompts[index], max_new_tokens=10, adapter=name))
                    if index == 0
                    else model.generate(prompts[index], max_new_tokens=10, adapter=name)
                )
                results.setdefault((name, index), []).append(out)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n, i)) for n in expected for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for (name, index), outs in results.items():
        assert outs == [expected[name][index]] * 3, (name, index)
    assert len(results) == 6

    with pytest.raises(ConfigError, match=r"adapter='c' is not loaded \(loaded adapters: 'default', 'b'\)"):
        model.generate("Say hello.", adapter="c")
    with pytest.raises(ConfigError, match="the name is empty or taken"):
        model.load_adapter(runs["b"], name="b")
    model.unload("b")
    assert model.adapters == ["default"]
    assert model.generate("Say hello.", max_new_tokens=8) == "hello world"
    model.unload()
    assert model.is_merged and model.adapters == []
    base = InferenceModel.from_model(tiny_model_dir, template="alpaca")
    ids = torch.tensor([model.encode("Say hello.")])
    with torch.no_grad():
        torch.testing.assert_close(model.model(input_ids=ids).logits, base.model(input_ids=ids).logits)


# --- merge, verify, export ------------------------------------------------------------------------------


def test_merge_verify_reports_equal_logits_and_perplexity(runs, model_a):
    merged = model_a.merge(verify=True)
    report = merged.merge_report
    assert report is not None and model_a.merge_report is None
    assert report.reference == "adapter on the base" and report.merged_dtype == "float32"
    assert report.n_sequences == 4  # the run's first four training rows
    assert report.n_tokens == sum(
        sum(label != IGNORE_INDEX for label in encode(m, get_template("alpaca"), model_a.tokenizer, max_length=128).labels)
        for m in (
            [{"role": "user", "content": r["instruction"], **({"input": r["input"]} if r["input"] else {})},
             {"role": "assistant", "content": r["output"]}]
            for r in ROWS_A[:4]
        )
    )  # fmt: skip
    assert 0 <= report.max_logit_diff < 1e-4
    assert report.perplexity_adapter < 1.5  # the adapter learned these rows
    assert abs(report.perplexity_change) < 1e-5
    # The numbers are the real ones: recompute the perplexity of the merged model by hand.
    nll, count = 0.0, 0
    for row in ROWS_A[:4]:
        messages = [
            {
                "role": "user",
                "content": row["instruction"],
                **({"input": row["input"]} if row["input"] else {}),
            },
            {"role": "assistant", "content": row["output"]},
        ]
        enc = encode(messages, get_template("alpaca"), merged.tokenizer, max_length=128)
        with torch.no_grad():
            logits = merged.model(input_ids=torch.tensor([enc.input_ids])).logits[0]
        labels = torch.tensor(enc.labels[1:])
        nll += float(
            torch.nn.functional.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum")
        )
        count += int((labels != -100).sum())
    assert report.perplexity_merged == pytest.approx(float(torch.exp(torch.tensor(nll / count))), rel=1e-5)


def test_merge_verify_warns_when_quality_changes(runs):
    model = InferenceModel.load(runs["a"])
    # Damage the reference on purpose: scale one adapter matrix after loading, so "merged" (reloaded from disk)
    # differs from the adapter model in memory; the check must notice and warn.
    layer = model.model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_B["default"].weight.data.mul_(40)
    with pytest.warns(UserWarning, match=r"perplexity differs by .*more than tolerance=0.01"):
        report = model.merge(
            verify=True, verify_prompts=["Say hello.", {"instruction": "Name a colour.", "output": "brown"}]
        ).merge_report
    assert report.n_sequences == 2 and report.max_logit_diff > 0.1


def test_inplace_merge_reuses_the_weights(runs):
    model = InferenceModel.load(runs["a"])
    expected = model.generate("Name an animal.", max_new_tokens=12)
    base_weight = model.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    merged = model.merge(inplace=True, verify=True)
    assert merged is model and model.is_merged and model.adapters == []
    assert merged.model.model.layers[0].self_attn.q_proj.weight.data_ptr() == base_weight.data_ptr()
    assert merged.merge_report.max_logit_diff < 1e-4
    assert merged.generate("Name an animal.", max_new_tokens=12) == expected == "the lazy dog"


def test_merged_export_loads_in_plain_transformers(runs, model_a, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = model_a.merge().save(tmp_path / "merged", max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Route this ticket.\n\nMy parcel never came."}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    row = {"instruction": "Route this ticket.", "input": "My parcel never came."}
    assert list(ids) != model_a.encode(row)  # an alpaca input field is its own section ...
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Route this ticket.", "input": "My parcel never came."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert list(ids) == model_a.encode(row)  # ... which the exported template renders too
    ids = list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_dict=False
        )
    )
    assert ids == model_a.encode("Say hello.")
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=torch.tensor([ids])).logits,
            model_a.model(input_ids=torch.tensor([ids])).logits,
            atol=1e-4,
            rtol=1e-4,
        )
        generated = plain.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert (
        tokenizer.decode(generated[0, len(ids) :], skip_special_tokens=True) == "hello world"
    )  # stops at EOS
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id


def test_save_refuses_unexportable_templates(model_a, tmp_path):
    from lorakit.templates import Template

    class Odd:
        name = "odd"

        def render(self, messages, *, tokenizer, add_generation_prompt=False):
            return [("x", False)]

        def stop_strings(self, tokenizer):
            return []

        def to_dict(self):
            return {"class": "nowhere:Odd"}

    plain = InferenceModel(model_a.model, model_a.tokenizer, Odd())
    with pytest.raises(ConfigError, match=r"Cannot write template 'odd' \(Odd\) as a Jinja chat template"):
        plain.save(tmp_path / "x")
    assert to_chat_template(Template("t", user="U:{content}\n", generation_prompt="A:"), model_a.tokenizer)


# --- provenance ----------------------------------------------------------------------------------------


def test_adapter_records_its_base_and_refuses_another(runs, tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoConfig, LlamaForCausalLM

    record = json.loads((runs["a"] / "lorakit_provenance.json").read_text())
    assert record["base_model"] == tiny_model_dir and len(record["config_fingerprint"]) == 16
    # Same shapes, other configuration (rope_theta): PEFT would load it silently, lorakit refuses.
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.rope_theta = 500000.0
    other = tmp_path / "other-base"
    LlamaForCausalLM(config).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    with pytest.raises(
        ConfigError,
        match=r"trained on .*tiny-llama.* but the base model given is .*other-base.*allow_base_mismatch=True",
    ):
        InferenceModel.load(runs["a"], base=str(other))
    with pytest.warns(UserWarning, match="Loading it anyway"):
        InferenceModel.load(runs["a"], base=str(other), allow_base_mismatch=True)
    base_model = InferenceModel.from_model(str(other), template="alpaca")
    with pytest.raises(ConfigError, match="allow_base_mismatch=True"):
        base_model.load_adapter(runs["a"], name="a")
    # A copy of the right base under another path is fine.
    copy = tmp_path / "copy"
    AutoConfig.from_pretrained(tiny_model_dir).save_pretrained(copy)
    LlamaForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(copy)
    tiny_tokenizer.save_pretrained(copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert (
            InferenceModel.load(runs["a"], base=str(copy)).generate("Say hello.", max_new_tokens=8)
            == "hello world"
        )


def test_qlora_merge_verify_reloads_unquantized_and_reports_the_gap(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=8, alpha=16, dropout=0.0)
        .quantize_4bit()
        .with_dataset(ROWS_A, template="alpaca", val_split=0.0, max_length=128)
        .with_training(max_steps=3, lr=5e-3, batch_size=4, warmup_ratio=0.0)
        .train(tmp_path / "q")
    ).output_dir
    model = InferenceModel.load(run)
    assert any("Linear4bit" in type(m).__name__ for m in model.model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the 4-bit gap may exceed the 1% perplexity tolerance
        merged = model.merge(verify=True, inplace=True)
    assert merged is model and not any("Linear4bit" in type(m).__name__ for m in merged.model.modules())
    assert all(p.dtype == torch.float32 for p in merged.model.parameters())
    report = merged.merge_report
    assert report.reference == "adapter on the 4-bit base" and report.merged_dtype == "float32"
    # The quantization gap is reported, not hidden: recompute it on the same four training rows.
    quantized = InferenceModel.load(run)
    gap = 0.0
    for row in ROWS_A[:4]:
        user = {
            "role": "user",
            "content": row["instruction"],
            **({"input": row["input"]} if row["input"] else {}),
        }
        ids = encode(
            [user, {"role": "assistant", "content": row["output"]}],
            get_template("alpaca"),
            merged.tokenizer,
            max_length=128,
        ).input_ids
        with torch.no_grad():
            a = quantized.model(input_ids=torch.tensor([ids])).logits
            b = merged.model(input_ids=torch.tensor([ids])).logits
        gap = max(gap, float((a - b).abs().max()))
    assert report.n_sequences == 4 and report.max_logit_diff == pytest.approx(gap, rel=1e-4) and gap > 0.01
    # The merged weights are the adapter on the full-precision base, not on the 4-bit one.
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run).eval()
    ids = torch.tensor([merged.encode("Say hello.")])
    with torch.no_grad():
        torch.testing.assert_close(
            merged.model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )
