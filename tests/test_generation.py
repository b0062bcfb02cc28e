"""The one generation loop and the one loss: randomness owned, not shared; save() leaves the model alone."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit.config import EvalSpec, SampleSpec
from lorakit.data import IGNORE_INDEX, encode
from lorakit.evaluation import (
    GenerationSet,
    TrainingEvaluator,
    evaluate_rows,
    normalize_answer,
    sample_callback,
)
from lorakit.generation import Decoding, Sampling, stop_token_ids
from lorakit.inference import InferenceModel
from lorakit.merging import _run_rows
from lorakit.metrics.loss import mean_token_nll, token_nll

ROWS = [
    {"instruction": "Say hello.", "input": "", "output": "hello world"},
    {"instruction": "Name a colour.", "input": "", "output": "brown"},
]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return InferenceModel.from_model(tiny_model_dir, template="chatml")


def _global_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def _assert_same(before, after):
    assert before[0] == after[0]
    assert np.array_equal(before[1], after[1])
    assert torch.equal(before[2], after[2])


def test_decoding_collects_stop_tokens_and_sampling_options(base):
    tokenizer = base.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tokenizer, ["<|im_end|>", "hello world"]) == [tokenizer.eos_token_id, im_end]
    decoding = Decoding.build(
        tokenizer, ["<|im_end|>"], Sampling(5, 0.7, top_k=3, seed=9, stop=","), {"num_beams": 1}
    )
    assert decoding.stops == ("<|im_end|>", ",") and decoding.seed == 9
    assert decoding.eos_ids == (tokenizer.eos_token_id, im_end, tokenizer.convert_tokens_to_ids(","))
    assert decoding.kwargs == {
        "max_new_tokens": 5,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": None,
        "top_k": 3,
        "eos_token_id": list(decoding.eos_ids),
        "pad_token_id": tokenizer.pad_token_id,
        "num_beams": 1,
    }


def test_sampling_never_touches_the_global_rng(base):
    before = _global_states()
    first = base.generate("Say hello.", max_new_tokens=8, temperature=2.0, seed=3)
    _assert_same(before, _global_states())
    assert base.generate("Say hello.", max_new_tokens=8, temperature=2.0, seed=3) == first
    assert "".join(base.stream("Say hello.", max_new_tokens=8, temperature=2.0, seed=3)) == first
    messages = [{"role": "user", "content": "Say hello."}]
    assert base.chat(messages, max_new_tokens=8, temperature=2.0, seed=3) == first
    unseeded = {base.generate("Say hello.", max_new_tokens=8, temperature=2.0) for _ in range(3)}
    _assert_same(before, _global_states())
    assert len(unseeded) > 1  # no seed: a fresh random seed per call, not the (restored) global state


def test_training_evaluator_and_sample_callback_leave_the_rng_as_they_found_it(base, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    def noisy_metric(predictions, references):  # a custom metric that draws random numbers
        return random.random() + float(torch.rand(1)) + float(np.random.rand())

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    template = base.template
    prompts = [base.encode({"instruction": r["instruction"], "input": ""}) for r in ROWS]
    generation_set = GenerationSet(prompts, [r["output"] for r in ROWS])
    spec = EvalSpec(
        metrics=("perplexity", "exact_match", noisy_metric), samples=2, max_new_tokens=4, batch_size=2
    )
    evaluator = TrainingEvaluator(spec, generation_set, base.tokenizer, template)
    before = _global_states()
    scores = evaluator(model, eval_loss=1.0)
    _assert_same(before, _global_states())
    assert set(scores) == {"eval_perplexity", "eval_exact_match", "eval_noisy_metric"}
    assert scores["eval_perplexity"] == pytest.approx(np.e) and len(evaluator.last_predictions) == 2
    assert model.training  # generated in eval mode, the training mode restored

    logged = []

    class Tracker:
        def log_samples(self, step, rows):
            logged.append((step, rows))

    callback = sample_callback(
        SampleSpec(n=2, max_new_tokens=4), prompts, ["a", "b"], base.tokenizer, template, Tracker()
    )

    class State:
        global_step = 5

    callback.on_train_end(None, State(), None, model=model)
    _assert_same(before, _global_states())
    assert [step for step, _ in logged] == [5] and [r["prompt"] for r in logged[0][1]] == ["a", "b"]


def test_save_leaves_the_generation_config_alone(base, tmp_path):
    before = base.model.generation_config.to_dict()
    out = base.save(tmp_path / "saved")
    assert base.model.generation_config.to_dict() == before
    saved = json.loads((out / "generation_config.json").read_text())
    im_end = base.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert saved["eos_token_id"] == [base.tokenizer.eos_token_id, im_end]
    assert saved["pad_token_id"] == base.tokenizer.pad_token_id


def test_one_loss_scores_every_label_token(base, tiny_model_dir):
    """evaluate()'s loss is the mean NLL over all label tokens of the training encoding (earlier turns too)."""
    import torch.nn.functional as F

    conversation = [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "brown"},
    ]
    result = lk.evaluate(base, [{"messages": conversation}], metrics=["perplexity"])
    encoded = encode(conversation, base.template, base.tokenizer, max_length=1024)
    assert len(encoded.spans) == 2  # both replies are trained, so both are scored
    with torch.no_grad():
        logits = base.model(input_ids=torch.tensor([encoded.input_ids])).logits[0]
    labels = torch.tensor(encoded.labels)
    total = float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"))
    count = int((labels[1:] != IGNORE_INDEX).sum())
    assert result.scored_tokens == count == encoded.n_trained_tokens
    assert result.metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert token_nll(logits, labels) == pytest.approx((total, count), rel=1e-5)
    loss, scored = mean_token_nll(
        base.model, [(encoded.input_ids, encoded.labels)] * 3, batch_size=2, pad_token_id=0
    )
    assert loss == pytest.approx(total / count, rel=1e-5) and scored == 3 * count
    with pytest.raises(lk.DataError, match="No reference tokens to score"):
        mean_token_nll(base.model, [([1, 2], [IGNORE_INDEX] * 2)], batch_size=1, pad_token_id=0)


def test_evaluate_rows_and_the_deprecated_normalize_answer(base):
    numbers = evaluate_rows(base, ROWS, max_new_tokens=4)
    assert sorted(numbers) == ["exact_match", "loss", "perplexity", "predictions", "rows", "scored_tokens"]
    assert numbers["rows"] == 2 and len(numbers["predictions"]) == 2 and numbers["scored_tokens"] > 2
    with pytest.warns(DeprecationWarning, match="lorakit.metrics.builtin.normalize"):
        assert normalize_answer("  The  Answer.  ") == "the answer"


def test_merge_check_warns_when_the_run_rows_cannot_be_read(tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "lorakit_run.json").write_text("{not json")
    with pytest.warns(UserWarning, match="cannot read the run's training rows .*not valid JSON"):
        assert _run_rows(damaged, 4) == []
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text("{broken\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "lorakit_run.json").write_text(json.dumps({"pipeline": {"data": {"source": str(bad_data)}}}))
    with pytest.warns(UserWarning, match="cannot read the run's training rows \\(.*bad.jsonl\\)"):
        assert _run_rows(run, 4) == []
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "lorakit_run.json").write_text(json.dumps({"pipeline": {"data": {"source": "gone.jsonl"}}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a data file that is simply gone is no surprise: no warning
        assert _run_rows(moved, 4) == []


def test_stream_raises_the_workers_error_in_the_consumers_thread(tiny_tokenizer):
    import contextlib

    from lorakit.generation import Decoding, stream_text

    @contextlib.contextmanager
    def broken_session():
        raise RuntimeError("the model is gone")
        yield  # pragma: no cover

    chunks = stream_text(broken_session, tiny_tokenizer, [1, 2, 3], Decoding({}, (), (2,), 0))
    with pytest.raises(RuntimeError, match="the model is gone"):
        list(chunks)


# --- continuous batching ------------------------------------------------------------------------------------

PROMPTS = ["Say hello.", "Name a colour.", "What is the capital of France?", "Count to three."]


@pytest.fixture(scope="module")
def mixed(tiny_model_dir, tmp_path_factory):
    """The tiny base with two random LoRA adapters ``x`` and ``y`` (non-zero B, so each changes the output)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora-adapters")
    model = InferenceModel.from_model(tiny_model_dir, template="chatml")
    for seed, name in enumerate(("x", "y")):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
        with torch.no_grad():
            for param_name, param in adapter.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.5)
        adapter.save_pretrained(root / name)
        model.load_adapter(root / name, name=name)
    return model


def _row(model, prompt, adapter, tokens, **options):
    from lorakit.generation import Row

    stops = model.template_for(adapter).stop_strings(model.tokenizer)
    decoding = Decoding.build(model.tokenizer, stops, Sampling(tokens))
    return Row(model.tokenizer, model.encode(prompt, adapter=adapter), decoding, adapter=adapter, **options)


def test_rows_joining_a_running_continuous_batch_equal_each_prompt_generated_alone(mixed):
    jobs = [(PROMPTS[0], "x", 16), (PROMPTS[1], "y", 9), (PROMPTS[2], None, 12), (PROMPTS[3], "y", 14)]
    jobs += [(PROMPTS[0], "y", 16)]
    rows = [_row(mixed, prompt, adapter, tokens) for prompt, adapter, tokens in jobs]
    batch = mixed.continuous_batch()
    done = batch.add(rows[:1])
    for _ in range(3):
        done += batch.step()
    assert batch.rows == [rows[0]] and len(rows[0].tokens) == 4
    done += batch.add(rows[1:3])  # two prompts join a row that has a longer cache, for other adapters
    for _ in range(2):
        done += batch.step()
    done += batch.add(rows[3:])
    assert len(batch) + len(done) == len(rows)
    while len(batch):
        done += batch.step()
    assert sorted(map(id, done)) == sorted(map(id, rows))  # every row left exactly once
    for row, (prompt, adapter, tokens) in zip(rows, jobs, strict=True):
        assert row.text == mixed.generate(prompt, tokens, adapter=adapter), (prompt, adapter)
        assert row.finish_reason in ("stop", "length") and 1 <= len(row.tokens) <= tokens
    assert rows[0].text != rows[4].text  # the same prompt under x and y: each row used its own adapter


def test_a_short_row_leaves_at_once_while_a_long_one_goes_on(mixed):
    ends = stop_token_ids(mixed.tokenizer, mixed.template.stop_strings(mixed.tokenizer))
    no_end = {token: -100.0 for token in ends}
    finished = []
    long = _row(mixed, PROMPTS[2], "x", 20, logit_bias=no_end, on_done=finished.append)
    short = _row(mixed, PROMPTS[0], "y", 3, logit_bias=no_end, on_done=finished.append)
    gone = _row(mixed, PROMPTS[1], "x", 20, logit_bias=no_end, on_done=finished.append)
    batch = mixed.continuous_batch()
    assert batch.add([long, short, gone]) == [] and len(batch) == 3
    gone.cancel()
    assert batch.step() == [gone] and gone.finish_reason == "cancelled" and len(gone.tokens) == 1
    assert batch.step() == [short] and finished == [gone, short]
    assert short.finish_reason == "length" and len(short.tokens) == 3
    assert batch.rows == [long] and len(long.tokens) == 3
    while len(batch):
        batch.step()
    assert finished == [gone, short, long] and batch.steps == 19
    assert long.finish_reason == "length" and len(long.tokens) == 20
    assert long.text == mixed.generate(PROMPTS[2], 20, adapter="x", suppress_tokens=ends)
    alone = _row(mixed, PROMPTS[0], "y", 3, logit_bias=no_end)
    batch.add([alone])
    while len(batch):
        batch.step()
    assert short.text == alone.text and short.tokens == alone.tokens


def test_continuous_batching_refuses_prompt_based_adapters(tiny_model_dir, tmp_path):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(
        tmp_path / "p"
    )
    model = InferenceModel.from_model(tiny_model_dir, template="chatml")
    model.load_adapter(tmp_path / "p", name="soft")
    with pytest.raises(lk.ConfigError, match=r"mixes LoRA adapters only; \[.soft.\] are prompt-based"):
        model.continuous_batch()
