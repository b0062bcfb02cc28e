"""Errors in the OpenAI shape: ``{"error": {"message", "type", "code", "param"}}`` with an HTTP status."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error the server answers with ``status`` and the OpenAI error body (never a crash)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unknown_model(model: str, known: list[str]) -> APIError:
    return APIError(
        404,
        f"The model {model!r} does not exist on this server; its models are: {', '.join(known)}.",
        code="model_not_found",
        param="model",
    )


def unauthorized() -> APIError:
    return APIError(
        401,
        "Missing or wrong API key: send the header 'Authorization: Bearer <key>' with the server's --api-key.",
        type="authentication_error",
        code="invalid_api_key",
    )


def too_large(limit: int) -> APIError:
    return APIError(
        413, f"The request body is larger than the server's limit of {limit} bytes.", code="request_too_large"
    )
