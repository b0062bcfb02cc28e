"""Model cards in run and merged directories, and push_to_hub against a local HTTP stub of the Hub API that
records what huggingface_hub sends (repo creation, YAML validation, pre-upload, the commit)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

import lorakit as lk

ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Say hello.", "input": "", "output": "hello world"},
    {"instruction": "Count to three.", "input": "", "output": "0 1 2"},
    {"instruction": "Name an animal.", "input": "", "output": "the lazy dog"},
]


def _front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    return (
        lk.Pipeline.from_model(tiny_model_dir)
        .with_lora(r=4, alpha=8, dropout=0.0)
        .with_dataset(ROWS, template="chatml", val_split=0.0, max_length=96)
        .with_training(max_steps=2, lr=1e-2, batch_size=4, warmup_ratio=0.0, scheduler="constant")
        .train(tmp_path_factory.mktemp("card") / "run")
        .output_dir
    )


def test_training_writes_a_model_card_into_the_run_directory(run_dir, tiny_model_dir):
    text = (run_dir / "README.md").read_text()
    front = _front_matter(text)
    assert front["base_model"] == tiny_model_dir
    assert front["library_name"] == "peft"
    assert front["tags"] == ["lorakit", "lora", "adapter"]
    data = (run_dir / "data" / "source.jsonl").read_bytes()
    assert front["lorakit"]["dataset_fingerprint"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert front["lorakit"]["template"] == "chatml"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert front["lorakit"]["metrics"]["train_loss"] == pytest.approx(metrics["train_loss"], rel=1e-5)
    assert "train_loss" in front["metrics"]
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" in text
    assert 'lk.InferenceModel.load("<this repo or directory>")' in text


def test_the_merged_directory_gets_a_transformers_card(run_dir, tiny_model_dir, tmp_path):
    merged = lk.InferenceModel.load(run_dir).merge()
    front = _front_matter((merged.save(tmp_path / "merged") / "README.md").read_text())
    assert front["library_name"] == "transformers"
    assert front["base_model"] == tiny_model_dir
    assert front["tags"] == ["lorakit", "merged"]


class _StubHub:
    """The four Hub API calls an upload makes, answered and recorded (files land in ``self.files``)."""

    def __init__(self):
        self.requests, self.files, self.repos, self.validated = [], {}, {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path, self.headers.get("authorization")))
                self._send(404, {"error": "not found"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                hub.requests.append(("POST", self.path, self.headers.get("authorization")))
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    hub.repos[f"{request['organization']}/{request['name']}"] = request
                    return self._send(200, {"url": f"{hub.url}/{request['organization']}/{request['name']}"})
                if self.path == "/api/validate-yaml":
                    hub.validated.append(json.loads(body)["content"])
                    return self._send(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    modes = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                    return self._send(200, {"files": modes})
                if "/commit/" in self.path:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self._send(
                        200, {"commitUrl": f"{hub.url}/org/repo/commit/{'a' * 40}", "commitOid": "a" * 40}
                    )
                return self._send(404, {"error": "unknown route"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests run offline
    stub = _StubHub()
    yield stub
    stub.server.shutdown()


def test_push_to_hub_uploads_the_adapter_and_its_card_but_never_the_data(run_dir, hub):
    model = lk.InferenceModel.load(run_dir)
    url = model.push_to_hub("org/repo", token="hf_secret", endpoint=hub.url)
    assert url == f"{hub.url}/org/repo/commit/{'a' * 40}"
    assert hub.repos["org/repo"]["visibility"] == "private"
    assert {auth for _, _, auth in hub.requests} == {"Bearer hf_secret"}
    assert hub.files["README.md"] == (run_dir / "README.md").read_bytes()
    assert hub.validated == [(run_dir / "README.md").read_text()]
    assert hub.files["adapter_model.safetensors"] == (run_dir / "adapter_model.safetensors").read_bytes()
    assert {"adapter_config.json", "lorakit_run.json", "tokenizer.json"} <= set(hub.files)
    assert not [
        name for name in hub.files if name.startswith(("data/", "checkpoints/")) or name.endswith(".jsonl")
    ]


def test_push_to_hub_of_a_merged_model_uploads_a_saved_directory(run_dir, hub):
    merged = lk.InferenceModel.load(run_dir).merge()
    merged.push_to_hub("org/merged", private=False, endpoint=hub.url, token="hf_x")
    assert hub.repos["org/merged"]["visibility"] == "public"
    assert {"config.json", "model.safetensors", "README.md", "lorakit_template.json"} <= set(hub.files)
    assert _front_matter(hub.files["README.md"].decode())["library_name"] == "transformers"
