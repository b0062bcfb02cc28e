"""The memory numbers of ``Pipeline.plan()`` against measurements, on the tiny Llama and SmolLM2-135M.

    PYTHONPATH=$PWD python bench/plan_memory.py                     # tiny + smollm2, weights and activations
    PYTHONPATH=$PWD python bench/plan_memory.py --models tiny --skip-activations

Weights: for fp32, 4-bit (nf4 with and without double quantization, fp4) and 8-bit, each load runs in its own
process with lorakit's loader (``lorakit.models.load_base_model``, on CPU) and reports
``model.get_memory_footprint()`` (parameters and buffers) and the bitsandbytes constants it does not count
(``lorakit.memory.measured_weight_bytes``); the plan's estimate is computed on the meta device without
loading anything. Ratios are estimate / measured.

Activations: a LoRA model (lorakit's default LoRA, all linear layers) in fp32 runs one forward and backward on
random token ids with labels, in its own process, after a short warm-up step. Measured: the bytes of the tensors
autograd saves for the backward pass (``torch.autograd.graph.saved_tensors_hooks``, each storage once,
parameters excluded), split into the decoder layers' and the loss's (last dimension = vocabulary); the peak of
live allocated bytes during the step (torch profiler memory events replayed in time order: activations plus
the backward's transient buffers); and the growth of peak RSS over the RSS before the step (also what the
allocator keeps). The ``LAYER_PER_*`` / ``LOGITS_FACTOR`` constants in ``lorakit/memory.py`` come from the
saved bytes.
Results: ``bench/results/plan_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, emit, machine, model_dir, run_worker  # noqa: E402

QUANTS = {
    "fp32": {},
    "nf4+dq": {"bits": 4, "quant_type": "nf4", "double_quant": True},
    "nf4": {"bits": 4, "quant_type": "nf4", "double_quant": False},
    "fp4+dq": {"bits": 4, "quant_type": "fp4", "double_quant": True},
    "int8": {"bits": 8},
}
# (batch, sequence length, gradient checkpointing) per model; SmolLM2's shapes keep the step under a minute.
SHAPES = {
    "tiny": [(4, 256, False), (8, 512, False), (8, 512, True)],
    "smollm2": [(1, 256, False), (1, 512, False), (1, 512, True)],
    "wide": [(4, 256, False)],
    "check": [(4, 256, False)],
}
# Two more Llama shapes for the activation fit (tiny tokenizer, random weights): "wide" has a wide MLP and full
# key/value heads; "check" was left out of the fit and checks it.
EXTRA_MODELS = {
    "wide": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4},
    "check": {
        "hidden_size": 96,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
    },
}


def extra_model_dir(name: str, root: Path) -> str:
    """A random-weight Llama of ``EXTRA_MODELS[name]`` with the tiny tokenizer, written under ``root``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = root / name
    if not (path / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(model_dir("tiny", root))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            **EXTRA_MODELS[name],
        )
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def pipeline_for(path: str, quant: dict[str, Any]) -> Any:
    import lorakit as lk

    p = lk.Pipeline.from_model(path)
    if quant.get("bits") == 4:
        p = p.quantize_4bit(quant_type=quant["quant_type"], double_quant=quant["double_quant"])
    elif quant.get("bits") == 8:
        p = p.quantize_8bit()
    return p


def weights_worker(path: str, quant_name: str) -> dict[str, Any]:
    import torch

    from lorakit.memory import measured_weight_bytes
    from lorakit.models import load_base_model, resolve_model_path

    p = pipeline_for(path, QUANTS[quant_name])
    model = load_base_model(resolve_model_path(p.model), p.model, dtype=torch.float32, quant=p.quant)
    return measured_weight_bytes(model)


def _rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def activations_worker(path: str, batch: int, seq: int, grad_ckpt: bool) -> dict[str, Any]:
    import torch
    from peft import get_peft_model

    from lorakit.fused import use_mask_dropout
    from lorakit.models import load_base_model, resolve_model_path

    torch.manual_seed(0)
    p = pipeline_for(path, {})
    model = load_base_model(resolve_model_path(p.model), p.model, dtype=torch.float32)
    model = get_peft_model(model, p.resolved_method.to_peft_config())
    use_mask_dropout(model)  # as train() does on a CPU: bool dropout masks
    if grad_ckpt:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    vocab = model.config.vocab_size

    def step(b: int, s: int, record: dict[str, int] | None) -> None:
        ids = torch.randint(0, vocab, (b, s))
        params = {t.untyped_storage().data_ptr() for t in model.parameters()}
        seen: set[int] = set()

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if record is not None and ptr not in params and ptr not in seen:
                seen.add(ptr)
                kind = "logits" if tensor.dim() > 0 and tensor.shape[-1] == vocab else "layers"
                record[kind] += storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=False)

    step(batch, 32, None)  # warm-up: kernels, allocator pools, gradient buffers
    record = {"layers": 0, "logits": 0}
    before, peak_before = _rss(), _peak_rss()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step(batch, seq, record)
    peak = _peak_rss()
    # The allocator's view: replay the profiler's allocation / free events in time order.
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak_allocated = 0
    for _, nbytes in events:
        live += nbytes
        peak_allocated = max(peak_allocated, live)
    text = model.config.get_text_config()
    return {
        "batch": batch,
        "seq": seq,
        "grad_checkpointing": grad_ckpt,
        "hidden": text.hidden_size,
        "layers": text.num_hidden_layers,
        "vocab": vocab,
        "saved_layers_bytes": record["layers"],
        "saved_logits_bytes": record["logits"],
        "peak_allocated_bytes": peak_allocated,
        # None when the process peaked earlier (while loading) than in the step.
        "peak_rss_growth_bytes": peak - before if peak > peak_before else None,
    }


def weights_rows(name: str, path: str) -> list[dict[str, Any]]:
    rows = []
    for quant_name, quant in QUANTS.items():
        plan = pipeline_for(path, quant).plan()
        assert plan.memory is not None
        measured = run_worker(Path(__file__), ["weights", path, quant_name])
        estimate = plan.memory.weights
        rows.append(
            {
                "model": name,
                "quantization": quant_name,
                "estimate_bytes": estimate,
                "footprint_bytes": measured["footprint"],
                "quant_constants_bytes": measured["quant_constants"],
                "ratio_to_footprint": round(estimate / measured["footprint"], 4),
                "ratio_to_all_tensors": round(estimate / measured["total"], 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def activation_rows(name: str, path: str) -> list[dict[str, Any]]:
    from transformers import AutoConfig

    from lorakit.memory import activation_bytes, activation_shape

    rows = []
    for batch, seq, grad_ckpt in SHAPES[name]:
        m = run_worker(Path(__file__), ["activations", path, str(batch), str(seq), str(int(grad_ckpt))])
        tokens = batch * seq
        shape = activation_shape(AutoConfig.from_pretrained(path))
        estimate = activation_bytes(tokens=tokens, **shape, grad_checkpointing=grad_ckpt, mask_bytes=1)
        layers_estimate = activation_bytes(
            tokens=tokens, **{**shape, "vocab": 0}, grad_checkpointing=grad_ckpt, mask_bytes=1
        )
        # What the estimate covers: the saved tensors plus the logits the model output holds.
        held = m["saved_layers_bytes"] + m["saved_logits_bytes"] + tokens * m["vocab"] * 4
        m.update(
            model=name,
            layer_values_per_token_measured=round(m["saved_layers_bytes"] / (tokens * m["layers"] * 4), 1),
            layer_values_per_token_used=round(layers_estimate / (tokens * m["layers"] * 4), 1),
            logits_factor_measured=round(m["saved_logits_bytes"] / (tokens * m["vocab"] * 4), 2),
            estimate_bytes=estimate,
            held_bytes=held,
            ratio_to_held=round(estimate / held, 3),
            ratio_to_peak_allocated=round(estimate / m["peak_allocated_bytes"], 3),
        )
        rows.append(m)
        print(json.dumps(m), flush=True)
    return rows


def table(weights: list[dict[str, Any]], activations: list[dict[str, Any]]) -> str:
    lines = [
        f"{'model':8} {'quant':7} {'estimate MB':>12} {'footprint MB':>13} {'+constants MB':>14} "
        f"{'est/footprint':>14} {'est/all':>8}"
    ]
    for r in weights:
        lines.append(
            f"{r['model']:8} {r['quantization']:7} {r['estimate_bytes'] / 1e6:12.3f} "
            f"{r['footprint_bytes'] / 1e6:13.3f} {r['quant_constants_bytes'] / 1e6:14.3f} "
            f"{r['ratio_to_footprint']:14.4f} {r['ratio_to_all_tensors']:8.4f}"
        )
    if activations:
        lines.append("")
        lines.append(
            f"{'model':8} {'shape':>9} {'gc':>3} {'held MB':>9} {'estimate MB':>12} {'peak alloc MB':>14} "
            f"{'peak RSS +MB':>13} {'est/held':>9} {'est/peak alloc':>15}"
        )
        for r in activations:
            shape = f"{r['batch']}x{r['seq']}"
            rss = r["peak_rss_growth_bytes"]
            lines.append(
                f"{r['model']:8} {shape:>9} {'on' if r['grad_checkpointing'] else 'off':>3} "
                f"{r['held_bytes'] / 1e6:9.1f} {r['estimate_bytes'] / 1e6:12.1f} "
                f"{r['peak_allocated_bytes'] / 1e6:14.1f} {rss / 1e6 if rss else float('nan'):13.1f} "
                f"{r['ratio_to_held']:9.3f} {r['ratio_to_peak_allocated']:15.3f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument(
        "--fit-models", nargs="*", default=list(EXTRA_MODELS), help="extra shapes for activations only"
    )
    parser.add_argument("--skip-activations", action="store_true")
    parser.add_argument("--output", default=str(RESULTS / "plan_memory.json"))
    args = parser.parse_args()
    if args.worker:
        kind, path, *rest = args.worker
        if kind == "weights":
            emit(weights_worker(path, rest[0]))
        else:
            emit(activations_worker(path, int(rest[0]), int(rest[1]), bool(int(rest[2]))))
        return

    weights: list[dict[str, Any]] = []
    activations: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            path = model_dir(name, Path(scratch))
            weights += weights_rows(name, path)
            if not args.skip_activations:
                activations += activation_rows(name, path)
        if not args.skip_activations:
            for name in args.fit_models:
                activations += activation_rows(name, extra_model_dir(name, Path(scratch)))
    text = table(weights, activations)
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine(),
        "weights": weights,
        "activations": activations,
        "table": text.splitlines(),
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
