"""``lorakit serve``: an OpenAI-compatible HTTP server for one base model and any number of adapters.

    from lorakit.serve import create_app
    app = create_app({"support": "runs/support", "legal": "runs/legal"}, api_key="s3cret")
    # uvicorn.run(app, port=8000); then any OpenAI client: model="support" picks that adapter

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
``stream=true`` as server-sent events), ``GET /health``. Requests are batched continuously: they join the
running batch between decode steps and leave it when done (:mod:`lorakit.serve.batcher`; ``static`` batching
is kept), also when they ask for different adapters. Needs the ``serve`` extra: ``pip install 'lorakit[serve]'``.
"""

from __future__ import annotations

from lorakit.errors import MissingDependencyError

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as error:
    raise MissingDependencyError(
        f"`lorakit serve` needs FastAPI and uvicorn ({error.name} is missing): pip install 'lorakit[serve]'"
    ) from error

from lorakit.serve.app import Limits, create_app, load_models, run_server

__all__ = ["Limits", "create_app", "load_models", "run_server"]
