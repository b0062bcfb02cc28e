"""A small web service that serves several LoRA adapters on one base model through lorakit.InferenceModel.

Configuration comes from the environment:

    LORAKIT_BASE       the base model (local path, Hub id or "smollm2-135m")
    LORAKIT_ADAPTERS   name=run_dir pairs, comma separated, e.g. "support=runs/support,legal=runs/legal"
    LORAKIT_TEMPLATE   the template for requests without an adapter (default: the tokenizer's own, "model")

Run it with ``uvicorn app:app --port 8000`` from this directory, then:

    curl localhost:8000/adapters
    curl -X POST localhost:8000/generate -H 'content-type: application/json' \
         -d '{"adapter": "support", "prompt": "My card was charged twice.", "max_new_tokens": 16}'

The base weights are loaded once; each adapter adds only its LoRA weights. Each adapter renders prompts with the
template it was trained with. Requests run in FastAPI's thread pool, and InferenceModel serialises them, so
concurrent requests to different adapters each get their own adapter's output.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

import lorakit as lk


class GenerateRequest(BaseModel):
    prompt: str | dict[str, str] = Field(description="a prompt string or an alpaca-style row")
    adapter: str | None = Field(
        default=None, description="a loaded adapter name; none for the bare base model"
    )
    max_new_tokens: int = Field(default=64, ge=1, le=1024)


class GenerateResponse(BaseModel):
    adapter: str | None
    text: str


def parse_adapters(spec: str) -> dict[str, str]:
    """``"a=runs/a,b=runs/b"`` -> ``{"a": "runs/a", "b": "runs/b"}``."""
    adapters: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise lk.ConfigError(f"LORAKIT_ADAPTERS item {item!r} must look like name=run_dir.")
        adapters[name.strip()] = path.strip()
    return adapters


def load_model() -> lk.InferenceModel:
    base = os.environ.get("LORAKIT_BASE")
    if not base:
        raise lk.ConfigError("Set LORAKIT_BASE to the base model (a local path, a Hub id or 'smollm2-135m').")
    model = lk.InferenceModel.from_model(base, template=os.environ.get("LORAKIT_TEMPLATE", "model"))
    for name, path in parse_adapters(os.environ.get("LORAKIT_ADAPTERS", "")).items():
        model.load_adapter(path, name=name)
    return model


state: dict[str, lk.InferenceModel] = {}


@asynccontextmanager
async def lifespan(app: FastAPI):
    state["model"] = load_model()
    yield
    state.clear()


app = FastAPI(title="lorakit adapter service", lifespan=lifespan)


@app.get("/adapters")
def adapters() -> dict[str, list[str]]:
    return {"adapters": state["model"].adapters}


@app.post("/generate", response_model=GenerateResponse)
def generate(request: GenerateRequest) -> GenerateResponse:  # sync: runs in the thread pool
    model = state["model"]
    try:
        text = model.generate(request.prompt, adapter=request.adapter, max_new_tokens=request.max_new_tokens)
    except lk.ConfigError as error:  # e.g. an adapter that is not loaded: the message lists the loaded ones
        raise HTTPException(status_code=404, detail=str(error)) from error
    return GenerateResponse(adapter=request.adapter, text=text)
