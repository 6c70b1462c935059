"""Prompt text and token ids: chat rendering, tokenizing (off the event loop when long), /detokenize's range check.

The token ids of a prompt are checked by the engine's request check, with every other request rule."""
import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from server.chat_template import ChatRenderer
from server.errors import invalid_request
from server.protocol.chat import ChatMessage
from server.protocol.completions import Prompt

INLINE_CHARS = 4096  # shorter texts tokenize in well under a millisecond: not worth a thread hop
MAX_PROMPTS_PER_REQUEST = 64


@dataclass
class PromptInput:
    token_ids: list[int]
    text: str | None  # the prompt as the client sent it, when it was text


class Tokenization:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, renderer: ChatRenderer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.vocab_size = vocab_size
        # One worker: long texts tokenize off the event loop, one at a time (the detokenizer has its own tokenizer).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def run(self, size: int, function, *args):
        if size <= INLINE_CHARS:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    def encode_now(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return await self.run(len(text), self.encode_now, text, add_special_tokens)

    async def decode(self, token_ids: list[int]) -> str:
        self.check_token_ids(token_ids, "tokens")
        return await self.run(len(token_ids) * 4, self.tokenizer.decode, token_ids)

    async def render_chat(
        self, messages: list[ChatMessage], add_generation_prompt: bool, continue_final_message: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        size = sum(len(message.text()) for message in messages)
        return await self.run(
            size, self.renderer.render, messages, add_generation_prompt, continue_final_message, tools
        )

    async def chat_prompt(
        self, messages: list[ChatMessage], add_generation_prompt: bool, continue_final_message: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> PromptInput:
        text = await self.render_chat(messages, add_generation_prompt, continue_final_message, tools)
        # The template already wrote every special token the model expects.
        token_ids = await self.encode(text, add_special_tokens=False)
        return PromptInput(token_ids=token_ids, text=text)

    async def completion_prompts(self, prompt: Prompt) -> list[PromptInput]:
        """Accepts a string, a list of strings, a list of token ids or a list of token-id lists."""
        if not prompt:
            raise invalid_request("prompt must not be empty", param="prompt")
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        if len(prompt) > MAX_PROMPTS_PER_REQUEST:
            raise invalid_request(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request", param="prompt")
        inputs = []
        for item in prompt:
            if isinstance(item, str):
                if not item:
                    raise invalid_request("prompt must not be empty", param="prompt")
                inputs.append(PromptInput(token_ids=await self.encode(item, add_special_tokens=True), text=item))
            else:
                if not item:
                    raise invalid_request("a token-id prompt must not be empty", param="prompt")
                inputs.append(PromptInput(token_ids=list(item), text=None))
        return inputs

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        for token_id in token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise invalid_request(
                    f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})", param=param
                )

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
