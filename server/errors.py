"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause maps to a 4xx here; a 5xx means a server-side fault.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation(error: ValidationError) -> APIError:
    """The first pydantic error, phrased for a client (which field, what was wrong)."""
    first = error.errors(include_url=False)[0]
    path = ".".join(str(part) for part in first.get("loc", ()))
    # Union types report a branch name after the field; the field is the parameter.
    param = str(first["loc"][0]) if first.get("loc") else None
    return bad_request(f"invalid value for '{path or 'body'}': {first.get('msg')}", param=param)
