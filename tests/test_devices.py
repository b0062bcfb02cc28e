"""Precision, attention, optimizer and inference placement by device: simulated GPUs on the CPU, real ones
where CUDA exists (``@pytest.mark.gpu``)."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import lorakit as lk
import lorakit.plan
from lorakit.errors import ConfigError, MissingDependencyError
from lorakit.merging import logit_tolerance
from lorakit.models import (
    CPU_BF16_MIN_HIDDEN,
    DeviceInfo,
    current_device,
    decide_attention,
    decide_precision,
    inference_placement,
    resolve_precision,
)
from lorakit.plan import decide_liger, decide_optimizer

T4 = DeviceInfo("cuda", "Tesla T4", capability=(7, 5), total_memory=15_828_320_256)
A100 = DeviceInfo(
    "cuda", "NVIDIA A100-SXM4-40GB", capability=(8, 0), total_memory=42_505_273_344, native_bf16=True
)
CPU = DeviceInfo("cpu", "CPU")
CPU_BF16 = DeviceInfo("cpu", "CPU", native_bf16=True)
ROWS = [{"instruction": f"Say {word}.", "output": word} for word in ("hi", "yes", "no", "ok")]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --- the decision table ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "precision", "compute", "scaler", "reason"),
    [
        (
            T4,
            "fp16",
            "fp16",
            True,
            "fp16 with a gradient scaler (cuda (Tesla T4, compute capability 7.5, "
            "15.8 GB) has no native bf16: needs compute capability 8.0)",
        ),
        (
            A100,
            "bf16",
            "bf16",
            False,
            "bf16 (cuda (NVIDIA A100-SXM4-40GB, compute capability 8.0, 42.5 GB) has native bf16)",
        ),
        (CPU, "fp32", "fp32", False, "fp32 (CPU without native bf16)"),
        # bf16 autocast over fp32 weights: the compute dtype of weights (and 4-bit matmuls) stays fp32.
        (CPU_BF16, "bf16", "fp32", False, "bf16 (CPU with native bf16: bf16 autocast over fp32 weights)"),
    ],
    ids=["T4", "A100", "cpu", "cpu-native-bf16"],
)
def test_auto_precision_by_device(device, precision, compute, scaler, reason):
    decision = decide_precision("auto", device)
    assert (decision.precision, decision.compute_dtype, decision.grad_scaler) == (precision, compute, scaler)
    assert decision.reason == reason
    # Adapters never train in fp16 (the scaler refuses fp16 gradients); QLoRA adapters follow TRL's bf16 cast.
    assert decision.adapter_dtype(quantized=False) == "fp32"
    assert decision.adapter_dtype(quantized=True) == ("bf16" if precision == "bf16" else "fp32")


def test_explicit_precision_requests():
    assert decide_precision("fp32", A100).precision == "fp32"
    assert decide_precision("fp16", A100).reason == "fp16 (requested)"
    assert decide_precision("bf16", CPU_BF16).precision == "bf16"
    with pytest.raises(ConfigError, match=r"precision='bf16'\) needs a CUDA GPU .*native bf16"):
        decide_precision("bf16", CPU)
    with pytest.raises(ConfigError, match=r"precision='fp16'\) needs a CUDA GPU"):
        decide_precision("fp16", CPU_BF16)
    with pytest.warns(UserWarning, match="only emulates bf16"):
        emulated = decide_precision("bf16", T4)
    assert emulated.reason == "bf16 (requested; emulated on Tesla T4, slow)"


def _simulate_cuda(monkeypatch, name, capability, memory, *, native_bf16):
    """Patch torch.cuda's queries as a machine with this GPU answers them."""
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return True if including_emulation else native_bf16  # torch counts emulation by default

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda index=None: types.SimpleNamespace(total_memory=memory)
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (memory // 2, memory))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return calls


def test_current_device_reads_the_gpu_and_ignores_bf16_emulation(monkeypatch):
    calls = _simulate_cuda(monkeypatch, "Tesla T4", (7, 5), 15_828_320_256, native_bf16=False)
    assert current_device() == T4
    assert calls == [False]  # asked without emulation: the T4 answers False
    assert resolve_precision("auto") == "fp16"
    _simulate_cuda(monkeypatch, "NVIDIA A100-SXM4-40GB", (8, 0), 42_505_273_344, native_bf16=True)
    assert current_device() == A100 and resolve_precision("auto") == "bf16"


def test_explain_on_a_simulated_t4_names_gpu_precision_and_fast_paths(monkeypatch, tiny_model_dir):
    pytest.importorskip("bitsandbytes")  # imported on the real (CPU) machine: its import probes CUDA
    _simulate_cuda(monkeypatch, "Tesla T4", (7, 5), 15_828_320_256, native_bf16=False)
    pipeline = (
        lk.Pipeline.from_model(tiny_model_dir)
        .quantize_4bit()
        .with_dataset(ROWS, template="alpaca", val_split=0.0, max_length=64)
    )
    explicit = pipeline.with_training(optim="adamw_torch_fused").explain().splitlines()
    assert (
        "  optimizer        adamw_torch_fused; optim='auto' picks paged_adamw_8bit for QLoRA on a GPU"
        in explicit
    )
    assert pipeline.training.optim == "auto"  # the default
    lines = pipeline.explain().splitlines()
    assert "  device           cuda (Tesla T4, compute capability 7.5, 15.8 GB)" in lines
    assert (
        "  precision        fp16 with a gradient scaler (cuda (Tesla T4, compute capability 7.5, 15.8 GB) has "
        "no native bf16: needs compute capability 8.0); 4-bit compute dtype fp16; adapter fp32"
    ) in lines
    assert "  optimizer        paged_adamw_8bit (auto: QLoRA on a GPU)" in lines
    assert "  attention        sdpa (auto: flash-attention 2 needs a GPU of compute capability 8.0+)" in lines
    assert "  liger kernels    off (auto: liger_kernel not installed)" in lines
    assert "  grad checkpoint  on (CUDA)" in lines


def test_auto_precision_on_a_native_bf16_cpu_follows_the_model_size():
    # Below CPU_BF16_MIN_HIDDEN bf16 gains little over its casts (bench/precision_crossover.py).
    small = decide_precision("auto", CPU_BF16, hidden_size=CPU_BF16_MIN_HIDDEN - 1)
    assert (small.precision, small.reason) == (
        "fp32",
        f"fp32 (CPU with native bf16, but hidden size {CPU_BF16_MIN_HIDDEN - 1} < {CPU_BF16_MIN_HIDDEN}: "
        "bf16 would gain little over its casts)",
    )
    assert decide_precision("auto", CPU_BF16, hidden_size=576).precision == "bf16"  # SmolLM2-135M
    assert decide_precision("auto", CPU, hidden_size=4096).precision == "fp32"  # no native bf16: never slower
    assert decide_precision("auto", A100, hidden_size=64).precision == "bf16"  # the size rule is CPU-only


def test_explain_on_the_cpu_names_precision_and_why(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(lorakit.plan, "current_device", lambda: CPU_BF16)
    plan = lk.Pipeline.from_model(tiny_model_dir).with_dataset(ROWS, max_length=64).plan()
    assert (plan.device, plan.precision) == ("cpu", "fp32")  # the tiny model's hidden size is 64
    assert (
        "  precision        fp32 (CPU with native bf16, but hidden size 64 < 256: bf16 would gain little over "
        "its casts)"
    ) in plan.render().splitlines()
    assert (
        "  optimizer        adamw_torch_fused (auto: fused AdamW; paged 8-bit AdamW is for QLoRA on a GPU)"
        in plan.render().splitlines()
    )
    monkeypatch.setattr(lorakit.plan, "current_device", lambda: CPU)
    plan = lk.Pipeline.from_model(tiny_model_dir).with_dataset(ROWS, max_length=64).plan()
    assert "  precision        fp32 (CPU without native bf16)" in plan.render().splitlines()


# --- fast paths -------------------------------------------------------------------------------------------


def test_attention_choice(monkeypatch):
    monkeypatch.setattr(lorakit.models, "flash_attention_installed", lambda: True)
    assert decide_attention("auto", A100) == (
        "flash_attention_2",
        "flash_attention_2 (auto: installed, GPU supports it)",
    )
    assert decide_attention("auto", T4)[0] is None  # transformers' default: SDPA
    assert decide_attention("eager", T4) == ("eager", "eager (requested)")
    with pytest.raises(ConfigError, match="compute capability 8.0\\+ .* this run is on cuda \\(Tesla T4"):
        decide_attention("flash_attention_2", T4)
    monkeypatch.setattr(lorakit.models, "flash_attention_installed", lambda: False)
    assert decide_attention("auto", A100) == (None, "sdpa (auto: flash_attn not installed)")
    with pytest.raises(MissingDependencyError, match="pip install flash-attn"):
        decide_attention("flash_attention_2", A100)
    with pytest.raises(ConfigError, match="`attention` must be one of"):
        lk.Pipeline.from_model("m", attention="flash")


def test_optimizer_and_liger_choice(monkeypatch):
    four_bit = lk.Pipeline.from_model("m").quantize_4bit().quant
    assert decide_optimizer("auto", four_bit, T4) == (
        "paged_adamw_8bit",
        "paged_adamw_8bit (auto: QLoRA on a GPU)",
    )
    assert decide_optimizer("auto", four_bit, CPU)[0] == "adamw_torch_fused"
    assert decide_optimizer("auto", None, A100)[0] == "adamw_torch_fused"
    assert decide_optimizer("adafactor", four_bit, T4)[0] == "adafactor"
    assert decide_optimizer("paged_adamw_32bit", four_bit, T4) == ("paged_adamw_32bit", "paged_adamw_32bit")
    monkeypatch.setattr(lorakit.plan, "find_spec", lambda name: object() if name == "liger_kernel" else None)
    assert decide_liger(None, A100) == (True, "on (auto: liger_kernel installed, GPU run)")
    assert decide_liger(None, CPU) == (False, "off (auto: CPU run)")
    assert decide_liger(False, A100) == (False, "off (requested)")
    with pytest.raises(ConfigError, match="Liger kernels are Triton GPU kernels"):
        decide_liger(True, CPU)
    monkeypatch.setattr(lorakit.plan, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="pip install liger-kernel"):
        decide_liger(True, A100)


def test_training_takes_the_optimizer_from_the_plan_decision(monkeypatch, tiny_model_dir, tmp_path):
    """optim="auto" (the default) becomes the SFTConfig's optim through plan.decide_optimizer, on the device
    training sees; the pipeline the run records keeps "auto"."""
    pytest.importorskip("bitsandbytes")
    import lorakit.training as training

    pipeline = (
        lk.Pipeline.from_model(tiny_model_dir)
        .quantize_4bit()
        .with_dataset(ROWS, template="alpaca", val_split=0.0, max_length=64)
        .with_training(max_steps=1)
    )
    chosen = {}
    for name, device in (("t4", T4), ("cpu", CPU)):
        monkeypatch.setattr(training, "current_device", lambda device=device: device)
        run = training._resolve(pipeline, tmp_path / name, overwrite=False, resume=False)
        chosen[name] = (run.optim, training._training_args(run).optim, run.pipeline.training.optim)
    assert chosen == {
        "t4": ("paged_adamw_8bit", "paged_adamw_8bit", "auto"),
        "cpu": ("adamw_torch_fused", "adamw_torch_fused", "auto"),
    }


def test_liger_reaches_the_trainer_arguments_on_a_gpu(monkeypatch, tiny_model_dir):
    from lorakit.distributed import training_arguments

    pipeline = lk.Pipeline.from_model(tiny_model_dir).with_dataset(ROWS, template="alpaca")
    monkeypatch.setattr(lorakit.distributed, "current_device", lambda: A100)
    monkeypatch.setattr(lorakit.plan, "find_spec", lambda name: object() if name == "liger_kernel" else None)
    assert training_arguments(pipeline)["use_liger_kernel"] is True
    assert "use_liger_kernel" not in training_arguments(pipeline.with_training(liger=False))
    monkeypatch.setattr(lorakit.distributed, "current_device", lambda: CPU)
    assert "use_liger_kernel" not in training_arguments(pipeline)


# --- inference placement and merge tolerance ------------------------------------------------------------


def test_inference_placement():
    assert inference_placement(None, None, T4) == ("cuda", "fp16")
    assert inference_placement(None, None, A100) == ("cuda", "bf16")
    assert inference_placement(None, None, CPU_BF16) == ("cpu", "fp32")
    assert inference_placement("cpu", None, A100) == ("cpu", "fp32")
    assert inference_placement(None, "float16", A100) == ("cuda", "fp16")
    with pytest.raises(ConfigError, match="device='cuda' but no CUDA GPU is available"):
        inference_placement("cuda", None, CPU)
    with pytest.raises(ConfigError, match="dtype must be 'fp32', 'bf16', 'fp16'"):
        inference_placement(None, "int8", CPU)


def test_logit_tolerance_follows_the_dtype():
    assert logit_tolerance("float32", 10.0) == pytest.approx(0.0011)
    assert logit_tolerance("float16", 10.0) == pytest.approx(0.1)
    assert logit_tolerance("bfloat16", 10.0) == pytest.approx(0.675)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A PEFT LoRA adapter with non-zero B (so merging changes the weights), saved next to nothing else."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    path = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, config).save_pretrained(path)
    return path


def test_bf16_merge_is_checked_with_a_bf16_tolerance(adapter_dir):
    model = lk.InferenceModel.load(adapter_dir, template="alpaca", dtype="bf16")
    assert next(model.model.parameters()).dtype == torch.bfloat16 and model.device == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = model.merge(verify=True, verify_prompts=["Say hi.", "List three colours."]).merge_report
    assert report.merged_dtype == "bfloat16" and report.logits_match
    # The fp32 bound would call a correct 16-bit merge broken: the tolerance has to follow the dtype.
    assert report.max_logit_diff > 1e-3
    fp32_model = lk.InferenceModel.load(adapter_dir, template="alpaca")
    fp32 = fp32_model.merge(verify=True, verify_prompts=["Say hi."]).merge_report
    assert fp32.merged_dtype == "float32" and fp32.logits_match and fp32.logit_tolerance < 0.01


# --- real GPUs ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_gpu_precision_matches_the_capability():
    info = current_device()
    major, _minor = torch.cuda.get_device_capability()
    assert info.kind == "cuda" and info.native_bf16 == (major >= 8)
    assert resolve_precision("auto") == ("bf16" if major >= 8 else "fp16")


@pytest.mark.gpu
@needs_cuda
def test_gpu_inference_generate_and_merge(adapter_dir):
    model = lk.InferenceModel.load(adapter_dir, template="alpaca")
    assert model.device == "cuda"
    expected = torch.bfloat16 if current_device().native_bf16 else torch.float16
    assert next(model.model.parameters()).dtype == expected
    assert isinstance(model.generate("Say hi.", max_new_tokens=4), str)
    assert len(model.generate(["Say hi.", "Say no."], max_new_tokens=4)) == 2
    assert isinstance("".join(model.stream("Say hi.", max_new_tokens=4)), str)
    merged = model.merge(verify=True)
    assert merged.device == "cuda" and merged.merge_report.logits_match


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_gpu_smoke_script_exits_with_a_clear_message_without_a_gpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "gpu_smoke.py needs a CUDA GPU and none is available" in out.stderr
    assert "Runtime > Change runtime type > T4 GPU" in out.stderr
