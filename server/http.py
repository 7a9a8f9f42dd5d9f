"""HTTP plumbing shared by the endpoints: body limits, auth, SSE, disconnect watching."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from server.errors import APIError, bad_request, from_validation, unsupported


def check_auth(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # compare_digest: the time taken does not reveal how much of the key matched.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode("utf-8", "surrogateescape"), api_key.encode("utf-8")
    ):
        raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                       type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as error:  # bad JSON, bad UTF-8, absurd nesting
        raise bad_request(f"request body is not valid JSON: {error}") from error


def parse(model: type[BaseModel], body: Any, refused: dict[str, tuple] | None = None) -> Any:
    """Validate a JSON body; a field in ``refused`` set to a value other than its harmless
    defaults (or null) is a 400 that names it."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    for name, harmless in (refused or {}).items():
        value = body.get(name)
        if value is not None and not any(_same(value, ok) for ok in harmless):
            raise unsupported(name)
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise from_validation(error) from error


def _same(value: Any, harmless: Any) -> bool:
    # JSON true is not 1 here: {"best_of": true} is not the default best_of of 1.
    return type(value) is type(harmless) and value == harmless or (
        isinstance(harmless, float) and type(value) is int and value == harmless)


@asynccontextmanager
async def on_disconnect(request: Request, callback):
    """Run ``callback()`` if the client goes away while the block runs."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                await callback()
                return

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


def sse(data: dict) -> str:
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return f"data: {text}\n\n"


DONE = "data: [DONE]\n\n"


async def stream_events(
    request: Request, events: AsyncIterator[str], on_gone
) -> StreamingResponse:
    """Send SSE events; errors before the first event still become plain HTTP errors.

    Waiting for the first event (the request is queued or prefilling) keeps a 400 from
    the engine a 400, and a client that leaves meanwhile still aborts the request.
    """
    async with on_disconnect(request, on_gone):
        first = await events.__anext__()

    async def body() -> AsyncIterator[str]:
        yield first
        async for event in events:
            yield event

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
