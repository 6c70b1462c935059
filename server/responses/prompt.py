"""The prompt of a response: instructions and conversation rendered with the chat template; under
``truncation: auto`` the oldest turns are dropped until it fits the context with room for the answer."""
from server.errors import invalid_request
from server.protocol.chat import ChatMessage
from server.tokenization import PromptInput, Tokenization
from server.tools import ToolSetup


def without_oldest_turn(conversation: list[ChatMessage]) -> list[ChatMessage] | None:
    """The conversation without its oldest non-system message (and the tool results it left unanswered);
    None when only the last message is left to drop."""
    droppable = [index for index, message in enumerate(conversation[:-1]) if message.template_role() != "system"]
    if not droppable:
        return None
    kept = conversation[: droppable[0]]
    rest = conversation[droppable[0] + 1 :]
    while len(rest) > 1 and rest[0].role == "tool":
        rest = rest[1:]
    return kept + rest


async def response_prompt(
    tokenization: Tokenization, instructions: str | None, conversation: list[ChatMessage], tools: ToolSetup,
    truncate: bool, max_model_len: int, answer_room: int,
) -> PromptInput:
    system = [ChatMessage(role="system", content=instructions)] if instructions is not None else []
    while True:
        prompt = await tokenization.chat_prompt(system + conversation, True, False, tools.template_tools())
        if not truncate or len(prompt.token_ids) + answer_room <= max_model_len:
            return prompt
        shorter = without_oldest_turn(conversation)
        if shorter is None:
            raise invalid_request(
                f"The input is {len(prompt.token_ids)} tokens even with only its last message kept; with "
                f"{answer_room} for the answer it does not fit the context of {max_model_len} tokens.",
                param="input", code="context_length_exceeded",
            )
        conversation = shorter
