"""OpenAI-shaped errors for the HTTP API: one exception type, one JSON body, the handlers.

Every failure a client can cause ends as `{"error": {"message", "type", "param", "code"}}`
with a 4xx status; anything else is a 500 in the same shape, with the traceback kept in the
server log and out of the response."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from inference.admission import QueueFull, RequestTooLarge
from inference.async_engine import EngineNotReady
from inference.errors import InferenceError, InvalidParameter, ModelNotFound

log = logging.getLogger(__name__)

# 499 is nginx's "client closed request": nobody reads it, but the access log shows it.
CLIENT_CLOSED = 499

_TYPES = {
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


class APIError(Exception):
    """An error with everything the OpenAI error body needs."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}


class ClientDisconnected(APIError):
    def __init__(self) -> None:
        super().__init__(CLIENT_CLOSED, "the client closed the connection", code="client_disconnected")


def printable(text: str) -> str:
    """`text` as valid Unicode: a lone UTF-16 surrogate (from a client's JSON escape) cannot be
    encoded as UTF-8, so it is spelled out (backslash-u) instead of failing the response."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(err: APIError) -> dict[str, Any]:
    param = None if err.param is None else printable(err.param)
    return {"error": {"message": printable(err.message), "type": err.type, "param": param, "code": err.code}}


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers={**err.headers, **(headers or {})})


def param_path(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content' (how clients write it)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def from_validation(errors: list[dict[str, Any]]) -> APIError:
    """The first pydantic error as a 400 naming its field; FastAPI's own 422 is not OpenAI's."""
    if not errors:
        return APIError(400, "invalid request")
    e = errors[0]
    loc = tuple(e.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header"):  # FastAPI prefixes the source
        loc = loc[1:]
    param = param_path(loc) or None
    kind = e.get("type", "")
    if kind == "extra_forbidden":
        return APIError(
            400, f"Unsupported parameter: '{param}' is not supported by this server.", param, "unsupported_parameter"
        )
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    got = e.get("input")
    shown = repr(got) if isinstance(got, (int, float, str, bool)) or got is None else type(got).__name__
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return APIError(
        400, f"Invalid value for '{param}': {e.get('msg', 'invalid')} (got {shown}).", param, "invalid_value"
    )


def _invalid_parameter(err: InvalidParameter) -> APIError:
    return APIError(400, f"Invalid value for '{err.param}': {err.message}", err.param, "invalid_value")


def _sentence(text: str) -> str:
    return f"{text[:1].upper()}{text[1:]}."


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to the APIError a client should see (500 for the unexpected)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ClientDisconnect):  # gone while we read its body: nobody to answer
        return ClientDisconnected()
    if isinstance(exc, InvalidParameter):
        return _invalid_parameter(exc)
    if isinstance(exc, ValidationError):
        return from_validation(exc.errors())
    if isinstance(exc, ModelNotFound):
        return APIError(404, str(exc), "model", "model_not_found")
    if isinstance(exc, QueueFull):
        return APIError(429, _sentence(str(exc)), code="queue_full", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, RequestTooLarge):
        # Retrying the same request cannot help: tell clients (the openai package honours it) not to.
        return APIError(
            429, _sentence(exc.message), exc.param, "request_too_large", headers={"x-should-retry": "false"}
        )
    if isinstance(exc, EngineNotReady):
        return APIError(503, _sentence(str(exc)), code="model_not_ready")
    if isinstance(exc, InferenceError):
        # The model loop is down or the engine refused the request for a reason of its own.
        return APIError(503, f"the engine cannot serve this request: {exc}", code="engine_unavailable")
    return APIError(500, "internal server error; see the server log", code="internal_error")


def install_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        if err.status >= 500 and not isinstance(exc, (APIError, InferenceError)):
            log.error("unhandled error", exc_info=exc)
        elif err.status >= 500:
            log.warning("request failed: %s", exc)
        return error_response(err)

    async def request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation(list(exc.errors())))

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = APIError(exc.status_code, str(exc.detail), code=code)
        return error_response(err, headers=dict(exc.headers) if exc.headers else None)

    for kind in (APIError, ClientDisconnect, InvalidParameter, ValidationError, InferenceError, Exception):
        app.add_exception_handler(kind, api_error)
    app.add_exception_handler(RequestValidationError, request_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
