"""Offline fixtures: a tiny Llama and a tokenizer trained locally, written once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
if "LORAKIT_CACHE_DIR" not in os.environ:  # keep the token cache of test runs out of the user cache
    import tempfile

    os.environ["LORAKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="lorakit-test-cache-")

from typing import Any

import pytest

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "### Instruction:\n### Input:\n### Response:\n",
    "[INST] <<SYS>> <</SYS>> [/INST]",
    "system user assistant",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "What is the capital of France? Paris. Route this ticket to billing, shipping, technical or account.",
    "hello world, how are you today? I am fine, thank you.",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (no network), with llama-style <s>/</s> and chatml specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    # Like Llama tokenizers, prepend <s> when add_special_tokens=True.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def build_tiny_model(path: Any, tokenizer: Any = None, *, max_position_embeddings: int = 512) -> str:
    """A 2-layer Llama (hidden 64) with the tiny tokenizer, saved to ``path`` (also used by bench/ and scripts/)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        # A frozen head with the default std (0.02) caps logits near 1 after RMSNorm, so LoRA could not make
        # any token likely; a wider init lets the tiny model over-fit a handful of rows in a few steps.
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory, tiny_tokenizer):
    """A 1-layer Llama as wide as CPU bf16 autocast needs (``models.CPU_BF16_MIN_HIDDEN``), tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.models import CPU_BF16_MIN_HIDDEN

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=CPU_BF16_MIN_HIDDEN,
        intermediate_size=CPU_BF16_MIN_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("wide-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-layer Llama (hidden 64) with the tiny tokenizer, saved as a local model directory."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)
