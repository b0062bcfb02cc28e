"""The app of ``lorakit serve``: model ids, request checks, the routes, SSE streaming, limits and API key.

Each request becomes one :class:`lorakit.generation.Row` for the :class:`~lorakit.serve.batcher.Batcher`;
the row's text callbacks feed an ``asyncio.Queue`` of the request's event loop, so every request streams its
own tokens while it is generated in a batch with others. A chat request is rendered with the template of the
adapter its ``model`` names (``InferenceModel.encode``), so a greedy answer equals ``InferenceModel.chat``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs

from lorakit.errors import ConfigError, DataError
from lorakit.generation import Decoding, Row, Sampling
from lorakit.inference import DEFAULT_ADAPTER, InferenceModel
from lorakit.serve.batcher import SCHEDULERS, Batcher
from lorakit.serve.errors import APIError, bad_request, too_large, unauthorized, unknown_model
from lorakit.serve.schemas import ChatRequest, CompletionRequest
from lorakit.templates.base import check_messages

__all__ = ["Limits", "create_app", "load_models", "run_server"]


@attrs.frozen
class Limits:
    """What one request may ask of the server, and how requests are batched."""

    max_tokens_cap: int = 1024
    """Largest ``max_tokens`` a request may ask for (above: 400)."""
    default_max_tokens: int = 256
    """``max_tokens`` of a request that gives none (cut to what the context has left)."""
    max_body_bytes: int = 1_000_000
    """Largest request body (above: 413)."""
    max_batch: int = 16
    """Most requests generated in one batch."""
    batch_window: float = 0.02
    """Seconds the batcher waits after each request for another to join the batch (at most 10 windows)."""
    scheduler: str = attrs.field(default="auto")
    """``continuous`` (requests join and leave the running batch between decode steps), ``static`` (one
    ``model.generate`` per batch) or ``auto`` (continuous when the adapters allow it: LoRA only)."""

    @scheduler.validator
    def _known(self, _: Any, value: str) -> None:
        if value not in SCHEDULERS:
            raise ConfigError(f"Limits.scheduler must be one of {', '.join(SCHEDULERS)}, got {value!r}.")


def load_models(
    runs: Mapping[str, str | Path] | Sequence[str | Path],
    *,
    trust_remote_code: bool = False,
    trust_template_classes: bool = False,
    allow_pickle: bool = False,
) -> tuple[InferenceModel, dict[str, str | None]]:
    """The base with every run's adapter on it, and the model id -> adapter name table of the server.

    ``runs`` maps model ids to run directories (a list uses each directory's name). The first run is loaded
    with :meth:`InferenceModel.load` (it brings the base); the others are adapters on the same base. A run
    without adapter (merged or full fine-tuning) can only be served alone.
    """
    items = list(runs.items()) if isinstance(runs, Mapping) else [(Path(p).name, p) for p in runs]
    if not items:
        raise ConfigError("lorakit serve needs at least one run directory.")
    names = [name for name, _ in items]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"Model ids must be unique and non-empty, got {names}; name them with NAME=RUN.")
    opt_ins = {"trust_remote_code": trust_remote_code, "trust_template_classes": trust_template_classes}
    first_id, first_path = items[0]
    model = InferenceModel.load(first_path, **opt_ins, allow_pickle=allow_pickle)
    routes: dict[str, str | None] = {first_id: DEFAULT_ADAPTER if model.adapters else None}
    for name, path in items[1:]:
        if not model.adapters:
            raise ConfigError(f"{first_path} holds a whole model, not an adapter: serve it alone.")
        routes[name] = model.load_adapter(path, name=name, **opt_ins, allow_pickle=allow_pickle)
    return model, routes


def _routes_of(model: InferenceModel) -> dict[str, str | None]:
    """Model ids of an InferenceModel: its adapters (``default`` under its directory's name), else the base."""
    if not model.adapters:
        return {Path(str(model.base_path)).name: None}
    return {
        (model.adapter_dir.name if name == DEFAULT_ADAPTER and model.adapter_dir else name): name
        for name in model.adapters
    }


class _Job(Row):
    """A request's row: its text and end arrive as events on the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *args: Any, **kwargs: Any) -> None:
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        super().__init__(*args, on_text=self._text, on_done=self._done, **kwargs)

    def _put(self, kind: str, value: Any) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def _text(self, piece: str) -> None:
        self._put("text", piece)

    def _done(self, row: Row) -> None:
        self._put("done", row.finish_reason)

    def fail(self, error: BaseException) -> None:
        self._put("error", error)

    async def stream(self) -> AsyncIterator[str]:
        """The text chunks until the row is done; a generation error becomes a 500."""
        while True:
            kind, value = await self.events.get()
            if kind == "text":
                yield value
            elif kind == "error":
                raise APIError(
                    500, f"Generation failed: {type(value).__name__}: {value}", type="server_error"
                )
            else:
                return


class _Server:
    """The model, its model ids, the limits and the batcher behind the routes."""

    def __init__(self, model: InferenceModel, routes: dict[str, str | None], limits: Limits) -> None:
        self.model = model
        self.routes = routes
        self.limits = limits
        self.created = int(time.time())
        self.context = getattr(model.model.config, "max_position_embeddings", None)
        self.batcher = Batcher(
            model,
            max_batch=limits.max_batch,
            window=limits.batch_window,
            fail=lambda row, e: row.fail(e),
            scheduler=limits.scheduler,
        )

    def adapter(self, model_id: str) -> str | None:
        if model_id not in self.routes:
            raise unknown_model(model_id, list(self.routes))
        return self.routes[model_id]

    def prompt(self, request: ChatRequest | CompletionRequest, adapter: str | None) -> list[int]:
        """The prompt's token ids, rendered with the adapter's own template."""
        if isinstance(request, ChatRequest):
            if not request.messages:
                raise bad_request("`messages` must not be empty.", param="messages")
            messages = [m.as_dict() for m in request.messages]
            try:
                check_messages(messages, add_generation_prompt=True)
            except DataError as error:
                raise bad_request(f"`messages`: {error}", param="messages") from error
            return self.model.encode(messages, adapter=adapter)
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) != 1:
            raise bad_request("One prompt per request: `prompt` must be a string.", param="prompt")
        return self.model.encode(prompts[0], adapter=adapter)

    def budget(self, request: ChatRequest | CompletionRequest, prompt_tokens: int) -> int:
        """``max_tokens`` checked against the cap and the context (400 with the numbers)."""
        cap, room = self.limits.max_tokens_cap, (self.context or 10**9) - prompt_tokens
        asked = request.budget()
        if asked is not None and asked > cap:
            raise bad_request(
                f"max_tokens={asked} is above this server's cap of {cap} (--max-tokens-cap).",
                param="max_tokens",
            )
        budget = asked if asked is not None else min(self.limits.default_max_tokens, cap, max(room, 1))
        if prompt_tokens + budget > (self.context or 10**9):
            raise bad_request(
                f"This model's maximum context length is {self.context} tokens, but {prompt_tokens + budget} "
                f"were requested ({prompt_tokens} in the prompt, {budget} for the completion). Shorten the "
                "prompt or lower max_tokens.",
                code="context_length_exceeded",
                param="messages" if isinstance(request, ChatRequest) else "prompt",
            )
        return budget

    def job(self, request: ChatRequest | CompletionRequest) -> tuple[_Job, int]:
        """The request as a row queued for generation, and its prompt's token count."""
        adapter = self.adapter(request.model)
        if request.n != 1:
            raise bad_request("Only n=1 is supported.", param="n")
        prompt = self.prompt(request, adapter)
        try:
            sampling = Sampling(
                self.budget(request, len(prompt)),
                request.temperature or 0.0,
                top_p=request.top_p,
                seed=request.seed,
                stop=request.stops(),
            )
        except ConfigError as error:
            raise bad_request(str(error)) from error
        tokenizer = self.model.tokenizer
        stops = self.model.template_for(adapter).stop_strings(tokenizer)
        decoding = Decoding.build(tokenizer, stops, sampling)
        bias = self.logit_bias(request.logit_bias)
        job = _Job(asyncio.get_running_loop(), tokenizer, prompt, decoding, adapter=adapter, logit_bias=bias)
        self.batcher.submit(job)
        return job, len(prompt)

    def logit_bias(self, bias: Mapping[str, float] | None) -> dict[int, float]:
        vocab = len(self.model.tokenizer)
        out: dict[int, float] = {}
        for key, value in (bias or {}).items():
            if not key.isdigit() or int(key) >= vocab or not -100 <= value <= 100:
                raise bad_request(
                    f"logit_bias {key!r}: {value!r}: keys are token ids below {vocab}, values in [-100, 100].",
                    param="logit_bias",
                )
            out[int(key)] = value
        return out


# --- responses -------------------------------------------------------------------------------------------


def _usage(prompt_tokens: int, job: Row) -> dict[str, int]:
    completion = len(job.tokens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _choice(chat: bool, text: str | None, finish: str | None, *, delta: bool) -> dict[str, Any]:
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    if delta:
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}


async def _complete(
    request: ChatRequest | CompletionRequest, job: _Job, prompt_tokens: int
) -> dict[str, Any]:
    chat = isinstance(request, ChatRequest)
    text = "".join([piece async for piece in job.stream()])
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [_choice(chat, text, job.finish_reason, delta=False)],
        "usage": _usage(prompt_tokens, job),
    }


async def _events(
    request: ChatRequest | CompletionRequest, job: _Job, prompt_tokens: int
) -> AsyncIterator[str]:
    """The server-sent events of a streamed request; leaving early (the client went away) cancels the row."""
    chat = isinstance(request, ChatRequest)
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": request.model,
    }

    def event(choices: list[dict[str, Any]], **more: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **more})}\n\n"

    try:
        if chat:
            yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        try:
            async for piece in job.stream():
                yield event([_choice(chat, piece, None, delta=True)])
        except APIError as error:
            yield f"data: {json.dumps(error.body())}\n\n"
            return
        yield event([_choice(chat, None, job.finish_reason, delta=True)])
        if request.stream_options is not None and request.stream_options.include_usage:
            yield event([], usage=_usage(prompt_tokens, job))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op when the row is done; else it stops at its next token


# --- the app ---------------------------------------------------------------------------------------------


class _Guard:
    """ASGI middleware: the API key (constant-time compare) on ``/v1/*`` and the request body size cap."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and scope["path"].startswith("/v1"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                await _send_error(send, unauthorized())
                return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await _send_error(send, too_large(self.max_body_bytes))
            return
        body, more, first = b"", True, None
        while more:
            message = await receive()
            if message["type"] != "http.request":
                first = message
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await _send_error(send, too_large(self.max_body_bytes))
                return
        replayed = False

        async def replay() -> dict[str, Any]:  # the body once, then the client's own messages (disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return first or {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        # The body is JSON whatever its content type says (curl -d sends a form type).
        headers[b"content-type"] = b"application/json"
        scope = {**scope, "headers": list(headers.items())}
        await self.app(scope, replay, send)


async def _send_error(send: Any, error: APIError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _validation_message(errors: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            return f"Malformed JSON in the request body at position {error['loc'][-1]}: {detail}."
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "Invalid request: " + "; ".join(parts)


def _add_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def answer(error: APIError) -> Any:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def api_error(_: Any, error: APIError) -> Any:
        return answer(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Any, error: RequestValidationError) -> Any:
        return answer(bad_request(_validation_message(error.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(_: Any, error: HTTPException) -> Any:
        kind = "not_found" if error.status_code == 404 else None
        return answer(APIError(error.status_code, str(error.detail), code=kind))


def _add_routes(app: Any, server: _Server) -> None:
    from fastapi.responses import StreamingResponse

    async def respond(request: ChatRequest | CompletionRequest) -> Any:
        job, prompt_tokens = server.job(request)
        if request.stream:
            return StreamingResponse(_events(request, job, prompt_tokens), media_type="text/event-stream")
        try:
            return await _complete(request, job, prompt_tokens)
        finally:
            job.cancel()  # the handler was cancelled (the client went away): stop generating for it

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest) -> Any:
        return await respond(request)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> Any:
        return await respond(request)

    @app.get("/v1/models")
    async def models() -> Any:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": server.created, "owned_by": "lorakit"}
                for name in server.routes
            ],
        }

    @app.get("/health")
    async def health() -> Any:
        batcher = server.batcher
        return {
            "status": "ok",
            "models": list(server.routes),
            "active": batcher.active,
            "scheduler": batcher.scheduler,
            "batches": batcher.batches,
            "steps": batcher.steps,
            "cancelled": batcher.cancelled,
        }


def create_app(
    model_or_runs: InferenceModel | Mapping[str, str | Path] | Sequence[str | Path],
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    trust_remote_code: bool = False,
    trust_template_classes: bool = False,
    allow_pickle: bool = False,
) -> Any:
    """The FastAPI app serving an :class:`InferenceModel` (its adapters are the model ids; ``default`` under
    its run directory's name) or run directories (``{model id: run}``, see :func:`load_models`).

    ``api_key`` requires ``Authorization: Bearer <api_key>`` on ``/v1/*`` (``/health`` stays open);
    ``limits`` caps ``max_tokens``, the body size and the batch (:class:`Limits`). The trust opt-ins are
    those of :meth:`InferenceModel.load`. On shutdown, queued and running requests are finished first.
    """
    from fastapi import FastAPI

    if isinstance(model_or_runs, InferenceModel):
        model, routes = model_or_runs, _routes_of(model_or_runs)
    else:
        model, routes = load_models(
            model_or_runs,
            trust_remote_code=trust_remote_code,
            trust_template_classes=trust_template_classes,
            allow_pickle=allow_pickle,
        )
    limits = limits or Limits()
    server = _Server(model, routes, limits)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(server.batcher.close)

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    app.state.server = server
    _add_handlers(app)
    _add_routes(app, server)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    return app


def run_server(
    app: Any, *, host: str = "127.0.0.1", port: int = 8000, graceful_timeout: float = 60.0
) -> None:
    """Serve ``app`` with uvicorn until SIGINT / SIGTERM; in-flight requests get ``graceful_timeout`` seconds
    to finish before the server exits."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=graceful_timeout, log_level="info")
