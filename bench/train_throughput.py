"""Training throughput on the same data: the seeds' pipeline, plain TRL, and lorakit, in one invocation.

    PYTHONPATH=$PWD python bench/train_throughput.py                      # tiny model + SmolLM2-135M
    PYTHONPATH=$PWD python bench/train_throughput.py --models tiny --repeats 3

Configurations (LoRA r=16, alpha 32, dropout 0.05, all linear layers; max length 512; lr 2e-4; one epoch over
the same rows; each run in its own process, the order alternating between repeats):

- ``a_seeds``: the seeds' pipeline: text tokenized with ``padding="max_length"``, labels = input_ids,
  ``transformers.Trainer`` + ``DataCollatorForLanguageModeling(mlm=False)``;
- ``b_trl``: TRL ``SFTTrainer`` with its defaults (prompt/completion rows, so completion-only loss; gradient
  checkpointing on, as TRL defaults) and the same hyper-parameters; ``bf16=False`` on CPU;
- ``b_trl_nogc``: the same without gradient checkpointing;
- ``c_lorakit``: lorakit's default (length-grouped batches, dynamic padding, fused loss, fused AdamW,
  ``precision="auto"``: bf16 autocast over fp32 weights on a CPU with native bf16, fp32 otherwise);
- ``c_packed``: lorakit's default with ``packing=True`` (padding-free, per-example position ids);
- ``c_fp32``: lorakit's default with ``precision="fp32"`` (the CPU default before bf16 became "auto").

Reported per run: real (non-padding) tokens/s, loss-bearing tokens/s, the non-padding fraction of computed
tokens, peak RSS of the process, training FLOP/s against the machine's best matmul rate measured in the same
invocation (fp32 and bf16 2048^2 matmuls; each run against the rate of the precision it trained in);
per model, medians over the repeats, the ratios of c to a and b, and the losses of all configurations on the
same 8 examples.

The FLOP count of a step (:func:`train_flops`), T = computed tokens (padding included), s = the mean computed
length of a row (T / rows trained), L layers, d hidden size:

- frozen weights (N = every ``nn.Linear`` weight incl. the LM head): forward 2·N·T + backward to the inputs
  only 2·N·T (no weight gradient) = 4·N·T;
- LoRA weights (N_lora): forward 2 + backward 4 (inputs and weights) = 6·N_lora·T;
- attention scores and values, causal (half the s x s products): forward 2·L·d·s·T, backward twice that
  = 6·L·d·s·T.

``model_gflops_per_s`` counts every computed token, ``useful_gflops_per_s`` only the real ones (the same
formula with T = real tokens). The LM head over prompt and padding positions is counted although lorakit's
fused loss skips it, so lorakit's FLOP/s is, if anything, an over-count of the work it really does.
Results: ``bench/results/train_throughput-<UTC>.json`` (and ``-latest.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    bench_rows,
    emit,
    machine,
    matmul_peak,
    model_dir,
    peak_rss_mb,
    run_worker,
    write_result,
)

CONFIGS = ("a_seeds", "b_trl", "b_trl_nogc", "c_lorakit", "c_packed", "c_fp32")
SETTINGS = {
    # rows per timed epoch and batch size per model: SmolLM2 runs a few steps only, to finish in minutes.
    "tiny": {"rows": 256, "batch_size": 8},
    "smollm2": {"rows": 16, "batch_size": 4},
}
MAX_LENGTH = 512
LR = 2e-4
AGREEMENT_ROWS = 8


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )


def rendered(rows: list[dict[str, str]], tokenizer: Any) -> list[tuple[str, str]]:
    """Each row as (prompt text, completion text) rendered by lorakit's alpaca template (completion with EOS)."""
    from lorakit.data.encode import Encoder
    from lorakit.data.formats import to_messages
    from lorakit.templates import get_template

    encoder, template = Encoder(tokenizer), get_template("alpaca")
    pairs = []
    for index, row in enumerate(rows):
        segments = encoder.render(to_messages(row, "alpaca", row_index=index, source_name="bench"), template)
        first = next(i for i, (_, trained) in enumerate(segments) if trained)
        pairs.append(("".join(t for t, _ in segments[:first]), "".join(t for t, _ in segments[first:])))
    return pairs


def train_flops(
    params: int, lora_params: int, layers: int, hidden: int, tokens: int, mean_length: float
) -> float:
    """Training FLOPs of ``tokens`` tokens (the formula in the module docstring)."""
    return 4 * params * tokens + 6 * lora_params * tokens + 6 * layers * hidden * mean_length * tokens


def shape_of(path: str) -> tuple[int, int]:
    """(layers, hidden size) of the model at ``path``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path).get_text_config()
    return config.num_hidden_layers, config.hidden_size


def lora_param_count(path: str) -> int:
    """Parameters of the bench's LoRA (r=16, all linear layers but the head) on the model at ``path``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    head = model.get_output_embeddings()
    return sum(
        16 * (m.in_features + m.out_features)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )


def matmul_params(model: Any) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


# --- the configurations ----------------------------------------------------------------------------------


def seeds_dataset(pairs: list[tuple[str, str]], tokenizer: Any) -> Any:
    from datasets import Dataset

    texts = [prompt + completion for prompt, completion in pairs]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH)
    return Dataset.from_dict(
        {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": [list(ids) for ids in encoded["input_ids"]],
        }
    )


def counting(base: type) -> type:
    """``base`` (a baseline's trainer class) counting the tokens of every trained micro-batch exactly as
    lorakit's trainer does (:func:`lorakit.batching.token_counts`), so the throughputs compare like with like."""
    from lorakit.batching import token_counts

    class Counting(base):  # type: ignore[misc, valid-type]
        _counts: tuple[int, ...] = (0, 0, 0)

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            counted = token_counts(inputs)
            self._counts = tuple(a + b for a, b in zip(self._counts, counted, strict=True))
            return super().training_step(model, inputs, num_items_in_batch)

        def token_totals(self) -> dict[str, int]:
            tokens, computed, loss_tokens = self._counts
            return {"tokens": tokens, "computed_tokens": computed, "loss_tokens": loss_tokens}

    return Counting


def seeds_trainer(path: str, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int, out: Path) -> Any:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), lora_config())
    args = TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        per_device_train_batch_size=batch_size,
        num_train_epochs=1,
        learning_rate=LR,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    return counting(Trainer)(
        model=model,
        args=args,
        train_dataset=seeds_dataset(pairs, tokenizer),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )


def trl_trainer(
    path: str, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int, out: Path, *, gc: bool | None
) -> Any:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    extra = {} if gc is None else {"gradient_checkpointing": gc}
    args = SFTConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        max_length=MAX_LENGTH,
        per_device_train_batch_size=batch_size,
        num_train_epochs=1,
        learning_rate=LR,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **extra,
    )
    data = Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})
    return counting(SFTTrainer)(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config(),
    )


def lorakit_pipeline(path: str, rows: list[dict[str, str]], batch_size: int, config: str) -> Any:
    import lorakit as lk

    return (
        lk.Pipeline.from_model(path)
        .with_lora(r=16, alpha=32, dropout=0.05, targets="all-linear")
        .with_dataset(
            rows,
            template="alpaca",
            val_split=0,
            max_length=MAX_LENGTH,
            packing=config == "c_packed",
            cache=False,
        )
        .with_training(
            epochs=1,
            batch_size=batch_size,
            lr=LR,
            warmup_ratio=0.0,
            logging_steps=10_000,
            seed=0,
            precision="fp32" if config == "c_fp32" else "auto",
        )
    )


def packed_batch_size(rows: list[dict[str, str]], path: str, batch_size: int) -> int:
    """Packed rows per batch so a packed step holds about as many tokens as an unpacked one."""
    pipeline = lorakit_pipeline(path, rows, batch_size, "c_lorakit")
    report = pipeline.prepare_data().report
    mean = report.train_tokens / max(1, report.train_rows)
    return max(1, round(batch_size * mean / MAX_LENGTH))


# --- workers ---------------------------------------------------------------------------------------------


def clock_callback() -> Any:
    """Process CPU seconds (user + system, all threads) between the start and the end of training: less
    sensitive than wall-clock time to other jobs on a shared machine."""
    import resource

    from transformers import TrainerCallback

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    class Clock(TrainerCallback):
        cpu_s = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = cpu()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.cpu_s = cpu() - self.started

    return Clock()


def train_worker(model_name: str, config: str, scratch: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    settings = SETTINGS[model_name]
    path = model_dir(model_name, scratch)
    rows = bench_rows(settings["rows"], path)
    batch_size = settings["batch_size"]
    out = Path(tempfile.mkdtemp(prefix=f"bench-{config}-"))
    threads = torch.get_num_threads()
    clock = clock_callback()
    if config.startswith("c_"):
        if config == "c_packed":
            batch_size = packed_batch_size(rows, path, batch_size)
        result = lorakit_pipeline(path, rows, batch_size, config).train(out / "run", callbacks=[clock])
        metrics = result.metrics
        tokens, computed, loss_tokens = (
            metrics["train_tokens"],
            metrics["train_computed_tokens"],
            metrics["train_loss_tokens"],
        )
        runtime, train_loss, steps = metrics["train_runtime"], metrics["train_loss"], metrics["train_steps"]
        precision = json.loads((result.output_dir / "lorakit_run.json").read_text())["precision"]
        from transformers import AutoModelForCausalLM

        params = matmul_params(AutoModelForCausalLM.from_pretrained(path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        pairs = rendered(rows, tokenizer)
        if config == "a_seeds":
            trainer = seeds_trainer(path, tokenizer, pairs, batch_size, out)
        else:
            trainer = trl_trainer(
                path, tokenizer, pairs, batch_size, out, gc=None if config == "b_trl" else False
            )
        params = matmul_params(trainer.model.get_base_model())
        trainer.add_callback(clock)
        started = time.perf_counter()
        output = trainer.train()
        runtime = time.perf_counter() - started
        counts = trainer.token_totals()
        tokens, computed, loss_tokens = counts["tokens"], counts["computed_tokens"], counts["loss_tokens"]
        train_loss, steps = float(output.training_loss), int(output.global_step)
        precision = "fp32"  # the seeds' and TRL's runs set bf16=False on CPU
    layers, hidden = shape_of(path)
    lora = lora_param_count(path)
    mean_length = computed / max(1, steps * batch_size)
    flops = train_flops(params, lora, layers, hidden, computed, mean_length)
    useful = train_flops(params, lora, layers, hidden, tokens, mean_length)
    return {
        "model": model_name,
        "config": config,
        "precision": precision,
        "rows": len(rows),
        "batch_size": batch_size,
        "steps": steps,
        "runtime_s": round(runtime, 3),
        "tokens": tokens,
        "computed_tokens": computed,
        "loss_tokens": loss_tokens,
        "tokens_per_s": round(tokens / runtime, 1),
        "cpu_s": round(clock.cpu_s, 2),
        "tokens_per_cpu_s": round(tokens / clock.cpu_s, 1) if clock.cpu_s else None,
        "loss_tokens_per_s": round(loss_tokens / runtime, 1),
        "non_pad_fraction": round(tokens / computed, 4),
        "model_gflops_per_s": round(flops / runtime / 1e9, 2),
        "useful_gflops_per_s": round(useful / runtime / 1e9, 2),
        "flop_formula": "4*N*T + 6*N_lora*T + 6*L*d*s*T",
        "matmul_params": params,
        "train_loss": round(train_loss, 5),
        "peak_rss_mb": peak_rss_mb(),
        "threads": threads,
    }


def agreement_worker(model_name: str, scratch: Path) -> dict[str, Any]:
    """Losses of the untrained model (LoRA B = 0, so the base model) on the same rows under each pipeline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    from lorakit.collate import PadCollator, PaddingFreeCollator
    from lorakit.data import prepare_data

    path = model_dir(model_name, scratch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Rows within max_length (the pipelines cut longer ones differently), the same rows for every pipeline.
    rows = [
        r for r in bench_rows(200, path) if len(tokenizer(r["instruction"] + r["output"])["input_ids"]) < 400
    ]
    rows = rows[:AGREEMENT_ROWS]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # use_cache=False from the padding-free collator: an eval-mode model would otherwise build a KV cache and
    # attend across the packed examples.
    keys = ("input_ids", "attention_mask", "labels", "position_ids", "use_cache")

    def loss(batch: dict[str, Any]) -> float:
        with torch.no_grad():
            return float(model(**{k: v for k, v in batch.items() if k in keys}).loss)

    def lorakit_rows(packing: bool) -> list[dict[str, Any]]:
        prepared = prepare_data(
            rows,
            tokenizer=tokenizer,
            template="alpaca",
            val_split=0,
            max_length=MAX_LENGTH,
            packing=packing,
            cache=False,
        )
        return prepared.train.to_list()

    plain = lorakit_rows(False)
    # The reference: every example alone, unpadded; token-weighted mean over the examples.
    total = count = 0.0
    for row in plain:
        n = sum(label != -100 for label in row["labels"][1:])
        total += loss(PadCollator(tokenizer.pad_token_id)([row])) * n
        count += n
    losses = {"reference_unpadded": total / count}
    losses["c_lorakit"] = loss(PadCollator(tokenizer.pad_token_id)(plain))
    losses["c_packed"] = loss(PaddingFreeCollator(tokenizer.pad_token_id)(lorakit_rows(True)))
    pairs = rendered(rows, tokenizer)
    seeds = seeds_dataset(pairs, tokenizer).to_list()
    losses["a_seeds"] = loss(DataCollatorForLanguageModeling(tokenizer, mlm=False)(seeds))
    trainer = trl_trainer(path, tokenizer, pairs, AGREEMENT_ROWS, scratch / "agree", gc=False)
    trl_rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    losses["b_trl"] = loss(trainer.data_collator(trl_rows))
    reference = losses["reference_unpadded"]
    return {
        "model": model_name,
        "rows": len(rows),
        "losses": {k: round(v, 6) for k, v in losses.items()},
        "abs_diff_to_reference": {k: round(abs(v - reference), 7) for k, v in losses.items()},
        "note": "a_seeds puts loss on prompt tokens too (labels = input_ids), so it is a different objective",
    }


# --- driver ----------------------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], peak: dict[str, float] | None = None) -> dict[str, Any]:
    by_config: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_config.setdefault(run["config"], []).append(run)
    summary: dict[str, Any] = {}
    for config, items in by_config.items():
        rates = [r["tokens_per_s"] for r in items]
        summary[config] = {
            "tokens_per_s_median": round(statistics.median(rates), 1),
            "tokens_per_s_all": rates,
            "noise_pct": round(100 * (max(rates) - min(rates)) / statistics.median(rates), 1),
            "non_pad_fraction": items[0]["non_pad_fraction"],
            "model_gflops_per_s_median": round(statistics.median(r["model_gflops_per_s"] for r in items), 2),
            "useful_gflops_per_s_median": round(
                statistics.median(r["useful_gflops_per_s"] for r in items), 2
            ),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in items),
            "pct_of_matmul_peak": round(
                100
                * statistics.median(r["model_gflops_per_s"] for r in items)
                / (peak or {}).get(items[0].get("precision", "fp32"), float("inf")),
                1,
            ),
            "train_loss": items[0]["train_loss"],
        }
    ratios = {}
    if "c_lorakit" in summary:
        # Ratios per repeat (same round of runs), then the median: the load of a shared machine drifts.
        for other in ("a_seeds", "b_trl", "b_trl_nogc", "c_packed", "c_fp32"):
            if other not in by_config:
                continue
            per_repeat = [
                c["tokens_per_s"] / o["tokens_per_s"]
                for c, o in zip(by_config["c_lorakit"], by_config[other], strict=False)
            ]
            ratios[f"c_lorakit/{other}"] = {
                "median": round(statistics.median(per_repeat), 2),
                "all": [round(x, 2) for x in per_repeat],
            }
            per_cpu = [
                c["tokens_per_cpu_s"] / o["tokens_per_cpu_s"]
                for c, o in zip(by_config["c_lorakit"], by_config[other], strict=False)
                if c.get("tokens_per_cpu_s") and o.get("tokens_per_cpu_s")
            ]
            if per_cpu:
                ratios[f"c_lorakit/{other} (CPU time)"] = {
                    "median": round(statistics.median(per_cpu), 2),
                    "all": [round(x, 2) for x in per_cpu],
                }
    return {"configs": summary, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--smollm2-repeats", type=int, default=None, help="repeats for SmolLM2 (default: --repeats)"
    )
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        kind, model_name, *rest = args.worker
        scratch = Path(tempfile.gettempdir()) / "lorakit-bench"
        scratch.mkdir(exist_ok=True)
        emit(
            agreement_worker(model_name, scratch)
            if kind == "agree"
            else train_worker(model_name, rest[0], scratch)
        )
        return

    script = Path(__file__).resolve()
    configs = args.configs.split(",")
    payload: dict[str, Any] = {"machine": machine(), "matmul_peak_gflops": matmul_peak(), "models": {}}
    print(
        f"machine: {payload['machine']}\nmatmul peak (GFLOP/s): {payload['matmul_peak_gflops']}", flush=True
    )
    for model_name in args.models.split(","):
        repeats = (
            args.repeats if model_name == "tiny" or args.smollm2_repeats is None else args.smollm2_repeats
        )
        runs = []
        for repeat in range(repeats):
            order = configs if repeat % 2 == 0 else list(reversed(configs))
            for config in order:
                try:
                    result = run_worker(script, ["train", model_name, config])
                except RuntimeError as error:  # keep the other configurations' numbers
                    print(f"{model_name} {config} r{repeat} FAILED: {error}", flush=True)
                    payload.setdefault("failures", []).append(
                        f"{model_name} {config} r{repeat}: {error}"[-3000:]
                    )
                    continue
                result["repeat"] = repeat
                runs.append(result)
                print(
                    f"{model_name:8s} {config:11s} r{repeat}: {result['tokens_per_s']:9.1f} tok/s, "
                    f"{result['non_pad_fraction']:.1%} non-pad, {result['steps']} steps in "
                    f"{result['runtime_s']:.1f} s ({result.get('cpu_s')} CPU s), loss {result['train_loss']:.4f}, RSS {result['peak_rss_mb']} MB",
                    flush=True,
                )
        try:
            agreement = run_worker(script, ["agree", model_name])
        except RuntimeError as error:
            print(f"{model_name} loss agreement FAILED: {error}", flush=True)
            agreement = {"rows": 0, "losses": {}, "error": str(error)[-3000:]}
        print(
            f"{model_name:8s} losses on the same {agreement['rows']} rows: {agreement['losses']}", flush=True
        )
        summary = summarize(runs, payload["matmul_peak_gflops"])
        for config, numbers in summary["configs"].items():
            print(
                f"{model_name:8s} {config:11s} training {numbers['model_gflops_per_s_median']} GFLOP/s = "
                f"{numbers['pct_of_matmul_peak']}% of the matmul peak",
                flush=True,
            )
        for name, ratio in summary["ratios"].items():
            print(f"{model_name:8s} {name}: {ratio['median']}x (per repeat {ratio['all']})", flush=True)
        payload["models"][model_name] = {
            "settings": {**SETTINGS[model_name], "max_length": MAX_LENGTH, "lr": LR, "lora_r": 16},
            "runs": runs,
            "summary": summary,
            "loss_agreement": agreement,
        }
        write_result(f"train_throughput-{args.models.replace(',', '-')}", payload)  # partial, per model
    payload["machine_after"] = machine()
    print(f"wrote {write_result(f'train_throughput-{args.models.replace(chr(44), chr(45))}', payload)}")


if __name__ == "__main__":
    main()
