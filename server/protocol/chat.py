"""POST /v1/chat/completions request body."""
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.protocol.common import SamplingRequest

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """A message whose content is a string or a list of text parts, as many clients send."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    function_call: FunctionCall | None = None  # assistant messages, legacy
    tool_call_id: str | None = None  # tool messages
    # A reasoning model's earlier thoughts, as clients send them back; dots.llm1 does not reason: never rendered.
    reasoning_content: str | None = None
    reasoning: str | None = None

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
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.role == "function" and self.name is None:
            raise ValueError("a function message needs the name of the function")
        if (self.tool_calls or self.function_call) and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls or function_call")
        if self.function_call is not None:
            if self.tool_calls:
                raise ValueError("give tool_calls or function_call, not both")
            self.tool_calls = [ToolCall(id=f"call_{self.function_call.name}", function=self.function_call)]
            self.function_call = None
        return self

    def uses_tools(self) -> bool:
        return bool(self.tool_calls) or self.role in ("tool", "function")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part["text"] for part in self.content)

    def template_role(self) -> str:
        return {"developer": "system", "function": "tool"}.get(self.role, self.role)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    functions: list[dict[str, Any]] | None = None  # legacy: mapped onto tools
    function_call: str | dict[str, Any] | None = None  # legacy: mapped onto tool_choice
    response_format: dict[str, Any] | None = None
    # Extensions.
    structured_outputs: dict[str, Any] | None = None  # vLLM's: json, regex, choice, grammar (Lark), json_object
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def completion_token_limit(self) -> tuple[int | None, str]:
        """The requested completion token limit and the parameter that set it."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"
