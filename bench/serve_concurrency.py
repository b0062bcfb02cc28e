"""`lorakit serve` under load: 16 concurrent clients against 16 sequential requests, and adapter memory.

    PYTHONPATH=$PWD python bench/serve_concurrency.py [--model smollm2|tiny] [--tokens 32] [--threads 1]
        [--schedulers static,continuous] [--stagger 0.5]
    # prints a before (static) / after (continuous) table; writes bench/results/serve_concurrency-*.json

- one base (SmolLM2-135M by default) with 3 random r=16 all-linear LoRA adapters, served by ``lorakit serve`` in
  its own process on a free port, driven over HTTP with streaming (``stream=true``) so the time to first token (TTFT) is
  the time to the first content chunk;
- every request asks a different adapter in turn (mixed-adapter batches) for exactly ``--tokens`` new tokens
  (the end-of-turn tokens are banned with ``logit_bias``, so each request does the same work);
- for each scheduler (``lorakit serve --scheduler static`` = before, ``continuous`` = after; one server process
  each, one after the other): sequential, 16 requests one after the other; concurrent, 16 client threads
  sending together (after a barrier); staggered, 16 clients sending ``--stagger`` seconds apart (requests that
  arrive while others run: where static batching makes them wait); requests/s, TTFT mean / median / p95 / max,
  the speed-up, the server's CPU seconds per phase, and the load average (1, 5, 15 min);
- memory: parameter bytes of one base + 3 adapters against 3 merged models, and the server's RSS after loading.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine, model_dir, write_result  # noqa: E402

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


def _serve(
    runs: list[Path], threads: int | None, window: float, scheduler: str
) -> tuple[str, subprocess.Popen]:
    """``lorakit serve`` in its own process (as in production: clients elsewhere), once it answers."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    adapters = [f"--adapter=adapter-{i}={path}" for i, path in enumerate(runs[1:], start=1)]
    command = [sys.executable, "-m", "lorakit.cli", "serve", f"adapter-0={runs[0]}", *adapters]
    command += ["--port", str(port), "--max-batch", str(CLIENTS), "--batch-window", str(window)]
    command += ["--scheduler", scheduler]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAKIT_PROGRESS": "0"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, process
        except httpx.TransportError:
            if process.poll() is not None:
                raise RuntimeError("the server exited before answering") from None
            time.sleep(0.2)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


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
    ordered = sorted(ttfts)
    return {
        "wall_s": round(wall, 3),
        "requests_per_s": round(CLIENTS / wall, 3),
        "ttft_mean_s": round(statistics.mean(ttfts), 3),
        "ttft_median_s": round(statistics.median(ttfts), 3),
        "ttft_p95_s": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 3),
        "ttft_max_s": round(max(ttfts), 3),
    }


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the server process has used so far: less noisy than wall time under load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _clients(
    url: str, jobs: list[tuple[str, str]], tokens: int, bias: dict[str, int], gap: float
) -> tuple[list[tuple[float, float]], float]:
    """16 client threads: released together by a barrier (``gap=0``), or client i sending ``i * gap`` seconds
    after the first (requests arriving while others run). Their results and the wall time."""
    barrier = threading.Barrier(CLIENTS)  # the clients send together, not as their threads happen to start

    def client(indexed: tuple[int, tuple[str, str]]) -> tuple[float, float]:
        barrier.wait()
        time.sleep(indexed[0] * gap)
        return _request(url, *indexed[1], tokens, bias)

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(client, enumerate(jobs)))
    return results, time.perf_counter() - started


def _measure(url: str, pid: int, tokens: int, bias: dict[str, int], gap: float) -> dict[str, object]:
    """Warm-up, 16 sequential requests, 16 concurrent clients, then (``gap`` > 0) 16 staggered clients."""
    import httpx

    ids = [f"adapter-{i}" for i in range(3)]
    jobs = [(ids[i % len(ids)], PROMPTS[i % len(PROMPTS)]) for i in range(CLIENTS)]
    _request(url, *jobs[0], tokens, bias)  # warm-up
    load_before, cpu_before = _load(), _cpu_s(pid)
    started = time.perf_counter()
    sequential = [_request(url, m, p, tokens, bias) for m, p in jobs]
    sequential_wall = time.perf_counter() - started
    load_mid, cpu_mid = _load(), _cpu_s(pid)
    concurrent, concurrent_wall = _clients(url, jobs, tokens, bias, 0.0)
    cpu_after = _cpu_s(pid)
    seq = _summary([t for t, _ in sequential], sequential_wall)
    con = _summary([t for t, _ in concurrent], concurrent_wall)
    result = {
        "sequential": seq,
        "concurrent": con,
        "speedup_requests_per_s": round(con["requests_per_s"] / seq["requests_per_s"], 2),
        "server_cpu_s": {
            "sequential": round(cpu_mid - cpu_before, 2),
            "concurrent": round(cpu_after - cpu_mid, 2),
        },
    }
    if gap > 0:
        staggered, staggered_wall = _clients(url, jobs, tokens, bias, gap)
        result["staggered"] = {"gap_s": gap, **_summary([t for t, _ in staggered], staggered_wall)}
        result["server_cpu_s"]["staggered"] = round(_cpu_s(pid) - cpu_after, 2)
    health = httpx.get(f"{url}/health").json()
    return {
        "scheduler": health.get("scheduler", "static"),
        **result,
        "batches_total": health["batches"],
        "decode_steps_total": health.get("steps"),
        "load_average_1_5_15": {"before": load_before, "between": load_mid, "after": _load()},
    }


def _table(runs: dict[str, dict]) -> str:
    """The before/after table: one line per scheduler and mode."""
    lines = [
        f"{'scheduler':<11} {'mode':<11} {'req/s':>7} {'x seq':>6} {'TTFT mean':>10} {'median':>8} "
        f"{'p95':>8} {'server CPU':>10} {'load(1m)':>9}"
    ]
    for name, run in runs.items():
        for mode in ("sequential", "concurrent", "staggered"):
            if mode not in run:
                continue
            row = run[mode]
            ratio = row["requests_per_s"] / run["sequential"]["requests_per_s"]
            load = run["load_average_1_5_15"]["between" if mode == "sequential" else "after"][0]
            lines.append(
                f"{name:<11} {mode:<11} {row['requests_per_s']:>7.3f} {ratio:>5.2f}x "
                f"{row['ttft_mean_s']:>9.2f}s {row['ttft_median_s']:>7.2f}s {row['ttft_p95_s']:>7.2f}s "
                f"{run['server_cpu_s'][mode]:>9.1f}s {load:>9.2f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="the server's torch intra-op threads (OMP_NUM_THREADS; default: torch's). 1 on a shared machine, "
        "where a parallel region waits for descheduled threads at every small op",
    )  # fmt: skip
    parser.add_argument("--window", type=float, default=0.02, help="the server's --batch-window (seconds)")
    parser.add_argument(
        "--stagger", type=float, default=0.5,
        help="seconds between the staggered clients' requests (0: skip that phase; default: 0.5)",
    )  # fmt: skip
    parser.add_argument(
        "--schedulers", default="static,continuous",
        help="the `lorakit serve --scheduler` values to compare, in order (default: static,continuous)",
    )  # fmt: skip
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    base_dir = model_dir(args.model, scratch)
    adapters = [_adapter(base_dir, scratch / f"adapter-{i}", seed=i) for i in range(3)]
    base_bytes = sum(
        p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(base_dir).parameters()
    )
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ends = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])}
    bias = {str(t): -100 for t in ends if t is not None and t != tokenizer.unk_token_id}

    runs: dict[str, dict] = {}
    server_rss = None
    for scheduler in args.schedulers.split(","):
        url, process = _serve([path for path, _ in adapters], args.threads, args.window, scheduler)
        server_rss = _rss_mb(process.pid)
        try:
            runs[scheduler] = _measure(url, process.pid, args.tokens, bias, args.stagger)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        print(f"{scheduler}: done, {json.dumps(runs[scheduler]['concurrent'])}", flush=True)

    adapter_bytes = sum(size for _, size in adapters)
    result = {
        "machine": machine(),
        "model": args.model,
        "new_tokens": args.tokens,
        "server_threads": args.threads or "torch default",
        "batch_window_s": args.window,
        "clients": CLIENTS,
        "runs": runs,
        "target_speedup": 3.0,
        "memory": {
            "base_param_mb": round(base_bytes / 2**20, 2),
            "three_adapters_param_mb": round(adapter_bytes / 2**20, 2),
            "base_plus_3_adapters_mb": round((base_bytes + adapter_bytes) / 2**20, 2),
            "three_merged_models_mb": round(3 * base_bytes / 2**20, 2),
            "server_rss_mb_after_load": server_rss,
        },
    }
    print(json.dumps(result, indent=2))
    print()
    print(_table(runs))
    name = f"serve_concurrency-{args.model}-t{args.threads or 'default'}"
    print("written to", write_result(name, result))


if __name__ == "__main__":
    main()
