"""`lorakit serve` as a real server process, driven by the official `openai` client: equality with
InferenceModel, streaming, usage, stop, seeds, mixed-adapter batches, every error, disconnects and shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import lorakit as lk

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
CAP = 320
PROMPTS = ["Say hello.", "What is the capital of France?", "Count to three.", "Name an animal."]
# Special tokens of the tiny tokenizer (</s>, <|im_start|>, <|im_end|>): banned, a reply never ends early.
NO_END = {"2": -100, "3": -100, "4": -100}


def _train(model_dir, out, template, answers):
    rows = [{"instruction": p, "input": "", "output": a} for p, a in zip(PROMPTS, answers, strict=True)]
    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=8, alpha=16, dropout=0.0)
        .with_dataset(rows, template=template, val_split=0.0, max_length=128)
        .with_training(max_steps=10, lr=1e-2, batch_size=4, warmup_ratio=0.0, scheduler="constant")
        .train(out)
        .output_dir
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {
        "a": _train(tiny_model_dir, root / "a", "alpaca", ["hello world", "Paris.", "0 1 2", "the lazy dog"]),
        "b": _train(tiny_model_dir, root / "b", "chatml", ["brown", "billing", "fine", "the quick fox"]),
    }


@pytest.fixture(scope="module")
def server(runs):
    """`python -m lorakit.cli serve a=RUN --adapter b=RUN` on a free port; yields (base url, process)."""
    port = _free_port()
    # One intra-op thread: on a shared 2-core machine a batched step otherwise waits for descheduled threads.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAKIT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "lorakit.cli", "serve", f"a={runs['a']}", "--adapter", f"b={runs['b']}",
        "--port", str(port), "--api-key", KEY, "--max-tokens-cap", str(CAP),
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a busy machine takes long to import torch and load
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not start:\n{process.stdout.read()}")
        time.sleep(0.2)
    yield url, process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(runs):
    model = lk.InferenceModel.load(runs["a"])
    model.load_adapter(runs["b"], name="b")
    return model


ADAPTER = {"a": None, "b": "b"}


def _messages(prompt):
    return [{"role": "user", "content": prompt}]


def _health(server):
    return httpx.get(f"{server[0]}/health").json()


def test_models_lists_every_adapter_by_id(client):
    assert [m.id for m in client.models.list().data] == ["a", "b"]


@pytest.mark.parametrize("model", ["a", "b"])
def test_greedy_chat_equals_inference_model_chat_with_the_adapters_template(client, reference, model):
    for prompt in PROMPTS:
        reply = client.chat.completions.create(
            model=model, messages=_messages(prompt), max_tokens=24, temperature=0
        )
        expected = reference.chat(_messages(prompt), 24, adapter=ADAPTER[model])
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].message.role == "assistant"
        prompt_tokens = len(reference.encode(_messages(prompt), adapter=ADAPTER[model]))
        assert reply.usage.prompt_tokens == prompt_tokens
        assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
        assert 1 <= reply.usage.completion_tokens <= 24
    # the adapters answer differently: each request really used its own adapter
    assert reference.chat(_messages(PROMPTS[1]), 24) != reference.chat(_messages(PROMPTS[1]), 24, adapter="b")


def test_completions_equal_inference_model_generate(client, reference):
    reply = client.completions.create(model="b", prompt=PROMPTS[3], max_tokens=16)
    assert reply.choices[0].text == reference.generate(PROMPTS[3], 16, adapter="b")
    assert reply.object == "text_completion"


def test_stream_chunks_join_to_the_reply_and_end_with_usage(client):
    whole = client.chat.completions.create(model="a", messages=_messages(PROMPTS[0]), max_tokens=24)
    chunks = list(
        client.chat.completions.create(
            model="a",
            messages=_messages(PROMPTS[0]),
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # really streamed, not one blob
    assert "".join(deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed = client.completions.create(model="b", prompt=PROMPTS[2], max_tokens=16, stream=True)
    text = "".join(c.choices[0].text for c in streamed)
    assert text == client.completions.create(model="b", prompt=PROMPTS[2], max_tokens=16).choices[0].text


def test_stop_strings_and_the_length_limit(client):
    long = client.chat.completions.create(
        model="a", messages=_messages(PROMPTS[0]), max_tokens=5, logit_bias=NO_END
    )
    assert long.choices[0].finish_reason == "length"
    assert long.usage.completion_tokens == 5
    text = long.choices[0].message.content
    stop = text[1:3]
    assert stop.strip()
    cut = client.chat.completions.create(
        model="a", messages=_messages(PROMPTS[0]), max_tokens=5, logit_bias=NO_END, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"


def test_the_same_seed_samples_the_same_reply(client):
    def sample(seed):
        return client.chat.completions.create(
            model="b", messages=_messages(PROMPTS[0]), max_tokens=12, temperature=1.5, seed=seed,
            logit_bias=NO_END,
        ).choices[0].message.content  # fmt: skip

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


def test_concurrent_requests_for_mixed_adapters_are_batched_and_each_gets_its_own(client, reference, server):
    jobs = [(model, prompt) for prompt in PROMPTS for model in ("a", "b")] * 2
    expected = {(m, p): reference.chat(_messages(p), 24, adapter=ADAPTER[m]) for m, p in set(jobs)}
    before = _health(server)["batches"]

    def ask(job):
        model, prompt = job
        reply = client.chat.completions.create(model=model, messages=_messages(prompt), max_tokens=24)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(ask, jobs))
    assert replies == [expected[job] for job in jobs]
    assert _health(server)["batches"] - before < len(jobs)  # several requests shared a batch


def test_a_request_joins_a_running_batch_and_does_not_wait_for_it(client, reference, server):
    """Continuous batching: a short request sent while a long one streams is answered before the long one ends."""
    assert _health(server)["scheduler"] == "continuous"
    body = {"model": "b", "prompt": "x", "max_tokens": 300, "stream": True, "logit_bias": NO_END}
    started, events = threading.Event(), []

    def read():
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream("POST", f"{server[0]}/v1/completions", json=body, headers=headers) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(60)
    reply = client.chat.completions.create(model="a", messages=_messages(PROMPTS[1]), max_tokens=24)
    long_done_already = "data: [DONE]" in events
    reader.join(120)
    assert not long_done_already  # the short request did not wait for the long one's 300 tokens
    assert reply.choices[0].message.content == reference.chat(_messages(PROMPTS[1]), 24)
    assert events[-1] == "data: [DONE]"
    finish = json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
    assert finish == "length" and _health(server)["steps"] >= 300


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_both_schedulers_generate_what_inference_model_does(reference, scheduler):
    from lorakit.generation import Decoding, Row, Sampling
    from lorakit.serve.batcher import Batcher

    jobs = [(model, prompt) for prompt in PROMPTS[:3] for model in ("a", "b")]
    finished = threading.Semaphore(0)
    rows = []
    for model, prompt in jobs:
        adapter = ADAPTER[model]
        stops = reference.template_for(adapter).stop_strings(reference.tokenizer)
        decoding = Decoding.build(reference.tokenizer, stops, Sampling(16))
        prompt_ids = reference.encode(_messages(prompt), adapter=adapter)
        on_done = lambda row: finished.release()  # noqa: E731
        rows.append(Row(reference.tokenizer, prompt_ids, decoding, adapter=adapter, on_done=on_done))
    batcher = Batcher(reference, window=0.5, scheduler=scheduler)
    for row in rows:
        batcher.submit(row)
    for _ in rows:
        assert finished.acquire(timeout=120)
    batcher.close()
    assert batcher.scheduler == scheduler and batcher.batches == 1 and batcher.active == 0
    assert (batcher.steps > 0) == (scheduler == "continuous")
    expected = [reference.chat(_messages(p), 16, adapter=ADAPTER[m]) for m, p in jobs]
    assert [row.text for row in rows] == expected


def _raw(server, body, *, key=KEY, content=None):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    data = content if content is not None else json.dumps(body)
    return httpx.post(f"{server[0]}/v1/chat/completions", content=data, headers=headers, timeout=30)


def test_errors_are_openai_shaped_and_the_server_keeps_answering(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist on this server; its models are: a, b"):
        client.chat.completions.create(model="nope", messages=_messages("hi"))
    with pytest.raises(openai.BadRequestError, match="`messages` must not be empty"):
        client.chat.completions.create(model="a", messages=[])
    with pytest.raises(openai.BadRequestError, match=f"max_tokens=5000 is above this server's cap of {CAP}"):
        client.chat.completions.create(model="a", messages=_messages("hi"), max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens"):
        client.chat.completions.create(model="a", messages=_messages("hello " * 600), max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="ends with a user turn"):
        client.chat.completions.create(model="b", messages=[{"role": "assistant", "content": "hi"}])
    bad = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Missing or wrong API key"):
        bad.models.list()

    malformed = _raw(server, None, content='{"model": "a", "messages": [')
    assert malformed.status_code == 400
    error = malformed.json()["error"]
    assert error["type"] == "invalid_request_error" and "Malformed JSON" in error["message"]
    missing = _raw(server, {"model": "a"})
    assert missing.status_code == 400 and "messages: Field required" in missing.json()["error"]["message"]
    huge = _raw(server, {"model": "a", "messages": _messages("x" * 1_100_000)})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{server[0]}/health").status_code == 200  # no key needed for the health check

    reply = client.chat.completions.create(model="a", messages=_messages(PROMPTS[1]), max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    before = _health(server)["cancelled"]
    body = {"model": "b", "prompt": "x", "max_tokens": CAP - 40, "stream": True, "logit_bias": NO_END}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server[0]}/v1/completions", json=body, headers=headers) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 20
    while _health(server)["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = _health(server)
    assert health["active"] == 0 and health["cancelled"] == before + 1


def test_shutdown_finishes_the_request_in_flight(server):
    """Last test of the module: SIGTERM while a stream runs; the stream completes, then the server exits."""
    url, process = server
    body = {"model": "b", "prompt": "x", "max_tokens": 200, "stream": True, "logit_bias": NO_END}
    started, events = threading.Event(), []

    def read():
        with httpx.stream(
            "POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(30)
    process.send_signal(signal.SIGTERM)
    reader.join(60)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    # uvicorn re-raises the signal it handled once the server is down: the exit status is SIGTERM's
    assert process.wait(timeout=60) == -signal.SIGTERM
    assert "Finished server process" in process.stdout.read()
