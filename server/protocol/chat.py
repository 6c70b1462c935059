"""POST /v1/chat/completions request body."""
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.protocol.common import SamplingRequest

Role = Literal["system", "developer", "user", "assistant"]


class ChatMessage(BaseModel):
    """A message whose content is a string or a list of text parts, as many clients send."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def content_parts_are_text(cls, content: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(content, list):
            for part in content:
                part_type = part.get("type")
                if part_type != "text":
                    raise ValueError(f"content part type {part_type!r} is not supported; only 'text' parts are")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string 'text'")
        return content

    @model_validator(mode="after")
    def content_present(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part["text"] for part in self.content)

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # Accepted so that we can refuse them clearly rather than silently ignore them.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # Extensions.
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def completion_token_limit(self) -> tuple[int | None, str]:
        """The requested completion token limit and the parameter that set it."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"
