"""Adapter methods beyond plain LoRA: options, registry, round trips, and a tiny train/reload/merge matrix."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.methods import (
    METHODS,
    AdaLoraSpec,
    FullSpec,
    Ia3Spec,
    LoraSpec,
    PrefixTuningSpec,
    PromptTuningSpec,
    PtuningSpec,
    PtuningV2Spec,
    method_from_dict,
    register_method,
)
from lorakit.methods.adalora import orth_regularization, rank_pattern_sizes

ROWS = [
    {"instruction": "Say hello.", "input": "", "output": "hello world"},
    {"instruction": "Name a colour.", "input": "", "output": "brown"},
    {"instruction": "Count to three.", "input": "", "output": "0 1 2"},
    {"instruction": "Name an animal.", "input": "", "output": "the lazy dog"},
]

IDS = [1, 5, 9, 13, 17, 21, 25]

VARIANTS = {
    "dora": lambda p: p.with_lora(r=4, alpha=8, dropout=0.0, use_dora=True),
    "rslora_pissa": lambda p: p.with_lora(r=4, alpha=8, dropout=0.0, use_rslora=True, init="pissa"),
    "olora_layers": lambda p: p.with_lora(
        r=4, alpha=8, dropout=0.0, init="olora", layers=(1,), targets=("q_proj", "up_proj")
    ),
    "gaussian": lambda p: p.with_lora(
        r=4, alpha=8, dropout=0.0, init="gaussian", targets=("q_proj", "v_proj")
    ),
    "ia3": lambda p: p.with_ia3(),
    "ia3_4bit": lambda p: p.quantize_4bit().with_ia3(),
    "dora_4bit": lambda p: p.quantize_4bit().with_lora(r=4, alpha=8, dropout=0.0, use_dora=True),
    "loftq_4bit": lambda p: p.quantize_4bit().with_lora(r=4, alpha=8, dropout=0.0, init="loftq"),
    "prompt_tuning": lambda p: p.with_prompt_tuning(num_virtual_tokens=4),
    "prompt_tuning_text": lambda p: p.with_prompt_tuning(num_virtual_tokens=6, init_text="Say hello."),
    "ptuning": lambda p: p.with_ptuning(num_virtual_tokens=4, encoder_hidden_size=16),
    "ptuning_lstm": lambda p: p.with_ptuning(
        num_virtual_tokens=4, encoder_hidden_size=16, encoder_type="lstm", encoder_num_layers=2
    ),
    "prefix_tuning": lambda p: p.with_prefix_tuning(num_virtual_tokens=4),
    "prefix_projection": lambda p: p.with_prefix_tuning(
        num_virtual_tokens=4, projection=True, encoder_hidden_size=16
    ),
    "ptuning_v2": lambda p: p.with_ptuning_v2(num_virtual_tokens=4, encoder_hidden_size=16),
    "ptuning_4bit": lambda p: p.quantize_4bit().with_ptuning(num_virtual_tokens=4, encoder_hidden_size=16),
    "prefix_4bit": lambda p: p.quantize_4bit().with_prefix_tuning(num_virtual_tokens=4),
    "ia3_generic": lambda p: p.with_method(
        "ia3", targets=("v_proj", "down_proj"), feedforward=("down_proj",)
    ),
    # 3 steps: step 0 and 1 warm up at rank 4 (tinit=1), step 2 = total_step - tfinal fixes the budget at 2 per layer.
    "adalora": lambda p: p.with_adalora(init_r=4, target_r=2, alpha=8, dropout=0.0, tinit=1, tfinal=1),
    "full": lambda p: p.full_finetune(),
    "freeze_layers": lambda p: p.freeze(train_last_n_layers=1),
    "freeze_modules": lambda p: p.freeze(modules=("lm_head", "layers.0.mlp")).full_finetune(),
}

FULL = {"full", "freeze_layers", "freeze_modules"}
"""Variants without an adapter: the run directory holds the whole model."""


def _pipeline(model_dir, variant):
    return VARIANTS[variant](lk.Pipeline.from_model(model_dir)).with_dataset(
        ROWS, template="alpaca", val_split=0.0, max_length=128
    )


class _Watch:
    def __init__(self):
        from transformers import TrainerCallback

        watch = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                watch.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                watch.before = {n: p.detach().clone() for n, p in model.named_parameters()}

            def on_train_end(self, args, state, control, model=None, **kwargs):
                watch.after = {n: p.detach().clone() for n, p in model.named_parameters()}
                watch.grad = {n for n, p in model.named_parameters() if p.requires_grad}
                model.eval()
                with torch.no_grad():
                    watch.logits = model(input_ids=torch.tensor([IDS])).logits.detach().clone()

        self.callback = _CB()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def run(request, tiny_model_dir, tmp_path_factory):
    pipe = _pipeline(tiny_model_dir, request.param).with_training(
        max_steps=3, lr=5e-2, batch_size=4, logging_steps=1, warmup_ratio=0.0, scheduler="constant"
    )
    watch = _Watch()
    result = pipe.train(tmp_path_factory.mktemp("m") / request.param, callbacks=[watch.callback])
    return request.param, pipe, result, watch


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_plan_trainable_count_equals_the_trained_model(run):
    _, pipe, _, watch = run
    assert watch.trainable > 0
    assert pipe.plan().trainable_params == watch.trainable


def test_adapter_changes_and_base_does_not(run):
    variant, _, _, watch = run
    changed = {n for n in watch.before if not torch.equal(watch.before[n], watch.after[n])}
    assert changed, "no weight changed"
    assert changed <= watch.grad, f"frozen weights changed: {sorted(changed - watch.grad)[:3]}"
    assert changed & watch.grad
    if variant in FULL:  # every trained weight moved; every frozen one is bit-identical (checked above)
        assert changed == watch.grad
    if variant == "full":
        assert changed == set(watch.before)
    if variant == "freeze_layers":
        assert changed == {
            n for n in watch.before if n.startswith("model.layers.1.") or n == "model.norm.weight"
        }
    if variant == "freeze_modules":
        assert changed == {"lm_head.weight"} | {
            n for n in watch.before if n.startswith("model.layers.0.mlp.")
        }


def test_reload_and_merge_give_equal_logits(run):
    _, _, result, watch = run
    if run[0] in FULL:
        _check_full_run_reloads(result.output_dir, watch)
        return
    ours = lk.InferenceModel.load(result.output_dir)
    ids = ours.encode({"instruction": "Say hello.", "input": ""})
    reloaded = _logits(ours.model, ids)
    torch.testing.assert_close(_logits(ours.model, IDS), watch.logits, atol=1e-5, rtol=1e-4)
    with ours.model.disable_adapter():  # the adapter matters
        assert (_logits(ours.model, IDS) - watch.logits[:, -len(IDS) :]).abs().max() > 1e-2
    assert isinstance(ours.generate({"instruction": "Say hello.", "input": ""}, max_new_tokens=3), str)
    if not run[1].resolved_method.mergeable:  # prompt-based: virtual tokens / prefixes, no weight update
        with pytest.raises(ConfigError, match="prompt-based .* cannot be merged.*Serve it unmerged"):
            ours.merge()
        return
    if run[0] == "loftq_4bit":
        _check_loftq_merge(result.output_dir, ids, reloaded)
        return
    if run[0].endswith("_4bit"):  # merge reloads the base un-quantized, so its logits are not the 4-bit ones
        return
    merged = lk.InferenceModel.load(result.output_dir).merge()
    torch.testing.assert_close(_logits(merged.model, ids), reloaded, atol=1e-4, rtol=1e-4)


def _check_loftq_merge(output_dir, ids, on_4bit):
    """A LoftQ adapter fits Q(W), so it is merged into the dequantized 4-bit base: the merged logits are those
    of the adapter on the 4-bit base. Merged into the full-precision W (as other QLoRA adapters are), the
    quantization error would count twice, and the logits would be much further off."""
    import lorakit.inference as inference

    merged = lk.InferenceModel.load(output_dir).merge(verify=True)
    aware = (_logits(merged.model, ids) - on_4bit).abs().max().item()
    assert merged.merge_report.reference == "adapter on the 4-bit base"
    assert merged.merge_report.max_logit_diff < 1e-3
    assert aware < 1e-3
    original = inference._loftq_quant
    inference._loftq_quant = lambda path: None  # merge into the un-quantized W, as for other QLoRA adapters
    try:
        naive = lk.InferenceModel.load(output_dir).merge(verify=True)
    finally:
        inference._loftq_quant = original
    naive_diff = (_logits(naive.model, ids) - on_4bit).abs().max().item()
    print(
        f"LoftQ merge: max logit diff vs the adapter on the 4-bit base {merged.merge_report.max_logit_diff:.2e} "
        f"(naive merge into W: {naive.merge_report.max_logit_diff:.2e})"
    )
    assert naive.merge_report.max_logit_diff > 100 * merged.merge_report.max_logit_diff
    assert naive_diff > 100 * max(aware, 1e-6)


def _until_eos(tokens, eos):
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_cached_generation_picks_the_greedy_tokens_of_full_forwards(run):
    """generate() with the KV cache equals greedy decoding by full forwards, alone and in a left-padded batch.

    Prompt-based adapters need lorakit.generation.prompt_learning_generation for this: without it PEFT 0.21 and
    transformers 5 disagree on the cache's name, and prefix adapters are ignored once generation starts.
    """
    variant, _, result, _ = run
    ours = lk.InferenceModel.load(result.output_dir)
    eos = ours.tokenizer.eos_token_id
    encoded = [ours.encode({"instruction": row["instruction"], "input": ""}) for row in ROWS[:2]]
    expected = []
    for ids in encoded:
        tokens = list(ids)
        with torch.no_grad():
            for _ in range(6):
                tokens.append(int(ours.model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
        expected.append(_until_eos(tokens[len(ids) :], eos))
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": eos}
    name = None if variant in FULL else ours.adapters[0]  # a full run is a plain model, no adapter
    single = [ours._run_generate([ids], options, name, None)[0, len(ids) :].tolist() for ids in encoded]
    assert [_until_eos(row, eos) for row in single] == expected
    width = max(len(ids) for ids in encoded)
    batch = ours._run_generate(encoded, options, name, None)[:, width:].tolist()
    assert [_until_eos(row, eos) for row in batch] == expected
    from lorakit.evaluation import generate_texts  # the generation metrics of with_eval use this path

    prompts = [{"instruction": row["instruction"], "input": ""} for row in ROWS[:2]]
    texts = generate_texts(
        ours.model, ours.tokenizer, ours.template_for(name), encoded, max_new_tokens=6, batch_size=2
    )
    assert texts == ours.generate(prompts, max_new_tokens=6)
    if variant in FULL:
        return
    ids = encoded[0]  # adapter=None generates with the plain base
    tokens = list(ids)
    with ours.model.disable_adapter(), torch.no_grad():
        for _ in range(6):
            tokens.append(int(ours.model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    plain = ours._run_generate([ids], options, None, None)[0, len(ids) :].tolist()
    assert _until_eos(plain, eos) == _until_eos(tokens[len(ids) :], eos)


def _check_full_run_reloads(run_dir, watch):
    """A full fine-tuning run directory is a plain model: lorakit and transformers load it, nothing to merge."""
    from transformers import AutoModelForCausalLM

    ours = lk.InferenceModel.load(run_dir)
    assert ours.is_merged and ours.template.name == "alpaca"
    torch.testing.assert_close(_logits(ours.model, IDS), watch.logits, atol=1e-5, rtol=1e-4)
    assert ours.merge() is ours  # nothing to fold in: the trained weights are the model
    plain = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    torch.testing.assert_close(_logits(plain, IDS), watch.logits, atol=1e-5, rtol=1e-4)
    base_dir = lk.Pipeline.from_config(run_dir).model.name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert (_logits(base, IDS) - watch.logits).abs().max() > 1e-2  # training changed the model
    assert isinstance(ours.generate({"instruction": "Say hello.", "input": ""}, max_new_tokens=3), str)
    assert json.loads((run_dir / "lorakit_run.json").read_text())["pipeline"]["method"]["name"] == "full"
    assert not (run_dir / "adapter_config.json").exists()
    with pytest.raises(ConfigError, match="is a full fine-tuning run.*InferenceModel.load"):
        lk.InferenceModel.from_model(base_dir, template="alpaca").load_adapter(run_dir)


@pytest.mark.parametrize("run", ["adalora"], indirect=True)
def test_adalora_reallocates_the_rank_budget(run):
    _, pipe, result, _ = run
    saved = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert saved["total_step"] == pipe.plan().total_steps == 3  # filled in from the plan's step count
    ranks = rank_pattern_sizes(saved["rank_pattern"])
    assert len(ranks) == 14  # 7 linear modules x 2 layers
    assert sum(ranks.values()) == 2 * len(ranks)  # the budget: target_r per module on average
    assert set(ranks.values()) != {4}, "no module lost rank"
    assert len(set(ranks.values())) > 1, "the budget was not re-allocated between modules"
    model = lk.InferenceModel.load(result.output_dir).model  # reloaded modules have the allocated ranks
    for name, param in model.named_parameters():
        if ".lora_E." in name:
            module = name.split("base_model.model.", 1)[1].split(".lora_E.")[0]
            assert param.shape[0] == ranks[f"{module}.lora_E"]


def test_adalora_schedule_follows_the_trainers_step_count():
    from types import SimpleNamespace

    from lorakit.methods.adalora import rank_allocation_callback

    config = AdaLoraSpec(tinit=1, tfinal=1).to_peft_config(total_step=10)
    calls = []
    adalora = SimpleNamespace(
        peft_config={"default": config}, trainable_adapter_name="default", update_and_allocate=calls.append
    )
    model = SimpleNamespace(base_model=adalora)
    callback = rank_allocation_callback()
    callback.on_train_begin(None, SimpleNamespace(max_steps=10), None, model=model)
    assert config.total_step == 10
    with pytest.warns(UserWarning, match="has 12 optimizer steps, not the 10 lorakit counted"):
        callback.on_train_begin(None, SimpleNamespace(max_steps=12), None, model=model)
    assert config.total_step == 12
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="less than the run's 2 optimizer steps"):
        callback.on_train_begin(None, SimpleNamespace(max_steps=2), None, model=model)
    callback.on_optimizer_step(None, SimpleNamespace(global_step=4), None, model=model)
    assert calls == [4]
    with pytest.raises(ConfigError, match="not an AdaLoRA PeftModel"):
        callback.on_optimizer_step(None, SimpleNamespace(global_step=4), None, model=SimpleNamespace())


def test_adalora_adds_the_orthogonality_penalty_sftrainer_drops(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lorakit.collate import PadCollator
    from lorakit.trainer import LorakitTrainer

    rows = Dataset.from_list([{"input_ids": [1, 5, 9, 13, 17], "labels": [-100, 5, 9, 13, 17]}])
    collate = PadCollator(pad_token_id=2)
    losses = {}
    spec = AdaLoraSpec(init_r=4, target_r=2, dropout=0.0, orth_reg_weight=10.0)
    ours = {"method": spec}  # the method's extra_loss hook adds the penalty
    for name, trainer_class, extra in (("sft", SFTTrainer, {}), ("ours", LorakitTrainer, ours)):
        torch.manual_seed(0)
        trainer = trainer_class(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=SFTConfig(
                str(tmp_path / name),
                use_cpu=True,
                report_to="none",
                dataset_kwargs={"skip_prepare_dataset": True},
                remove_unused_columns=False,
            ),
            train_dataset=rows,
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
            data_collator=collate,
            peft_config=spec.to_peft_config(10),
            **extra,
        )
        trainer.model.train()
        batch = trainer._prepare_inputs(collate([rows[0]]))
        with torch.no_grad():
            losses[name] = float(trainer.compute_loss(trainer.model, batch))
            penalty = float(orth_regularization(trainer.model))
    assert penalty > 0.1
    assert losses["ours"] == pytest.approx(losses["sft"] + penalty, rel=1e-5)


@pytest.mark.parametrize(("variant", "lr"), [("adalora", 5e-2), ("full", 1e-2), ("freeze_layers", 1e-2)])
def test_loss_falls_when_over_fitting(tiny_model_dir, tmp_path, variant, lr):
    pipe = _pipeline(tiny_model_dir, variant).with_training(
        max_steps=15, lr=lr, batch_size=4, logging_steps=1, warmup_ratio=0.0, scheduler="constant"
    )
    result = pipe.train(tmp_path / variant)
    log = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == 15
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_round_trip(tiny_model_dir, variant):
    pipe = _pipeline(tiny_model_dir, variant)
    again = lk.Pipeline.from_config(pipe.to_config())
    assert again.method == pipe.method
    assert method_from_dict(pipe.method.to_dict()) == pipe.method


def test_registry_rejects_duplicates_and_holds_the_methods():
    assert METHODS["lora"] is LoraSpec and METHODS["ia3"] is Ia3Spec
    assert METHODS["prompt_tuning"] is PromptTuningSpec and METHODS["ptuning"] is PtuningSpec
    assert METHODS["prefix_tuning"] is PrefixTuningSpec and METHODS["ptuning_v2"] is PtuningV2Spec
    assert METHODS["adalora"] is AdaLoraSpec and METHODS["full"] is FullSpec
    with pytest.raises(ConfigError, match="'ia3' is already registered"):
        register_method("ia3", LoraSpec)


def test_registry_refuses_a_class_without_the_method_hooks():
    class Bare:
        name = "bare"
        mergeable = False

        def to_peft_config(self):
            return None

    with pytest.raises(
        ConfigError,
        match=r"register_method\('bare', Bare\): the class lacks the method hooks "
        r"builder_call, .*Subclass lorakit.methods.MethodBase",
    ):
        register_method("bare", Bare)
    assert "bare" not in METHODS


def test_plan_side_hooks_replace_the_method_checks():
    from lorakit.config import QuantSpec

    four, eight = QuantSpec(bits=4), QuantSpec(bits=8)
    assert FullSpec().builder_call() == "full_finetune()" and LoraSpec().builder_call() == "with_lora()"
    assert FullSpec(train_last_n_layers=2).builder_call() == "freeze(train_last_n_layers=2)"
    assert [spec.has_adapter for spec in (LoraSpec(), AdaLoraSpec(), FullSpec())] == [True, True, False]
    assert [spec.needs_step_count for spec in (LoraSpec(), AdaLoraSpec(), FullSpec())] == [False, True, False]
    with pytest.raises(
        ConfigError, match=r"freeze\(modules=\('lm_head',\)\) cannot be combined with quantize_4bit"
    ):
        FullSpec(modules=("lm_head",)).check_quantization(four, final=False)
    FullSpec().check_quantization(None, final=True)
    loftq = LoraSpec(init="loftq")
    loftq.check_quantization(None, final=False)  # quantize_4bit() may still follow
    loftq.check_quantization(four, final=True)
    with pytest.raises(ConfigError, match=r"init='loftq'\) needs quantize_4bit\(\)"):
        loftq.check_quantization(None, final=True)
    with pytest.raises(ConfigError, match="cannot be combined with quantize_8bit"):
        loftq.check_quantization(eight, final=False)
    LoraSpec().check_quantization(eight, final=True)
    adalora = AdaLoraSpec(tinit=2, tfinal=2)
    with pytest.raises(ConfigError, match="less than the run's 4 optimizer steps"):
        adalora.check_steps(4)
    LoraSpec().check_steps(1)  # no schedule: nothing to check
    with pytest.raises(ConfigError, match="less than the run's 3 optimizer steps"):
        adalora.check_schedule(3, None)
    with pytest.raises(ConfigError, match="rows of generator cannot be counted in advance"):
        adalora.check_schedule(None, (row for row in ROWS))
    adalora.check_schedule(None, ROWS)
    adalora.check_schedule(None, None)


def test_meta_hooks_count_what_training_trains(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    def meta_model():
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))

    full = FullSpec(train_last_n_layers=1)
    frozen = full.apply_on_meta(meta_model())
    assert full.base_of(frozen) is frozen
    assert full.plan_targets(frozen) == ("model.layers.1", "model.norm")
    assert FullSpec().plan_targets(FullSpec().apply_on_meta(meta_model())) == ("all parameters",)
    adalora = AdaLoraSpec(init_r=4, target_r=2, targets=("q_proj", "v_proj"))
    peft_model = adalora.apply_on_meta(meta_model())
    assert adalora.plan_targets(peft_model) == ("q_proj", "v_proj")
    assert type(adalora.base_of(peft_model)).__name__ == "LlamaForCausalLM"
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if ".ranknum." in n)


def test_describe_lists_the_options():
    spec = LoraSpec(
        targets=("q_proj",),
        use_dora=True,
        use_rslora=True,
        init="pissa",
        layers=(0, 2),
        modules_to_save="lm_head",
    )
    assert spec.describe().endswith("DoRA rsLoRA init=pissa layers=0,2 modules_to_save=lm_head")
    config = spec.to_peft_config()
    assert (config.use_dora, config.use_rslora, config.init_lora_weights) == (True, True, "pissa")
    assert spec.to_dict()["layers"] == [0, 2]
    assert config.layers_to_transform == [0, 2] and config.modules_to_save == ["lm_head"]


def _iterable_rows():
    from datasets import IterableDataset

    return IterableDataset.from_generator(lambda: iter(ROWS))


def test_describe_adalora_and_full():
    spec = AdaLoraSpec(init_r=6, target_r=3, targets=["q_proj", "v_proj"], tinit=2, tfinal=4, deltaT=2)
    assert spec.describe() == (
        "AdaLoRA init_r=6 target_r=3 alpha=32 dropout=0.05 targets=q_proj, v_proj tinit=2 tfinal=4 deltaT=2 "
        "orth_reg_weight=0.5"
    )
    config = spec.to_peft_config(total_step=20)
    assert (
        config.init_r,
        config.target_r,
        config.total_step,
        config.tinit,
        config.tfinal,
        config.deltaT,
    ) == (
        6,
        3,
        20,
        2,
        4,
        2,
    )
    assert config.target_modules == {"q_proj", "v_proj"} and config.orth_reg_weight == 0.5
    with pytest.raises(ConfigError, match="needs the run's number of optimizer steps"):
        spec.to_peft_config()
    assert FullSpec().describe() == "full fine-tuning (all parameters)"
    assert FullSpec(train_last_n_layers=2).describe() == (
        "full fine-tuning of the last 2 decoder layer(s) + final norm; the rest frozen"
    )
    assert FullSpec(train_last_n_layers=2, final_norm=False).describe().endswith("layer(s); the rest frozen")
    assert FullSpec(modules="lm_head").describe() == "full fine-tuning of modules lm_head; the rest frozen"
    assert FullSpec().to_peft_config() is None and not FullSpec.mergeable


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.with_adalora(init_r=4, target_r=8), "target_r=8.*exceeds init_r=4.*target_r <= init_r"),
        (lambda p: p.with_adalora(tinit=-1), r"with_adalora\(tinit=-1\) must be an integer >= 0"),
        (lambda p: p.with_adalora(beta1=1.0), "beta1.*got 1.0"),
        (lambda p: p.with_adalora(deltaT=0), "deltaT.*positive integer"),
        (lambda p: p.with_adalora(targets="q_proj"), r"For one module write targets=\('q_proj',\)"),
        (
            lambda p: p.with_adalora(tinit=2, tfinal=1).with_training(max_steps=3),
            r"tinit=2, tfinal=1\): tinit \+ tfinal must be less than the run's 3 optimizer steps",
        ),
        (
            lambda p: p.with_training(max_steps=3).with_adalora(tinit=3),
            r"tinit \+ tfinal must be less than the run's 3 .*max_steps",
        ),
        (
            lambda p: p.with_adalora().with_dataset(_iterable_rows()),
            r"with_adalora\(\) needs the run's number of optimizer steps.*IterableDataset.*max_steps",
        ),
        (
            lambda p: p.full_finetune().quantize_4bit(),
            r"full_finetune\(\) cannot be combined with quantize_4bit\(\).*Drop the quantization.*with_lora",
        ),
        (
            lambda p: p.quantize_8bit().freeze(train_last_n_layers=1),
            r"freeze\(train_last_n_layers=1\) cannot be combined with quantize_8bit\(\)",
        ),
        (lambda p: p.freeze(), "exactly one of train_last_n_layers=N or modules"),
        (lambda p: p.freeze(1, modules=("lm_head",)), "exactly one of train_last_n_layers=N or modules"),
        (lambda p: p.freeze(0), r"train_last_n_layers=0\) must be a positive number"),
        (lambda p: p.freeze(modules=()), r"modules=\(\)\) must be a non-empty tuple"),
        (
            lambda p: p.with_lora().freeze(1),
            r"freeze\(train_last_n_layers=1\) conflicts with the earlier with_lora\(\).*with_lora\(layers=",
        ),
        (
            lambda p: p.full_finetune().with_ia3(),
            r"with_ia3\(\) conflicts with the earlier full_finetune\(\)",
        ),
        (lambda p: p.with_method("full", rank=4), r"with_method\('full', ...\).*rank.*FullSpec"),
        (
            lambda p: p.with_lora(init="loftq").quantize_8bit(),
            r"init='loftq'\) cannot be combined with quantize_8bit\(\).*Use quantize_4bit\(\)",
        ),
        (
            lambda p: p.quantize_8bit().with_lora(init="loftq"),
            r"init='loftq'\) cannot be combined with quantize_8bit\(\).*Use quantize_4bit\(\)",
        ),
        (
            lambda p: p.quantize_4bit().with_lora(init="loftq", use_dora=True),
            r"init='loftq', use_dora=True\) is not supported.*use_dora=False",
        ),
        (lambda p: p.with_lora(init="svd"), "init='svd'.*'default', 'gaussian', 'pissa', 'olora'"),
        (lambda p: p.with_lora(layers=(1,)), r"layers=\(1,\)\) needs explicit module names"),
        (lambda p: p.with_lora(layers=(-1,), targets=("q_proj",)), r"layers=\(-1,\).*layer indices >= 0"),
        (lambda p: p.with_ia3(targets=("v_proj",), feedforward=("down_proj",)), "subset of targets"),
        (lambda p: p.with_ia3(targets=()), r"targets=\(\)\) must be a non-empty tuple"),
        (
            lambda p: p.with_method("nope"),
            "Unknown adapter method 'nope'; known: adalora, full, ia3, lora, prefix_tuning, prompt_tuning, "
            "ptuning, ptuning_v2",
        ),
        (lambda p: p.with_method("ia3", rank=4), r"with_method\('ia3', ...\).*rank.*Ia3Spec"),
        (lambda p: p.with_prompt_tuning(num_virtual_tokens=0), "num_virtual_tokens"),
        (lambda p: p.with_prompt_tuning(init_text="  "), r"init_text='  '\) must be a non-empty string"),
        (lambda p: p.with_ptuning(num_virtual_tokens=-1), "`num_virtual_tokens` must be a positive integer"),
        (lambda p: p.with_ptuning(encoder_hidden_size=0), "`encoder_hidden_size` must be a positive integer"),
        (
            lambda p: p.with_ptuning(encoder_type="gru"),
            "`encoder_type` must be one of 'mlp', 'lstm', got 'gru'",
        ),
        (lambda p: p.with_ptuning(encoder_num_layers=3), "only apply to encoder_type='lstm'"),
        (
            lambda p: p.with_ptuning(encoder_type="lstm", encoder_num_layers=1, encoder_dropout=0.1),
            "acts between LSTM layers.*encoder_num_layers >= 2",
        ),
        (
            lambda p: p.with_ptuning(encoder_type="lstm", encoder_dropout=1.0),
            "`encoder_dropout` must be a number",
        ),
        (
            lambda p: p.with_prefix_tuning(num_virtual_tokens=0),
            "`num_virtual_tokens` must be a positive integer",
        ),
        (lambda p: p.with_prefix_tuning(projection="yes"), "`projection` must be True or False, got 'yes'"),
        (lambda p: p.with_prefix_tuning(encoder_hidden_size=64), "projection=False. Pass projection=True"),
        (
            lambda p: p.with_ptuning_v2(encoder_hidden_size=-8),
            "`encoder_hidden_size` must be a positive integer",
        ),
        (
            lambda p: p.with_method("ptuning", encoder="mlp"),
            r"with_method\('ptuning', ...\).*encoder.*PtuningSpec",
        ),
        (
            lambda p: p.with_ptuning().with_prefix_tuning(),
            r"with_prefix_tuning\(\) conflicts with the earlier",
        ),
        (
            lambda p: p.with_training(grad_checkpointing=True).with_prefix_tuning(),
            r"with_prefix_tuning\(\) conflicts with the earlier with_training\(grad_checkpointing=True\)"
            ".*cannot train with gradient checkpointing.*grad_checkpointing=None",
        ),
        (
            lambda p: p.with_ptuning_v2().with_training(grad_checkpointing=True),
            r"with_training\(grad_checkpointing=True\) conflicts with the earlier with_ptuning_v2\(\)",
        ),
        (
            lambda p: p.with_training(grad_checkpointing=True).with_method("prefix_tuning", projection=True),
            r"with_prefix_tuning\(\) conflicts with the earlier with_training\(grad_checkpointing=True\)",
        ),
        (lambda p: p.with_lora().with_ia3(), r"with_ia3\(\) conflicts with the earlier with_lora\(\)"),
    ],
)
def test_bad_options_raise_at_the_builder_call(call, message):
    with pytest.raises(ConfigError, match=message):
        call(lk.Pipeline.from_model("/nonexistent-model-dir"))


def test_loftq_needs_quantize_4bit_once_the_pipeline_is_final(tiny_model_dir, tmp_path, monkeypatch):
    import lorakit.training

    message = r"with_lora\(init='loftq'\) needs quantize_4bit\(\).*Add .quantize_4bit\(\)"
    base = lk.Pipeline.from_model(tiny_model_dir).with_dataset(ROWS, val_split=0.0, max_length=128)
    pipe = base.with_lora(init="loftq")  # quantize_4bit() may still follow: no error yet
    assert pipe.quantize_4bit().plan().trainable_params > 0
    monkeypatch.setattr(lorakit.training, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match=message):
        pipe.plan()
    with pytest.raises(ConfigError, match=message):
        pipe.train(tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        lk.Pipeline.from_config(pipe.to_config())


def test_loftq_needs_safetensors_weights_before_weights_load(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    import lorakit.training

    model_dir = tmp_path / "bin-model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    torch.save(load_file(f"{tiny_model_dir}/model.safetensors"), model_dir / "pytorch_model.bin")
    monkeypatch.setattr(lorakit.training, "load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    pipe = VARIANTS["loftq_4bit"](lk.Pipeline.from_model(str(model_dir))).with_dataset(
        ROWS, val_split=0.0, max_length=128
    )
    with pytest.raises(
        ConfigError, match=f"needs the base's full-precision weights as safetensors.*{model_dir}"
    ):
        pipe.train(tmp_path / "run")


def test_loftq_start_is_closer_to_the_full_precision_weights(tiny_model_dir):
    """At step 0, Q(W) + scale * B @ A is nearer W than Q(W), on every quantized linear layer; PEFT's own
    factors (scale ignored) are not, with alpha = 2 r."""
    import bitsandbytes as bnb
    from peft import get_peft_model
    from peft.tuners.lora import Linear4bit
    from safetensors.torch import load_file

    from lorakit.config import ModelSpec, QuantSpec
    from lorakit.methods.lora import apply_loftq
    from lorakit.models import load_base_model

    spec = LoraSpec(r=4, alpha=8, dropout=0.0, init="loftq")
    base = load_base_model(
        tiny_model_dir, ModelSpec(tiny_model_dir), dtype=torch.float32, quant=QuantSpec(bits=4)
    )
    model = get_peft_model(base, spec.to_peft_config())
    assert apply_loftq(model, tiny_model_dir) == 14  # 2 layers x 7 linear layers
    full = load_file(f"{tiny_model_dir}/model.safetensors")
    before = after = peft_style = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        w = full[name.removeprefix("base_model.model.") + ".weight"]
        q = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        update = module.lora_B["default"].weight @ module.lora_A["default"].weight
        scale = module.scaling["default"]
        layer_before = torch.linalg.norm(w - q).item()
        layer_after = torch.linalg.norm(w - (q + scale * update)).item()
        assert layer_after < 0.95 * layer_before, name
        before += layer_before**2
        after += layer_after**2
        peft_style += torch.linalg.norm(w - (q + scale * scale * update)).item() ** 2
    print(
        f"quantization error |W - Q(W)| = {before**0.5:.4f}, with LoftQ {after**0.5:.4f}, "
        f"PEFT's unscaled factors {peft_style**0.5:.4f}"
    )
    assert after**0.5 < 0.95 * before**0.5
    assert peft_style**0.5 > 0.99 * before**0.5


def test_unknown_ia3_target_lists_linear_modules(tiny_model_dir):
    pipe = lk.Pipeline.from_model(tiny_model_dir).with_ia3(targets=("qkv",))
    with pytest.raises(ConfigError, match="matches no module.*q_proj"):
        pipe.plan()


def test_optim_is_validated_and_round_trips(tiny_model_dir):
    with pytest.raises(ConfigError, match="optim.*paged_adamw_8bit.*got 'lion'"):
        lk.Pipeline.from_model(tiny_model_dir).with_training(optim="lion")
    pipe = _pipeline(tiny_model_dir, "ia3").with_training(optim="adamw_8bit")
    assert lk.Pipeline.from_config(pipe.to_config()).training.optim == "adamw_8bit"


def test_paged_optimizer_needs_cuda_before_weights_load(tiny_model_dir, tmp_path, monkeypatch):
    import lorakit.training

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the optimizer was checked")

    monkeypatch.setattr(lorakit.training, "load_base_model", no_weights)
    pipe = _pipeline(tiny_model_dir, "ia3").with_training(optim="paged_adamw_8bit", max_steps=1)
    with pytest.raises(ConfigError, match="optim='paged_adamw_8bit'.*needs a CUDA GPU.*adamw_torch"):
        pipe.train(tmp_path / "run")


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        (
            lambda p: p.with_adalora(tinit=1, tfinal=1),  # 4 rows, batch 4, 1 epoch: 1 step
            r"tinit=1, tfinal=1\): tinit \+ tfinal must be less than the run's 1 optimizer steps",
        ),
        (
            lambda p: p.freeze(train_last_n_layers=3),
            r"train_last_n_layers=3\): the model has 2 decoder layers",
        ),
        (lambda p: p.freeze(modules=("head",)), "no module of LlamaForCausalLM is named 'head'.*lm_head"),
    ],
)
def test_step_and_layer_rules_raise_before_weights_load(
    tiny_model_dir, tmp_path, monkeypatch, variant, message
):
    import lorakit.training

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the method was checked")

    monkeypatch.setattr(lorakit.training, "load_base_model", no_weights)
    pipe = variant(lk.Pipeline.from_model(tiny_model_dir)).with_dataset(ROWS, val_split=0.0, max_length=128)
    pipe = pipe.with_training(epochs=1, batch_size=4)
    with pytest.raises(ConfigError, match=message):
        pipe.plan()
    with pytest.raises(ConfigError, match=message):
        pipe.train(tmp_path / "run")


def test_describe_the_prompt_methods():
    assert PtuningSpec().describe() == "P-tuning num_virtual_tokens=20 encoder=mlp encoder_hidden_size=128"
    assert PtuningSpec(encoder_type="lstm", encoder_num_layers=2, encoder_dropout=0.1).describe() == (
        "P-tuning num_virtual_tokens=20 encoder=lstm encoder_hidden_size=128 encoder_num_layers=2 encoder_dropout=0.1"
    )
    assert PrefixTuningSpec(num_virtual_tokens=8).describe() == "prefix tuning num_virtual_tokens=8"
    assert PrefixTuningSpec(projection=True).describe() == (
        "prefix tuning num_virtual_tokens=20 projection encoder_hidden_size=model hidden size"
    )
    assert PtuningV2Spec(encoder_hidden_size=512).describe() == (
        "P-tuning v2 (deep prompt tuning) num_virtual_tokens=20 encoder_hidden_size=512"
    )
    assert PromptTuningSpec(init_text="Be brief.").describe() == (
        "prompt tuning num_virtual_tokens=20 init_text='Be brief.'"
    )


def test_peft_configs_of_the_prompt_methods():
    lstm = PtuningSpec(encoder_type="lstm", encoder_hidden_size=32).to_peft_config()
    assert (lstm.peft_type.value, lstm.encoder_reparameterization_type, lstm.encoder_hidden_size) == (
        "P_TUNING",
        "LSTM",
        32,
    )
    v2 = PtuningV2Spec(num_virtual_tokens=8, encoder_hidden_size=64).to_peft_config()
    assert (v2.peft_type.value, v2.prefix_projection, v2.encoder_hidden_size, v2.num_virtual_tokens) == (
        "PREFIX_TUNING",
        True,
        64,
        8,
    )
    assert PrefixTuningSpec().to_peft_config().prefix_projection is False
    text = PromptTuningSpec(init_text="Be brief.").to_peft_config(tokenizer_path="/models/x")
    assert (text.prompt_tuning_init.value, text.prompt_tuning_init_text, text.tokenizer_name_or_path) == (
        "TEXT",
        "Be brief.",
        "/models/x",
    )
    with pytest.raises(ConfigError, match="init_text=...\\) needs the base model's tokenizer"):
        PromptTuningSpec(init_text="Be brief.").to_peft_config()


def test_prefix_methods_turn_automatic_grad_checkpointing_off(tiny_model_dir):
    from lorakit.training import resolve_grad_checkpointing

    prefix = lk.Pipeline.from_model(tiny_model_dir).with_prefix_tuning(num_virtual_tokens=4)
    on_gpu, note = resolve_grad_checkpointing(prefix, "cuda")
    assert on_gpu is False and "gradient checkpointing off: prefix_tuning cannot train with it" in note
    assert resolve_grad_checkpointing(prefix.with_training(grad_checkpointing=False), "cuda") == (False, None)
    assert resolve_grad_checkpointing(prefix, "cpu") == (False, None)
    ptuning = lk.Pipeline.from_model(tiny_model_dir).with_ptuning()
    assert resolve_grad_checkpointing(ptuning, "cuda") == (True, None)
    assert "grad checkpoint  off: prefix_tuning cannot train with it" in prefix.explain()
    assert "grad checkpoint  off (CPU)" in ptuning.explain()


def test_prefix_methods_get_no_activation_checkpointing_from_fsdp(tiny_model_dir):
    from lorakit.distributed import training_arguments

    pipe = lk.Pipeline.from_model(tiny_model_dir)
    fsdp = training_arguments(pipe.with_ptuning_v2().distributed("fsdp"), layer_classes=["LlamaDecoderLayer"])
    assert "activation_checkpointing" not in fsdp["fsdp_config"]
    assert "gradient_checkpointing" not in fsdp and "gradient_checkpointing_kwargs" not in fsdp
    lora = training_arguments(pipe.with_lora().distributed("fsdp"), layer_classes=["LlamaDecoderLayer"])
    assert lora["fsdp_config"]["activation_checkpointing"] is True


def test_a_config_with_a_prefix_method_and_grad_checkpointing_is_refused(tiny_model_dir):
    config = _pipeline(tiny_model_dir, "ptuning_v2").to_config()
    config["training"]["grad_checkpointing"] = True
    with pytest.raises(
        ConfigError, match="method 'ptuning_v2' conflicts with training.grad_checkpointing=True"
    ):
        lk.Pipeline.from_config(config)


def test_plan_architecture_is_the_base_model_class(tiny_model_dir):
    for variant in ("prefix_tuning", "ptuning", "ia3"):
        assert _pipeline(tiny_model_dir, variant).plan().architecture == "LlamaForCausalLM"


class _FirstPrompt:
    def __init__(self):
        from transformers import TrainerCallback

        watch = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                watch.prompt = model.prompt_encoder["default"].embedding.weight.detach().clone()
                watch.words = model.get_input_embeddings().weight.detach().clone()

        self.callback = _CB()


@pytest.mark.parametrize(
    ("num_virtual_tokens", "text"),
    [(10, "Say hello."), (3, "Below is an instruction that describes a task.")],
    ids=["repeated", "cut"],
)
def test_prompt_tuning_starts_at_the_init_text_embeddings(
    tiny_model_dir, tiny_tokenizer, tmp_path, num_virtual_tokens, text
):
    ids = tiny_tokenizer(text)["input_ids"]  # what PEFT does: the tokenizer's own special tokens included
    assert 1 < len(ids) < num_virtual_tokens or len(ids) > num_virtual_tokens
    wanted = (ids * num_virtual_tokens)[:num_virtual_tokens]
    pipe = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_prompt_tuning(num_virtual_tokens=num_virtual_tokens, init_text=text)
        .with_dataset(ROWS, template="alpaca", val_split=0.0, max_length=128)
        .with_training(max_steps=1, batch_size=4)
    )
    watch = _FirstPrompt()
    pipe.train(tmp_path / "run", callbacks=[watch.callback])
    torch.testing.assert_close(watch.prompt, watch.words[torch.tensor(wanted)])
    assert pipe.plan().trainable_params == num_virtual_tokens * watch.words.shape[1]


OVERFIT = {
    "ptuning": lambda p: p.with_ptuning(num_virtual_tokens=8, encoder_hidden_size=32),
    "prefix_tuning": lambda p: p.with_prefix_tuning(num_virtual_tokens=8),
    "ptuning_v2": lambda p: p.with_ptuning_v2(num_virtual_tokens=8, encoder_hidden_size=32),
    "prompt_tuning_text": lambda p: p.with_prompt_tuning(num_virtual_tokens=8, init_text="Say hello."),
    "prompt_tuning": lambda p: p.with_prompt_tuning(num_virtual_tokens=8),
    "lora": lambda p: p.with_lora(r=4, alpha=8, dropout=0.0),
    "dora": VARIANTS["dora"],
    "rslora_pissa": VARIANTS["rslora_pissa"],
    "ia3": VARIANTS["ia3"],
    "loftq_4bit": VARIANTS["loftq_4bit"],
}
"""Every method's loss falls over 15 steps on the four rows (AdaLoRA, full and freeze: test above)."""


@pytest.mark.parametrize("variant", sorted(OVERFIT))
def test_loss_falls_when_over_fitting_four_rows(tiny_model_dir, tmp_path, variant):
    import json

    pipe = (
        OVERFIT[variant](lk.Pipeline.from_model(tiny_model_dir))
        .with_dataset(ROWS, template="alpaca", val_split=0.0, max_length=128)
        .with_training(
            max_steps=15, lr=5e-2, batch_size=4, logging_steps=1, warmup_ratio=0.0, scheduler="constant"
        )
    )
    result = pipe.train(tmp_path / variant)
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    losses = [row["loss"] for row in map(json.loads, lines) if "loss" in row]
    assert len(losses) == 15
    print(variant, losses[0], losses[-1])
    assert losses[-1] < losses[0]
