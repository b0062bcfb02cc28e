"""Secrets are never written: environment secrets, credentials in URLs and secret-looking keys become ``***``.

What counts as a secret:

- the value of every environment variable whose name has a word like ``TOKEN``, ``KEY``, ``SECRET``,
  ``PASSWORD``, ``PASSWD``, ``CREDENTIAL(S)``, ``AUTH``, ``SIGNATURE`` or ``PAT`` (``WANDB_API_KEY``, ``HF_TOKEN``,
  ``MLFLOW_TRACKING_PASSWORD``, ``AWS_SECRET_ACCESS_KEY``, ...), at least 8 characters long;
- the user-info part of a URL (``https://user:pass@host`` -> ``https://***@host``) and the values of
  secret-looking query parameters (``?token=...``, ``&sig=...``, ``X-Amz-Signature=...``);
- strings shaped like well-known tokens (``hf_...``, ``sk-...``, ``AKIA...``), wherever they come from;
- in mappings, the string value of a key whose words look secret (``api_key``, ``password``, ``auth_token``;
  not ``max_new_tokens`` or ``tokenizer``).

Every file lorakit writes from a config, a report, samples or tracker parameters passes through
:func:`redact`. The rows you train on are data, not configuration: they are copied as they are.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["MASK", "is_secret_name", "redact", "redact_text", "secret_values"]

MASK = "***"
_SECRET_WORDS = frozenset(
    {"secret", "password", "passwd", "credential", "credentials", "auth", "signature", "sig", "pat"}
    | {"apikey"}
)
# Names with these words are secrets in the environment (``HF_TOKEN``, ``WANDB_API_KEY``); in a mapping only
# alone or with a qualifier (``api_key``, ``auth_token``), so ``eos_token`` or ``metric_key_prefix`` are kept.
_WEAK_WORDS = frozenset({"key", "keys", "token", "tokens"})
_QUALIFIERS = frozenset(
    {
        "auth",
        "access",
        "api",
        "hub",
        "bearer",
        "refresh",
        "session",
        "private",
        "personal",
        "oauth",
        "id",
        "hf",
    }
    | {"wandb", "github", "gh", "mlflow", "tracking", "security", "sas", "write", "read", "user", "service"}
    | {"secret", "openai", "license", "encryption", "signing", "ssh", "master", "client"}
)
_NAME_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_MIN_SECRET_LENGTH = 8

_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s@'\"<>]+)@")
_QUERY_SECRET = re.compile(r"(?P<name>[?&;](?:[A-Za-z0-9_.-]+))=(?P<value>[^&#\s'\"<>]+)")
_TOKEN_SHAPES = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}\b"  # Hugging Face
    r"|\bsk-[A-Za-z0-9_-]{20,}"  # OpenAI-style
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}\b"  # GitHub
)


def is_secret_name(name: Any, *, environment: bool = False) -> bool:
    """True when a key (or, with ``environment=True``, an environment variable) name looks secret.

    ``api_key``, ``apiKey``, ``db-password``, ``auth_token``, ``token``; for environment variables every
    ``*TOKEN*`` too (``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``). Not ``eos_token``, ``max_new_tokens``,
    ``tokenizer`` or ``keyboard``.
    """
    words = [word.lower() for word in _NAME_WORDS.findall(str(name))]
    if any(word in _SECRET_WORDS for word in words) or "apikey" in "".join(words):
        return True
    if not _WEAK_WORDS.intersection(words):
        return False
    return environment or len(words) == 1 or bool(_QUALIFIERS.intersection(words))


def secret_values() -> list[str]:
    """Values of environment variables whose names look like secrets (at least 8 characters), longest first."""
    found = {
        value
        for name, value in os.environ.items()
        if is_secret_name(name, environment=True) and len(value) >= _MIN_SECRET_LENGTH
    }
    return sorted(found, key=len, reverse=True)


def _query_value(match: re.Match[str]) -> str:
    name = match.group("name")
    return f"{name}={MASK}" if is_secret_name(name[1:]) else match.group(0)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with environment secrets, URL credentials, secret query values and token shapes masked."""
    secrets = secret_values() if secrets is None else secrets
    for secret in secrets:
        text = text.replace(secret, MASK)
    if "://" in text:
        text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    if "=" in text:
        text = _QUERY_SECRET.sub(_query_value, text)
    return _TOKEN_SHAPES.sub(MASK, text)


def redact(value: Any, secrets: list[str] | None = None, *, keys: bool = True) -> Any:
    """A copy of ``value`` (mappings, lists, tuples, strings, anything else as is) with every secret masked.

    Strings go through :func:`redact_text`; with ``keys=True`` the string value of a secret-looking key is
    masked as a whole. Mapping keys are kept (a key named after a secret is no secret).

    Example:
        >>> redact({"tracking_uri": "https://bob:pw@mlflow.example", "api_key": "abc", "max_new_tokens": 8}, [])
        {'tracking_uri': 'https://***@mlflow.example', 'api_key': '***', 'max_new_tokens': 8}
    """
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, Mapping):
        return {
            k: MASK
            if keys and isinstance(v, str) and v and is_secret_name(k)
            else redact(v, secrets, keys=keys)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets, keys=keys) for v in value]
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value
