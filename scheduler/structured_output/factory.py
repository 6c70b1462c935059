"""Builds the engine's grammar manager (with its compiler) and the front end's constraint validator."""
import torch
from transformers import PreTrainedTokenizerBase

from scheduler.structured_output.compiler import GrammarCompiler
from scheduler.structured_output.llguidance_backend import LLGuidanceBackend
from scheduler.structured_output.manager import StructuredOutputManager
from scheduler.structured_output.validator import ConstraintValidator


def create_constraint_validator(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: list[int]
) -> ConstraintValidator:
    return ConstraintValidator(LLGuidanceBackend(tokenizer, vocab_size, eos_token_ids, parallel_masks=False))


def create_structured_output(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: list[int], max_rows: int = 256,
    device: torch.device = torch.device("cpu"),
) -> StructuredOutputManager:
    """``max_rows``: the engine's max_num_seqs; ``device``: where the logits are (pinned masks on CUDA)."""
    compiler = GrammarCompiler(LLGuidanceBackend(tokenizer, vocab_size, eos_token_ids))
    return StructuredOutputManager(compiler, vocab_size, max_rows, device)
