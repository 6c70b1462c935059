"""Request bodies of ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``, as Anthropic defines them.

Blocks may carry ``cache_control`` (and text blocks ``citations``): accepted and ignored. Thinking blocks and the
``thinking`` parameter are accepted and ignored (dots.llm1 does not reason). Images, documents and server-side tool
blocks are refused with a message saying so.
"""
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from server.protocol.common import OpenAIRequest

UNSUPPORTED_BLOCKS = {
    "image": "image blocks are not supported: dots.llm1 reads text only",
    "document": "document blocks are not supported: dots.llm1 reads text only; send the text in a text block",
}
USER_BLOCKS = ("text", "tool_result", "thinking", "redacted_thinking")
ASSISTANT_BLOCKS = ("text", "tool_use", "thinking", "redacted_thinking")


def check_block_types(blocks: Any, allowed: tuple[str, ...]) -> Any:
    """A clear refusal for blocks this server cannot read, before pydantic's union errors."""
    if not isinstance(blocks, list):
        return blocks
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in UNSUPPORTED_BLOCKS:
            raise ValueError(UNSUPPORTED_BLOCKS[kind])
        if kind not in allowed:
            raise ValueError(f"content block type {kind!r} is not supported here; supported: {list(allowed)}")
        if kind == "tool_result":
            check_block_types(block.get("content"), ("text",))
    return blocks


class Block(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextBlock(Block):
    type: Literal["text"]
    text: str


class ToolUseBlock(Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(block.text for block in self.content)


class ThinkingBlock(Block):
    type: Literal["thinking", "redacted_thinking"]


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


class InputMessage(Block):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def blocks_are_supported(cls, content: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        return check_block_types(content, ASSISTANT_BLOCKS if role == "assistant" else USER_BLOCKS)

    def blocks(self) -> list[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock]:
        return [TextBlock(type="text", text=self.content)] if isinstance(self.content, str) else self.content


class ToolDefinition(Block):
    type: Literal["custom"] | None = None
    name: str
    description: str | None = None
    input_schema: dict[str, Any]

    @field_validator("type", mode="before")
    @classmethod
    def client_tool(cls, kind: Any) -> Any:
        if kind not in (None, "custom"):
            raise ValueError(f"tool type {kind!r} is one of Anthropic's server tools, which this server does not "
                             "run; give client tools as {name, description, input_schema}")
        return kind


class ToolChoiceAuto(Block):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(Block):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(Block):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(Block):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class Metadata(Block):
    user_id: str | None = None


class MessagesInput(OpenAIRequest):
    """What both routes read: the conversation and the tools, which together make the prompt."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = None  # accepted and ignored: dots.llm1 does not reason

    @field_validator("system", mode="before")
    @classmethod
    def system_is_text(cls, system: Any) -> Any:
        return check_block_types(system, ("text",))


class CountTokensRequest(MessagesInput):
    pass


class MessagesRequest(MessagesInput):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: Metadata | None = None
    service_tier: str | None = None  # accepted: there is one tier here
    # Extension: scheduling priority, lower is served earlier (vLLM's semantics); passed on to the chat request.
    priority: int = 0
