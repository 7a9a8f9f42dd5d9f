"""The FastAPI app: routes, error mapping, lifespan. Endpoint logic lives in its own module."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib.metadata import version as _version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.adapter_api import load_adapter, unload_adapter
from server.adapter_errors import AdapterError
from server.backends.base import Backend, EngineDeadError
from server.chat import create_chat_completion
from server.completions import create_completion
from server.errors import APIError, adapter_refused, bad_request, model_not_found
from server.http import check_auth, parse, read_json
from server.openapi import install_openapi
from server.responses import create_response, parse_responses
from server.responses_schemas import REFUSED_RESPONSES
from server.schemas import (
    REFUSED,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    VersionResponse,
)
from server.state import ServerSettings, ServerState
from server.tokenize import detokenize, tokenize

logger = logging.getLogger(__name__)
VERSION = _version("talan-serve")
WATCH_INTERVAL_S = 1.0


def create_app(
    backend: Backend,
    settings: ServerSettings | None = None,
    on_engine_dead: Callable[[], None] | None = None,
) -> FastAPI:
    """The app; ``on_engine_dead`` runs once if the engine dies (the CLI stops the server
    then, with a non-zero exit status, so that a supervisor restarts it)."""
    state = ServerState(backend, settings or ServerSettings())
    started = int(time.time())
    Gauge("talan_serve_engine_unfinished_requests",
          "Requests the engine still holds (0 when idle; a leak check)",
          registry=state.metrics.registry).set_function(backend.num_unfinished)
    adapters = getattr(backend, "served_adapters", None)
    if adapters is not None:
        adapters.events = state.metrics.adapters
        state.metrics.adapters.loaded_now.set_function(adapters.loaded_count)

    async def watch_engine() -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                await backend.health()
            except EngineDeadError as error:
                logger.error("the engine died (%s): stopping the server", error)
                state.engine_dead = True
                if on_engine_dead is not None:
                    on_engine_dead()
                return

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()  # adapters given at start, before the first request
        watcher = asyncio.create_task(watch_engine())
        yield
        watcher.cancel()
        # Reached after uvicorn has drained in-flight requests (SIGTERM/SIGINT).
        await backend.shutdown()

    app = FastAPI(title="talan-serve", lifespan=lifespan, redoc_url=None)
    install_openapi(app, VERSION)
    app.state.server = state

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return bad_request(str(error.errors()[:1])).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def server_fault(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return APIError(500, f"internal error: {type(error).__name__}",
                        type="server_error").response()

    def guard(request: Request) -> None:
        check_auth(request, state.settings.api_key)

    def check_model(name: str | None) -> None:
        try:
            accepted = state.accepts_model(name)
        except AdapterError as error:  # a name --adapter-dir refuses, with the reason
            raise adapter_refused(error) from error
        if not accepted:
            served = [backend.info.name, *state.settings.served_names,
                      *(state.registry.names() if state.registry is not None else ())]
            raise model_not_found(f"The model '{name}' does not exist; this server serves "
                                  + ", ".join(f"'{n}'" for n in served))

    @app.get("/health")
    async def health() -> Response:
        if state.admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        try:
            await backend.health()
        except EngineDeadError as error:
            return JSONResponse({"status": "engine_dead", "detail": str(error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        guard(request)
        info = backend.info
        common = dict(created=started, max_model_len=info.max_model_len, dtype=info.dtype,
                      deterministic=state.settings.deterministic)
        cards = [ModelCard(id=name, talan=info.talan, adapter=info.lora_mode, root=info.name,
                           loaded=True, **common)
                 for name in (info.name, *state.settings.served_names)]
        registry = state.registry
        for adapter in registry.served() if registry is not None else ():
            cards.append(ModelCard(
                id=adapter.name, talan=adapter.has_talan, root=str(adapter.path),
                parent=info.name, adapter="per_request" if adapter.lora_rank else None,
                loaded=True, pinned=adapter.pinned, **common))
        for entry, (talan, lora) in (await adapters.unloaded_entries()
                                     if adapters is not None else ()):
            cards.append(ModelCard(id=entry.name, talan=talan, root=str(entry.path),
                                   parent=info.name, adapter="per_request" if lora else None,
                                   loaded=False, pinned=False, **common))
        return ModelList(data=cards)

    async def counted(request: Request, endpoint: str, run) -> Response:
        """Auth, the body, ``run(body)``, and the request counted by its status."""
        try:
            guard(request)
            response = await run(await read_json(request, state.settings.max_body_bytes))
        except APIError as error:
            state.metrics.requests.labels(endpoint, str(error.status)).inc()
            raise
        state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    async def handle(request: Request, endpoint: str, schema, create) -> Response:
        async def run(raw) -> Response:
            body = parse(schema, raw, REFUSED[endpoint])
            check_model(body.model)
            return await create(state, body, request)

        return await counted(request, endpoint, run)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, "completions", CompletionRequest, create_completion)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await handle(request, "chat", ChatCompletionRequest, create_chat_completion)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        async def run(raw) -> Response:
            body = parse_responses(raw, REFUSED_RESPONSES)
            check_model(body.model)
            return await create_response(state, body, request)

        return await counted(request, "responses", run)

    def tokenizer_endpoint(tokenizer_call):
        async def run(body) -> Response:
            model, response = tokenizer_call(state, body)
            check_model(model)
            return response

        return run

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> Response:
        return await counted(request, "tokenize", tokenizer_endpoint(tokenize))

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> Response:
        return await counted(request, "detokenize", tokenizer_endpoint(detokenize))

    @app.post("/v1/load_lora_adapter")
    async def load_adapter_route(request: Request) -> Response:
        return await counted(request, "load_adapter", lambda body: load_adapter(state, body))

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter_route(request: Request) -> Response:
        return await counted(request, "unload_adapter",
                             lambda body: unload_adapter(state, body))

    @app.get("/version")
    async def version() -> VersionResponse:
        info = backend.info
        return VersionResponse(version=VERSION, engine=info.engine,
                               engine_version=info.engine_version)

    return app
