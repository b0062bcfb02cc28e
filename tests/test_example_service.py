"""examples/adapter_service: a FastAPI app serving two adapters on one base, started with uvicorn on localhost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import lorakit as lk

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "examples" / "adapter_service"
PROMPTS = ["Say hello.", "What is the capital of France?", "Route this ticket.", "Name a colour."]


def _train(model_dir, out, answer):
    rows = [{"instruction": p, "input": "", "output": answer} for p in PROMPTS]
    return (
        lk.Pipeline.from_model(model_dir)
        .with_lora(r=8, alpha=16, dropout=0.0)
        .with_dataset(rows, template="alpaca", val_split=0.0, max_length=128)
        .with_training(max_steps=15, lr=1e-2, batch_size=4, warmup_ratio=0.0, scheduler="constant")
        .train(out)
        .output_dir
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    import httpx  # fastapi, uvicorn and httpx are in the test extra: a missing one fails, never skips

    runs = tmp_path_factory.mktemp("service-runs")
    run_a = _train(tiny_model_dir, runs / "a", "Paris.")
    run_b = _train(tiny_model_dir, runs / "b", "hello world")
    port = _free_port()
    env = {
        **os.environ,
        "LORAKIT_BASE": tiny_model_dir,
        "LORAKIT_ADAPTERS": f"paris={run_a},hello={run_b}",
        "LORAKIT_TEMPLATE": "alpaca",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=APP_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/adapters", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the service did not start:\n{proc.stdout.read()}")
        time.sleep(0.5)
    yield url, {"paris": run_a, "hello": run_b}
    proc.terminate()
    proc.wait(timeout=30)


def test_service_lists_its_adapters(service):
    import httpx

    url, _ = service
    assert httpx.get(f"{url}/adapters").json() == {"adapters": ["paris", "hello"]}


def test_concurrent_requests_each_get_their_own_adapter(service):
    import httpx

    url, runs = service
    # What each adapter answers when loaded alone, in this process.
    expected = {
        name: lk.InferenceModel.load(run).generate(PROMPTS, max_new_tokens=8) for name, run in runs.items()
    }
    assert expected["paris"] != expected["hello"]  # otherwise the test could not tell the adapters apart
    assert expected["paris"][0].startswith("Paris")  # each adapter learned its own answer
    assert expected["hello"][0].startswith("hello")

    jobs = [(name, i) for i in range(len(PROMPTS)) for name in ("paris", "hello")] * 2

    def call(job):
        name, i = job
        body = {"adapter": name, "prompt": PROMPTS[i], "max_new_tokens": 8}
        response = httpx.post(f"{url}/generate", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return job, response.json()["text"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, jobs))
    for (name, i), text in results:
        assert text == expected[name][i], (name, PROMPTS[i])


def test_unknown_adapter_is_a_404_naming_the_loaded_ones(service):
    import httpx

    url, _ = service
    response = httpx.post(f"{url}/generate", json={"adapter": "nope", "prompt": "hi"})
    assert response.status_code == 404
    assert "'nope' is not loaded" in response.json()["detail"]
    assert "'paris'" in response.json()["detail"]
