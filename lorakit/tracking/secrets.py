"""Secrets are never written: environment secrets and secret-looking keys are replaced by ``***``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["redact", "secret_values"]

_SECRET_WORDS = ("key", "token", "secret", "password", "passwd", "credential", "auth")


def secret_values() -> list[str]:
    """Values of environment variables whose names look like secrets (at least 8 characters long)."""
    return [
        value
        for name, value in os.environ.items()
        if any(word in name.lower() for word in _SECRET_WORDS) and len(value) >= 8
    ]


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """A copy with secret-looking keys' values and any environment secret inside strings replaced by ``***``."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, Mapping):
        return {
            k: "***"
            if any(w in str(k).lower() for w in _SECRET_WORDS) and isinstance(v, str) and v
            else redact(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
    return value
