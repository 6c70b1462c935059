"""Builds the grammar compiler and the engine's mask manager for a tokenizer and a model vocabulary."""
from transformers import PreTrainedTokenizerBase

from scheduler.structured_output.compiler import GrammarCompiler
from scheduler.structured_output.llguidance_backend import LLGuidanceBackend
from scheduler.structured_output.manager import StructuredOutputManager


def create_structured_output(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: list[int]
) -> StructuredOutputManager:
    compiler = GrammarCompiler(LLGuidanceBackend(tokenizer, vocab_size, eos_token_ids))
    return StructuredOutputManager(compiler, vocab_size)
