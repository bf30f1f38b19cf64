"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

An `APIError` is raised anywhere in a request's handling and becomes that response; an
operator's exception for one request is mapped by `from_exception` (a bad record is the
client's fault, 400; a model or index that is missing or a temporary failure is 503; anything
else is 500 with a message that shows no internals)."""

from __future__ import annotations

from typing import Any

from sage_cli.operators.base import (
    OptionError,
    RecordError,
    ResourceUnavailable,
    TransientError,
)


class APIError(Exception):
    """An HTTP error answer in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ContextLengthExceeded(RecordError):
    """A request's own messages leave no room for the answer in the model's context."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_exception(exc: BaseException) -> APIError:
    """The answer for an exception raised while one request was processed."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthExceeded):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, RecordError | OptionError):
        return APIError(400, str(exc))
    if isinstance(exc, TransientError):
        return APIError(503, str(exc), type="server_error", code="temporarily_unavailable")
    if isinstance(exc, ResourceUnavailable):
        return APIError(503, str(exc), type="server_error", code="model_unavailable")
    return APIError(
        500,
        f"internal error ({type(exc).__name__}); the server log has the details",
        type="server_error",
    )
