"""Builds the grammar compiler (front end and engine each hold one) and the engine's mask manager."""
from transformers import PreTrainedTokenizerBase

from scheduler.structured_output.compiler import GrammarCompiler
from scheduler.structured_output.llguidance_backend import LLGuidanceBackend
from scheduler.structured_output.manager import StructuredOutputManager


def create_grammar_compiler(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: list[int]
) -> GrammarCompiler:
    return GrammarCompiler(LLGuidanceBackend(tokenizer, vocab_size, eos_token_ids))


def front_end_compiler(client: object, tokenizer: PreTrainedTokenizerBase) -> GrammarCompiler:
    """The compiler a front end checks constraints with before it sends a request: the core's own (one cache)
    when the core is in this process, else one of its own (the core compiles into its cache again)."""
    core = getattr(client, "core", None)
    if core is not None:
        return core.structured_output.compiler
    info = client.info
    return create_grammar_compiler(tokenizer, info.vocab_size, info.eos_token_ids)


def create_structured_output(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: list[int]
) -> StructuredOutputManager:
    return StructuredOutputManager(create_grammar_compiler(tokenizer, vocab_size, eos_token_ids), vocab_size)
