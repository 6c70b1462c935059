"""Renders chat messages to prompt text with the checkpoint's chat template (or an override).

Conversations with tools (tool definitions, assistant tool calls, tool results) need a template that knows them:
the active template when it reads ``tools``, else the tool-aware dots.llm1 template shipped in ``chat_templates/``.
"""
import json
import logging
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from transformers import PreTrainedTokenizerBase

from server.errors import invalid_request
from server.protocol.chat import ChatMessage

logger = logging.getLogger(__name__)

TOOL_TEMPLATE_PATH = Path(__file__).resolve().parent / "chat_templates" / "dots1-tools.jinja"

# The dots.llm1 instruct format, used only when neither the checkpoint nor --chat-template provides one.
DOTS1_FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}<|endofsystem|>"
    "{% elif message['role'] == 'user' %}<|userprompt|>{{ message['content'] }}<|endofuserprompt|>"
    "{% else %}<|response|>{{ message['content'] }}<|endofresponse|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|response|>{% endif %}"
)


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a path to a Jinja file, or the template itself."""
    if value is None:
        return None
    path = Path(value)
    if "{" not in value and path.is_file():
        return path.read_text()
    if "{%" in value or "{{" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is neither a readable file nor a Jinja template")


def handles_tools(template: str) -> bool:
    """Whether a chat template reads the ``tools`` variable (so it renders tool definitions itself)."""
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateError:
        return False


def template_message(message: ChatMessage) -> dict[str, Any]:
    rendered: dict[str, Any] = {"role": message.template_role(), "content": message.text()}
    if message.tool_calls:
        rendered["tool_calls"] = [
            {"id": call.id, "type": call.type,
             "function": {"name": call.function.name, "arguments": parsed_arguments(call.function.arguments)}}
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        rendered["name"] = message.name
    return rendered


def parsed_arguments(arguments: str) -> Any:
    """Templates (ours and Hugging Face's) take a call's arguments as a mapping; OpenAI sends them as JSON text."""
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


class ChatRenderer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, override: str | None) -> None:
        self.tokenizer = tokenizer
        self.template = override or tokenizer.chat_template or DOTS1_FALLBACK_TEMPLATE
        if handles_tools(self.template):
            self.tool_template = self.template
        else:
            self.tool_template = TOOL_TEMPLATE_PATH.read_text()
            logger.info("the chat template does not handle tools; tool conversations use %s", TOOL_TEMPLATE_PATH)

    def render(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if add_generation_prompt and continue_final_message:
            raise invalid_request(
                "continue_final_message requires add_generation_prompt to be false", param="continue_final_message"
            )
        if continue_final_message and messages[-1].role != "assistant":
            raise invalid_request(
                "continue_final_message requires the last message to be from the assistant", param="messages"
            )
        conversation = [template_message(message) for message in messages]
        uses_tools = bool(tools) or any(message.uses_tools() for message in messages)
        try:
            return self.tokenizer.apply_chat_template(
                conversation,
                tools=tools or None,
                chat_template=self.tool_template if uses_tools else self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
        except (jinja2.TemplateError, ValueError) as error:
            raise invalid_request(f"The messages cannot be rendered with the chat template: {error}", param="messages")
