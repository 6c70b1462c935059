"""Builds the grammar compiler (front end and engine each hold one) and the engine's mask manager."""
from transformers import PreTrainedTokenizerBase

from scheduler.structured_output.compiler import GrammarCompiler
from scheduler.structured_output.llguidance_backend import LLGuidanceBackend
from scheduler.structured_output.manager import StructuredOutputManager


def create_grammar_compiler(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: list[int]
) -> GrammarCompiler:
    return GrammarCompiler(LLGuidanceBackend(tokenizer, vocab_size, eos_token_ids))


def create_structured_output(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: list[int]
) -> StructuredOutputManager:
    return StructuredOutputManager(create_grammar_compiler(tokenizer, vocab_size, eos_token_ids), vocab_size)
