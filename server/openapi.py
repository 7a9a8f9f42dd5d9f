"""``/openapi.json`` with the request body of every endpoint.

The endpoints read their bodies themselves (size limit first, then JSON, then the
schema), so FastAPI cannot see the schemas; this puts them back, so that ``/docs``,
client generators and schema fuzzers know what each endpoint takes and returns.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.responses_schemas import ResponseObject, ResponsesRequest
from server.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadAdapterRequest,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadAdapterRequest,
    VersionResponse,
)

# path: (method, request body or None, response body or None for plain text)
ROUTES: dict[str, tuple[str, type[BaseModel] | None, type[BaseModel] | None]] = {
    "/v1/completions": ("post", CompletionRequest, CompletionResponse),
    "/v1/chat/completions": ("post", ChatCompletionRequest, ChatCompletionResponse),
    "/v1/responses": ("post", ResponsesRequest, ResponseObject),
    "/tokenize": ("post", TokenizeRequest, TokenizeResponse),
    "/detokenize": ("post", DetokenizeRequest, DetokenizeResponse),
    "/v1/models": ("get", None, ModelList),
    "/version": ("get", None, VersionResponse),
    "/v1/load_lora_adapter": ("post", LoadAdapterRequest, None),
    "/v1/unload_lora_adapter": ("post", UnloadAdapterRequest, None),
}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def install_openapi(app: FastAPI, version: str) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=version, routes=app.routes)
        models = {m for _, body, out in ROUTES.values() for m in (body, out) if m is not None}
        modes = [(m, "validation" if m in {b for _, b, _ in ROUTES.values()} else
                  "serialization") for m in sorted(models, key=lambda m: m.__name__)]
        _, defs = models_json_schema(modes, ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.get("$defs", {}))
        components["Error"] = _ERROR
        for path, (method, body, out) in ROUTES.items():
            operation = schema["paths"][path][method]
            if body is not None:
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": _ref(body)}}}
            content = ({"text/plain": {"schema": {"type": "string"}}} if out is None
                       else {"application/json": {"schema": _ref(out)}})
            operation["responses"] = {
                "200": {"description": "OK", "content": content},
                "4XX": {"description": "OpenAI-style error", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}},
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
