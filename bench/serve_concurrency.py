"""`lorakit serve` under load: 16 concurrent clients against 16 sequential requests, and adapter memory.

    PYTHONPATH=$PWD python bench/serve_concurrency.py [--model smollm2|tiny] [--tokens 32]
    # writes bench/results/serve_concurrency-*.json

- one base (SmolLM2-135M by default) with 3 random r=16 all-linear LoRA adapters, served by ``create_app`` under
  uvicorn on a free port, driven over HTTP with streaming (``stream=true``) so the time to first token (TTFT) is
  the time to the first content chunk;
- every request asks a different adapter in turn (mixed-adapter batches) for exactly ``--tokens`` new tokens
  (the end-of-turn tokens are banned with ``logit_bias``, so each request does the same work);
- sequential: 16 requests one after the other; concurrent: 16 threads at once (the batcher puts them in one
  batch); requests/s, TTFT mean / median / max for both, and the speed-up;
- memory: parameter bytes of one base + 3 adapters against 3 merged models (and this process's peak RSS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, model_dir, peak_rss_mb, write_result  # noqa: E402

CLIENTS = 16
PROMPTS = [
    "Summarize: the parcel arrived late and the box was damaged.",
    "Route this ticket: I was charged twice for one order.",
    "Write a haiku about tokens.",
    "What is the capital of France?",
]


def _adapter(base_dir: str, out: Path, seed: int) -> tuple[Path, int]:
    """A random r=16 all-linear LoRA adapter (non-zero B) in PEFT format, and its parameter bytes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    size = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                size += param.numel() * param.element_size()
                if "lora_B" in name:
                    param.normal_(0, 1e-3)
    model.save_pretrained(out)
    return out, size


def _serve(app: Any) -> tuple[str, Any, threading.Thread]:
    import socket

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def _request(url: str, model: str, prompt: str, tokens: int, bias: dict[str, int]) -> tuple[float, float]:
    """(time to first content chunk, total time) of one streamed chat request."""
    import httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "stream": True,
        "logit_bias": bias,
    }
    started = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data:") and '"content": "' in line and '""' not in line:
                first = time.perf_counter() - started
    return first if first is not None else float("nan"), time.perf_counter() - started


def _summary(ttfts: list[float], wall: float) -> dict[str, float]:
    return {
        "wall_s": round(wall, 3),
        "requests_per_s": round(CLIENTS / wall, 3),
        "ttft_mean_s": round(statistics.mean(ttfts), 3),
        "ttft_median_s": round(statistics.median(ttfts), 3),
        "ttft_max_s": round(max(ttfts), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's); 1 on a shared machine, where a parallel region "
        "waits for descheduled threads at every tiny op",
    )  # fmt: skip
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import lorakit as lk
    from lorakit.serve import create_app

    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    base_dir = model_dir(args.model, scratch)
    adapters = [_adapter(base_dir, scratch / f"adapter-{i}", seed=i) for i in range(3)]
    model = lk.InferenceModel.load(adapters[0][0], template="chatml")
    for i, (path, _) in enumerate(adapters[1:], start=1):
        model.load_adapter(path, name=f"adapter-{i}")
    base_bytes = sum(p.numel() * p.element_size() for p in model.model.get_base_model().parameters())
    base_bytes -= sum(size for _, size in adapters)  # the LoRA weights are inside the base's modules
    app = create_app(model)
    ids = list(app.state.server.routes)
    url, server, thread = _serve(app)
    ends = {
        model.tokenizer.eos_token_id,
        *model.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]),
    }
    bias = {str(t): -100 for t in ends if t is not None and t != model.tokenizer.unk_token_id}
    jobs = [(ids[i % len(ids)], PROMPTS[i % len(PROMPTS)]) for i in range(CLIENTS)]
    _request(url, *jobs[0], args.tokens, bias)  # warm-up

    started = time.perf_counter()
    sequential = [_request(url, m, p, args.tokens, bias) for m, p in jobs]
    sequential_wall = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        concurrent = list(pool.map(lambda job: _request(url, *job, args.tokens, bias), jobs))
    concurrent_wall = time.perf_counter() - started
    server.should_exit = True
    thread.join(60)

    seq = _summary([t for t, _ in sequential], sequential_wall)
    con = _summary([t for t, _ in concurrent], concurrent_wall)
    adapter_bytes = sum(size for _, size in adapters)
    result = {
        "machine": machine(),
        "model": args.model,
        "new_tokens": args.tokens,
        "torch_threads": torch.get_num_threads(),
        "clients": CLIENTS,
        "sequential": seq,
        "concurrent": con,
        "speedup_requests_per_s": round(con["requests_per_s"] / seq["requests_per_s"], 2),
        "target_speedup": 3.0,
        "memory": {
            "base_param_mb": round(base_bytes / 2**20, 2),
            "three_adapters_param_mb": round(adapter_bytes / 2**20, 2),
            "base_plus_3_adapters_mb": round((base_bytes + adapter_bytes) / 2**20, 2),
            "three_merged_models_mb": round(3 * base_bytes / 2**20, 2),
            "peak_rss_mb": peak_rss_mb(),
        },
    }
    print(json.dumps(result, indent=2))
    print("written to", write_result(f"serve_concurrency-{args.model}-t{torch.get_num_threads()}", result))


if __name__ == "__main__":
    main()
