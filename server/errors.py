"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause maps to a 4xx here; a 5xx means a server-side fault.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from server.adapter_errors import AdapterError, AdapterQueueFull


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
    """The most telling pydantic error, phrased for a client (which field, what was wrong).

    A union field (``prompt``, ``stop``, ...) reports one error per branch; the telling one
    is from the branch whose type fit but whose value did not (a list too long), not the
    type mismatch of the first branch ("Input should be a valid string").
    """
    errors = error.errors(include_url=False)
    first = errors[0]
    field = first["loc"][:1]
    same_field = [e for e in errors if e["loc"][:1] == field]
    chosen = next((e for e in same_field if not e["type"].endswith("_type")), first)
    path = ".".join(str(part) for part in chosen.get("loc", ()) if not _is_branch_tag(part))
    param = str(chosen["loc"][0]) if chosen.get("loc") else None
    return bad_request(f"invalid value for '{path or 'body'}': {chosen.get('msg')}", param=param)


def _is_branch_tag(part: object) -> bool:
    """A union branch pydantic names in an error's location (``list[int]``, ``str``)."""
    return isinstance(part, str) and (
        "[" in part or "(" in part or part in ("str", "int", "float", "bool", "none"))


def unsupported(field: str) -> APIError:
    return bad_request(f"'{field}' is not supported by this server", param=field,
                       code="unsupported_parameter")


def model_not_found(message: str) -> APIError:
    return APIError(404, message, type="not_found_error", param="model", code="model_not_found")


def adapter_refused(error: AdapterError, param: str = "model") -> APIError:
    """An adapter this server cannot load or route to, with the reason (4xx)."""
    kind = "permission_error" if error.status == 403 else "invalid_request_error"
    return APIError(error.status, str(error), type=kind, param=param, code=error.code)


def adapter_queue_full(error: AdapterQueueFull) -> APIError:
    return APIError(429, str(error), type="rate_limit_error", code="adapter_queue_full",
                    headers={"Retry-After": "1"})
