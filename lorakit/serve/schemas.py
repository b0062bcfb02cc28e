"""Request bodies of the OpenAI API subset the server speaks (pydantic; unknown fields are ignored)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Request):
    type: Literal["text"] = "text"
    text: str


class Message(_Request):
    role: str
    content: str | list[ContentPart] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The message as lorakit's templates take it (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class StreamOptions(_Request):
    include_usage: bool = False


class _Generation(_Request):
    """The sampling fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def budget(self) -> int | None:
        return self.max_tokens


class ChatRequest(_Generation):
    messages: list[Message]
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Generation):
    prompt: str | list[str]
