"""Renders chat messages to prompt text with the checkpoint's chat template (or an override)."""
from pathlib import Path

import jinja2
from transformers import PreTrainedTokenizerBase

from server.errors import invalid_request
from server.protocol.chat import ChatMessage

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


class ChatRenderer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, override: str | None) -> None:
        self.tokenizer = tokenizer
        self.template = override or tokenizer.chat_template or DOTS1_FALLBACK_TEMPLATE

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool, continue_final_message: bool) -> str:
        if add_generation_prompt and continue_final_message:
            raise invalid_request(
                "continue_final_message requires add_generation_prompt to be false", param="continue_final_message"
            )
        if continue_final_message and messages[-1].role != "assistant":
            raise invalid_request(
                "continue_final_message requires the last message to be from the assistant", param="messages"
            )
        conversation = [{"role": message.template_role(), "content": message.text()} for message in messages]
        try:
            return self.tokenizer.apply_chat_template(
                conversation,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
        except (jinja2.TemplateError, ValueError) as error:
            raise invalid_request(f"The messages cannot be rendered with the chat template: {error}", param="messages")
