"""The plan's memory numbers against what loading, optimizing and back-propagating actually allocate."""

from __future__ import annotations

import contextlib
import re
import sys

import pytest
import torch

import lorakit as lk
from lorakit.memory import MemoryEstimate, activation_bytes, activation_shape, measured_weight_bytes

ROWS = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(20)]
QUANTS = {
    "fp32": lambda p: p,
    "nf4+dq": lambda p: p.quantize_4bit(),
    "nf4": lambda p: p.quantize_4bit(double_quant=False),
    "int8": lambda p: p.quantize_8bit(),
}


@contextlib.contextmanager
def saving(model):
    """Bytes of each storage autograd saves for the backward pass inside the block (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def _trained_model(pipeline):
    """The PEFT model as lorakit trains it on a CPU: LoRA dropout with bool masks (lorakit.fused.MaskDropout)."""
    from peft import get_peft_model

    from lorakit.fused import use_mask_dropout

    model = get_peft_model(_load(pipeline), pipeline.resolved_method.to_peft_config()).train()
    assert use_mask_dropout(model) > 0
    return model


def _load(pipeline):
    from lorakit.models import load_base_model, resolve_model_path

    return load_base_model(
        resolve_model_path(pipeline.model), pipeline.model, dtype=torch.float32, quant=pipeline.quant
    )


@pytest.mark.parametrize("quant", list(QUANTS))
def test_weight_estimate_matches_the_loaded_model(tiny_model_dir, quant):
    pipeline = QUANTS[quant](lk.Pipeline.from_model(tiny_model_dir))
    estimate = pipeline.plan().memory.weights
    measured = measured_weight_bytes(_load(pipeline))
    # get_memory_footprint() counts parameters and buffers only, not bitsandbytes' absmax / scales.
    assert abs(estimate / measured["footprint"] - 1) < 0.10
    assert (measured["quant_constants"] > 0) == (quant != "fp32")
    assert estimate == measured["total"]  # every tensor the loader allocates, byte for byte


@pytest.mark.parametrize("quant", ["none", "nf4+dq", "int8"])
def test_bf16_weight_estimate_includes_the_kbit_upcast(tiny_model_dir, quant):
    from peft import prepare_model_for_kbit_training

    pipeline = lk.Pipeline.from_model(tiny_model_dir, dtype="bfloat16")
    pipeline = {"none": pipeline, "nf4+dq": pipeline.quantize_4bit(), "int8": pipeline.quantize_8bit()}[quant]
    estimate = pipeline.plan().memory.weights
    model = _load(pipeline)
    if quant == "none":
        assert estimate == measured_weight_bytes(model)["total"]
        return
    # train() runs prepare_model_for_kbit_training, which upcasts the unquantized bf16 weights to fp32.
    loaded = measured_weight_bytes(model)["total"]
    prepared = measured_weight_bytes(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False))
    assert estimate == prepared["total"] > loaded


def test_quantization_shrinks_weights_in_the_expected_order(tiny_model_dir):
    base = lk.Pipeline.from_model(tiny_model_dir)
    weights = {name: make(base).plan().memory.weights for name, make in QUANTS.items()}
    assert weights["nf4"] < weights["int8"] < weights["fp32"]
    # Double quantization stores absmax in 8 bits but adds a 1 kB code per layer: on 64-wide layers it costs.
    assert weights["nf4+dq"] != weights["nf4"]


def _optimizer_state_bytes(optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for key, t in state.items()
        if isinstance(t, torch.Tensor) and key not in ("step", "qmap1", "qmap2")
    )


def _trainable_after_one_step(pipeline, optimizer_class):
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_load(pipeline), pipeline.resolved_method.to_peft_config())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_class(params, lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return params, optimizer


def test_gradients_and_adamw_state_are_measured_exactly(tiny_model_dir):
    pipeline = lk.Pipeline.from_model(tiny_model_dir).with_lora(r=8)
    plan = pipeline.plan()
    memory = plan.memory
    assert memory.adapter == memory.gradients == plan.trainable_params * 4
    assert memory.optimizer == plan.trainable_params * 8
    params, optimizer = _trainable_after_one_step(pipeline, torch.optim.AdamW)
    assert sum(p.grad.numel() * p.grad.element_size() for p in params) == memory.gradients
    assert _optimizer_state_bytes(optimizer) == memory.optimizer


def test_full_finetuning_counts_weights_once(tiny_model_dir):
    lora = lk.Pipeline.from_model(tiny_model_dir).with_lora(r=8).plan().memory
    plan = lk.Pipeline.from_model(tiny_model_dir).full_finetune().plan()
    memory = plan.memory
    assert plan.trainable_params == plan.total_params
    # no adapter: `adapter` is the trained part of the model's weights, `weights` the frozen part (buffers)
    assert memory.weights + memory.adapter == lora.weights
    assert memory.gradients == plan.trainable_params * 4
    assert memory.optimizer == plan.trainable_params * 8
    frozen = lk.Pipeline.from_model(tiny_model_dir).freeze(train_last_n_layers=1).plan()
    assert frozen.memory.weights + frozen.memory.adapter == lora.weights
    assert frozen.memory.gradients == frozen.trainable_params * 4 < memory.gradients
    assert "trained weights" in plan.render() and "adapter" not in plan.memory.render()


def test_8bit_adamw_shrinks_optimizer_state_as_bitsandbytes_allocates_it(tiny_model_dir):
    import bitsandbytes as bnb

    # r=64 makes the q/o/gate/up LoRA matrices 4096 values: bitsandbytes keeps tensors under 4096 in fp32.
    pipeline = lk.Pipeline.from_model(tiny_model_dir).with_lora(r=64)
    full = pipeline.plan().memory
    eight = pipeline.with_training(optim="adamw_8bit").plan().memory
    assert eight.optimizer < full.optimizer / 2
    assert (eight.weights, eight.gradients, eight.activations) == (
        full.weights,
        full.gradients,
        full.activations,
    )
    _, optimizer = _trainable_after_one_step(pipeline, bnb.optim.AdamW8bit)
    assert _optimizer_state_bytes(optimizer) == eight.optimizer
    # With the default r=16 every LoRA tensor of the tiny model is under 4096 values: no saving, as measured.
    small = lk.Pipeline.from_model(tiny_model_dir).with_lora(r=16)
    assert small.with_training(optim="adamw_8bit").plan().memory.optimizer == small.plan().memory.optimizer


def test_other_optimizers(tiny_model_dir):
    pipeline = lk.Pipeline.from_model(tiny_model_dir).with_lora(r=8)
    adamw = pipeline.plan().memory.optimizer
    assert pipeline.with_training(optim="sgd").plan().memory.optimizer == 0
    assert 0 < pipeline.with_training(optim="adafactor").plan().memory.optimizer < adamw / 2


def test_activation_estimate_against_the_tensors_autograd_saves(tiny_model_dir):
    pipeline = lk.Pipeline.from_model(tiny_model_dir)
    model = _trained_model(pipeline)
    batch, seq = 4, 256
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with saving(model) as saved:
        output = model(input_ids=ids, labels=ids)
    held = sum(saved.values()) + output.logits.numel() * output.logits.element_size()
    estimate = activation_bytes(
        tokens=batch * seq, **activation_shape(model.config), grad_checkpointing=False, mask_bytes=1
    )
    assert abs(estimate / held - 1) < 0.15


def test_fused_loss_activation_estimate_against_the_tensors_autograd_saves(tiny_model_dir):
    # With the fused loss no logits are held for the backward pass: only the body's activations and the fp32
    # gradient of the hidden states (the one logits chunk is transient, counted on top as a peak).
    from lorakit.fused import fused_linear_cross_entropy
    from lorakit.memory import FUSED_CHUNK_TOKENS_CPU, LOGITS_FACTOR

    pipeline = lk.Pipeline.from_model(tiny_model_dir)
    model = _trained_model(pipeline)
    batch, seq = 4, 256
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    base = model.get_base_model()
    with saving(model) as saved:
        hidden = base.model(input_ids=ids).last_hidden_state
        fused_linear_cross_entropy(hidden, base.lm_head.weight, ids)
    shape = activation_shape(model.config)
    estimate = activation_bytes(
        tokens=batch * seq,
        **shape,
        grad_checkpointing=False,
        fused_loss=True,
        fused_chunk=FUSED_CHUNK_TOKENS_CPU,
        mask_bytes=1,
    )
    # a CPU's chunk: 128 positions (the plan below is for a CPU too)
    transient = LOGITS_FACTOR * min(batch * seq, FUSED_CHUNK_TOKENS_CPU) * shape["vocab"] * 4
    assert abs((estimate - transient) / sum(saved.values()) - 1) < 0.15
    unfused = activation_bytes(tokens=batch * seq, **shape, grad_checkpointing=False, mask_bytes=1)
    assert unfused - estimate == LOGITS_FACTOR * batch * seq * shape[
        "vocab"
    ] * 4 - transient - batch * seq * (shape["hidden"] * 4)
    # The plan uses it for SFT runs with the fused loss on (the default), not with fused_loss=False.
    plan_pipeline = lk.Pipeline.from_model(tiny_model_dir).with_dataset(ROWS, max_length=256)
    on = plan_pipeline.plan().memory
    off = plan_pipeline.with_training(fused_loss=False).plan().memory
    assert off.activations - on.activations == LOGITS_FACTOR * 4 * 256 * shape["vocab"] * 4 - transient - (
        4 * 256 * shape["hidden"] * 4
    )


@pytest.mark.parametrize("stored_bf16", [False, True], ids=["fp32-weights", "bf16-frozen-weights"])
def test_cpu_bf16_autocast_activation_estimate_against_the_tensors_autograd_saves(
    tiny_model_dir, stored_bf16
):
    # Under CPU autocast the matmul outputs are bf16 but the residual stream and norms stay fp32. Over fp32
    # weights autocast saves a bf16 copy of each frozen matmul weight for the backward pass; with the frozen
    # weights stored in bf16 (lorakit.fused.store_frozen_bf16) there is no copy.
    from lorakit.fused import store_frozen_bf16
    from lorakit.memory import CPU_AUTOCAST_BYTES, _autocast_weight_copies

    pipeline = lk.Pipeline.from_model(tiny_model_dir)
    model = _trained_model(pipeline)
    if stored_bf16:
        assert store_frozen_bf16(model) == 7 * model.config.num_hidden_layers
    batch, seq = 4, 256
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        saving(model) as saved,
    ):
        model.get_base_model().model(input_ids=ids)
    shape = {k: v for k, v in activation_shape(model.config).items() if k != "vocab"}
    body = activation_bytes(
        tokens=batch * seq,
        **shape,
        vocab=0,
        grad_checkpointing=False,
        element_bytes=CPU_AUTOCAST_BYTES,
        mask_bytes=1,
    )
    copies = _autocast_weight_copies(model, stored_bf16=stored_bf16)
    assert (copies == 0) == stored_bf16
    assert abs((body + copies) / sum(saved.values()) - 1) < 0.15


def test_activations_scale_with_batch_and_checkpointing(tiny_model_dir):
    pipeline = lk.Pipeline.from_model(tiny_model_dir).with_dataset(ROWS, max_length=256)
    one = pipeline.with_training(batch_size=1, grad_checkpointing=False).plan().memory
    four = pipeline.with_training(batch_size=4, grad_checkpointing=False).plan().memory
    ckpt = pipeline.with_training(batch_size=4, grad_checkpointing=True).plan().memory
    # linear in the batch, but for the fused loss's one chunk of logits (128 positions on a CPU: both hold more)
    from transformers import AutoConfig

    from lorakit.memory import FUSED_CHUNK_TOKENS_CPU, LOGITS_FACTOR

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    chunk = LOGITS_FACTOR * FUSED_CHUNK_TOKENS_CPU * vocab * 4
    assert four.activations - chunk == pytest.approx(4 * (one.activations - chunk), rel=1e-6)
    assert ckpt.activations < four.activations
    assert (four.batch_size, four.seq_len) == (4, 256)


def test_render_shows_the_memory_line(tiny_model_dir):
    pipeline = lk.Pipeline.from_model(tiny_model_dir).quantize_4bit().with_training(batch_size=2)
    plan = pipeline.with_dataset(ROWS, max_length=128).plan()
    assert isinstance(plan.memory, MemoryEstimate)
    assert plan.memory.total == sum(
        (plan.memory.weights, plan.memory.adapter, plan.memory.gradients, plan.memory.optimizer)
    ) + (plan.memory.activations)
    line = next(line for line in plan.render().splitlines() if line.lstrip().startswith("memory"))
    assert re.fullmatch(
        r"  memory +weights [\d.]+ kB, adapter [\d.]+ kB, grads [\d.]+ kB, optimizer [\d.]+ kB, "
        r"activations ~[\d.]+ MB \(batch 2 x 128\) = ~[\d.]+ MB; peak RSS up to ~[\d.]+ MB \(CPU allocator, x2\)",
        line,
    ), line
    # on a CPU the resident bound is the estimate times the allocator factor measured by bench/scaling.py
    from lorakit.memory import CPU_RSS_FACTOR

    assert plan.memory.allocator_factor == CPU_RSS_FACTOR
    assert plan.memory.resident == int(plan.memory.total * CPU_RSS_FACTOR)


def test_explain_with_memory_loads_no_weights(tiny_model_dir, monkeypatch):
    import safetensors.torch
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("explain() loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    text = lk.Pipeline.from_model(tiny_model_dir).quantize_4bit().with_dataset(ROWS).explain()
    assert "memory           weights" in text


@pytest.mark.slow
def test_smollm2_weight_estimate_matches_the_loaded_model():
    # 8-bit: quantizing SmolLM2 to 4 bits on CPU takes ~30 s more; bench/plan_memory.py measures all layouts.
    pipeline = lk.Pipeline.from_model("smollm2-135m").quantize_8bit()
    memory = pipeline.plan().memory
    measured = measured_weight_bytes(_load(pipeline))
    assert memory.weights == measured["total"]
    assert abs(memory.weights / measured["footprint"] - 1) < 0.10
    # The tied embedding / head stays fp32 (49152 x 576 x 4 bytes) and is counted once.
    assert 49152 * 576 * 4 < memory.weights < 2 * 49152 * 576 * 4


# --- gradient checkpointing: one decision, shown by explain() ----------------------------------------------


@pytest.mark.parametrize(
    ("requested", "method", "device", "strategy", "expected"),
    [
        (None, "lora", "cpu", None, (False, False, "off (CPU)", None)),
        (None, "lora", "cuda", None, (True, True, "on (CUDA)", None)),
        (True, "lora", "cpu", None, (True, True, "on (grad_checkpointing=True)", None)),
        (False, "lora", "cuda", None, (False, False, "off (grad_checkpointing=False)", None)),
        (None, "ptuning", "cuda", "ddp", (True, True, "on (CUDA)", None)),
        (
            None,
            "lora",
            "cuda",
            "fsdp",
            (True, False, "on (CUDA): FSDP's activation checkpointing, not the Trainer's", None),
        ),
        (False, "lora", "cuda", "fsdp", (False, False, "off (grad_checkpointing=False)", None)),
        (None, "prefix_tuning", "cpu", None, (False, False, "off: prefix_tuning cannot train with it", None)),
        (False, "ptuning_v2", "cuda", None, (False, False, "off: ptuning_v2 cannot train with it", None)),
        (
            None,
            "prefix_tuning",
            "cuda",
            "fsdp",
            (
                False,
                False,
                "off: prefix_tuning cannot train with it",
                "gradient checkpointing off: prefix_tuning",
            ),
        ),
    ],
)
def test_decide_grad_checkpointing(requested, method, device, strategy, expected):
    from lorakit.config import TrainSpec
    from lorakit.distributed import DistributedSpec
    from lorakit.methods import METHODS
    from lorakit.plan import decide_grad_checkpointing

    distribution = DistributedSpec(strategy) if strategy else None
    decision = decide_grad_checkpointing(
        TrainSpec(grad_checkpointing=requested), METHODS[method](), device, distribution
    )
    on, trainer, reason, note = expected
    assert (decision.on, decision.trainer, decision.reason) == (on, trainer, reason)
    if note is None:
        assert decision.note is None
    else:
        assert decision.note.startswith(note) and "see docs/methods.md" in decision.note


def test_explain_shows_the_grad_checkpointing_decision(tiny_model_dir, monkeypatch):
    import lorakit.models
    import lorakit.plan

    pipeline = lk.Pipeline.from_model(tiny_model_dir).with_dataset(ROWS, max_length=64)
    plan = pipeline.plan()
    assert plan.grad_checkpointing.reason == "off (CPU)"
    assert "  grad checkpoint  off (CPU)" in plan.render().splitlines()
    assert "activations for full-length sequences, gradient checkpointing off" in " ".join(plan.memory.notes)
    prefix = pipeline.with_prefix_tuning(num_virtual_tokens=4).plan()
    assert "  grad checkpoint  off: prefix_tuning cannot train with it" in prefix.render().splitlines()
    # On a GPU the default turns it on, and the memory estimate follows the same decision.
    gpu = lorakit.models.DeviceInfo("cuda", "Tesla T4", capability=(7, 5))  # a simulated GPU, fp32 requested
    monkeypatch.setattr(lorakit.plan, "current_device", lambda: gpu)
    pipeline = pipeline.with_training(precision="fp32")
    on_gpu = pipeline.plan()
    assert on_gpu.grad_checkpointing.reason == "on (CUDA)"
    assert on_gpu.memory.activations < plan.memory.activations
    prefix_gpu = pipeline.with_prefix_tuning(num_virtual_tokens=4).plan()
    assert prefix_gpu.grad_checkpointing.on is False
    assert "gradient checkpointing off" in " ".join(prefix_gpu.memory.notes)


# Whether glibc served each block of the given sizes (MiB) with its own mmap: the IS_MMAPPED bit (2) of the
# chunk's size field, the word before the pointer malloc returns; each block is freed before the next one.
_MMAPPED_BLOCKS = """
import ctypes, sys
from lorakit.memory import pin_mmap_threshold
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "pin":
    print(pin_mmap_threshold())
def mmapped(size):
    ptr = libc.malloc(size)
    flag = bool(ctypes.c_size_t.from_address(ptr - 8).value & 2)
    libc.free(ptr)
    return flag
print(*[mmapped(int(mib) << 20) for mib in sys.argv[2:]])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_pinning_glibcs_mmap_threshold_is_opt_in(tiny_model_dir, tmp_path, monkeypatch):
    # Pinned, every activation block of 2 MiB or more is a fresh mmap (less RSS, 1.2x slower steps on SmolLM2), so train()
    # leaves glibc alone; the function works when called (in a child process: the setting is process-wide).
    import subprocess

    import lorakit.memory
    import lorakit.training

    def blocks(*args: str) -> list[str]:
        command = [sys.executable, "-c", _MMAPPED_BLOCKS, *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()

    # unpinned: after one 20 MiB block is freed, glibc raises its threshold and serves the next from the heap
    assert blocks("none", "20", "20") == ["True", "False"]
    # pinned at 2 MiB: 3 MiB blocks stay mmapped after a free, 1 MiB blocks come from the heap
    assert blocks("pin", "3", "3", "1") == ["True", "True", "True", "False"]
    calls = []
    monkeypatch.setattr(lorakit.memory, "pin_mmap_threshold", lambda: calls.append(1) or True)
    (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=2, targets=("q_proj",))
        .with_dataset(ROWS, template="alpaca", val_split=0, max_length=64, cache=False)
        .with_training(max_steps=1, batch_size=2, logging_steps=1)
        .train(tmp_path / "run")
    )
    assert calls == [] and not hasattr(lorakit.training, "pin_mmap_threshold")


@pytest.mark.parametrize("threshold", [0, -1, 64 * 2**20, True, 1.5, "2MB"])
def test_pin_mmap_threshold_names_the_range_it_takes(threshold):
    from lorakit.errors import ConfigError
    from lorakit.memory import pin_mmap_threshold

    with pytest.raises(ConfigError, match=r"between 1 and 33554432 \(32 MiB, glibc's largest\)"):
        pin_mmap_threshold(threshold)


def test_the_plan_counts_the_cpu_loss_chunk_only_where_the_head_is_frozen(tiny_model_dir, monkeypatch):
    # Full fine-tuning trains the LM head: the fused loss keeps chunks of 1024 positions there (a vocabulary x
    # hidden gradient per chunk), so the CPU chunk size moves the LoRA plan and leaves the full one alone.
    import lorakit.memory
    from lorakit.memory import LOGITS_FACTOR

    pipeline = (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_dataset(ROWS, max_length=256)
        .with_training(batch_size=4, grad_checkpointing=False)
    )
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    lora, full = pipeline.plan().memory, pipeline.full_finetune().plan().memory
    monkeypatch.setattr(lorakit.memory, "FUSED_CHUNK_TOKENS_CPU", 64)
    assert lora.activations - pipeline.plan().memory.activations == LOGITS_FACTOR * (128 - 64) * vocab * 4
    assert pipeline.full_finetune().plan().memory.activations == full.activations
