"""The llguidance backend: JSON schemas, regexes, choices and Lark grammars compiled against the model's tokenizer."""
import json
import os

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers import PreTrainedTokenizerBase

from scheduler.structured_output.spec import InvalidConstraintError, StructuredOutputSpec

# Compact JSON: no whitespace between tokens, so max_tokens goes to content.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
ANY_JSON_OBJECT = '{"type": "object"}'
# llguidance's own thread pool pays off for many masks on a machine with cores to spare; on a small or busy CPU,
# waking its threads costs more than filling the masks one after the other (in the engine's mask worker thread).
PARALLEL_MIN_CPUS = 8
PARALLEL_MIN_ROWS = 8
MAX_MASK_THREADS = 4


class LLGuidanceMatcher:
    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher
        self.num_consumed = 0

    def consume(self, token_id: int) -> bool:
        accepted = self.matcher.consume_token(token_id)
        if accepted:
            self.num_consumed += 1
        return accepted

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)
        self.num_consumed -= num_tokens

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class LLGuidanceGrammar:
    def __init__(self, template: llguidance.LLMatcher) -> None:
        self.template = template  # never advanced; every sequence starts from a copy

    def new_matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self.template.deep_copy())


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: list[int],
        parallel_masks: bool = True,
    ) -> None:
        """``vocab_size`` is the model's (logits width), which may exceed the tokenizer's: the extra ids are never
        allowed. ``parallel_masks``: False for a backend that only validates (the front end's): no mask threads."""
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        cpus = os.cpu_count() or 1
        self.executor = None
        if parallel_masks and cpus >= PARALLEL_MIN_CPUS:
            self.executor = llguidance.LLExecutor(num_threads=min(MAX_MASK_THREADS, cpus))

    def validate(self, spec: StructuredOutputSpec) -> None:
        self._checked_grammar(spec)

    def compile(self, spec: StructuredOutputSpec) -> LLGuidanceGrammar:
        template = llguidance.LLMatcher(self.tokenizer, self._checked_grammar(spec), log_level=0)
        if template.is_error():
            raise InvalidConstraintError(_first_line(template.get_error()))
        return LLGuidanceGrammar(template)

    def fill_masks(self, matchers: list[LLGuidanceMatcher], bitmask: torch.Tensor) -> None:
        if self.executor is not None and len(matchers) >= PARALLEL_MIN_ROWS:
            pairs = [(matcher.matcher, row) for row, matcher in enumerate(matchers)]
            llguidance.torch.fill_next_token_bitmask_par(self.executor, pairs, bitmask)
            return
        for row, matcher in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(matcher.matcher, bitmask, row)

    def _checked_grammar(self, spec: StructuredOutputSpec) -> str:
        """llguidance's grammar of ``spec``, parsed and checked against the tokenizer but not built into a matcher."""
        grammar = grammar_text(spec)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise InvalidConstraintError(_first_line(messages[0]))
        return grammar


def grammar_text(spec: StructuredOutputSpec) -> str:
    """The constraint in llguidance's grammar format; raises ``InvalidConstraintError`` on malformed values."""
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.value)
        except json.JSONDecodeError as error:
            raise InvalidConstraintError(f"the JSON schema is not valid JSON: {error}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidConstraintError("a JSON schema must be an object or a boolean")
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        try:
            choices = json.loads(spec.value)
        except json.JSONDecodeError:
            choices = None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise InvalidConstraintError("choice must be a non-empty list of strings")
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    if spec.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(spec.value)
    raise InvalidConstraintError(f"unknown constraint kind {spec.kind!r}")


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "the grammar is invalid"
