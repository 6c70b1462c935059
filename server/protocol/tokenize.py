"""POST /tokenize and POST /detokenize bodies (extensions, not part of OpenAI's API)."""
from pydantic import Field

from server.protocol.chat import ChatMessage
from server.protocol.common import OpenAIRequest


class TokenizeRequest(OpenAIRequest):
    """Either ``prompt`` (plain text) or ``messages`` (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class DetokenizeRequest(OpenAIRequest):
    model: str | None = None
    tokens: list[int]
