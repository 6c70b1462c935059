"""Per-request sampling and stopping parameters, validated before a request enters the engine."""
from dataclasses import dataclass, field, replace

from scheduler.structured_output.spec import KINDS, StructuredOutputSpec


class InvalidParameterError(ValueError):
    """A sampling parameter outside its valid range; ``param`` names it as the API spells it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """What to generate for one request.

    Fields left at ``None`` take the checkpoint's ``generation_config.json`` value, then the OpenAI default
    (see ``with_defaults``).
    """

    n: int = 1
    temperature: float | None = None  # 0 means greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1 disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int | None = None  # None: up to the model's context length
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token's logprob plus the top k
    prompt_logprobs: int | None = None  # None: none; k >= 0: every prompt token's logprob plus the top k
    structured_output: StructuredOutputSpec | None = None  # a grammar every output token must follow

    def with_defaults(self, defaults: dict[str, float | int]) -> "SamplingParams":
        """Fills unset fields from ``defaults`` (generation_config names), then from the OpenAI defaults."""
        resolved = replace(self)
        if resolved.temperature is None:
            resolved.temperature = float(defaults.get("temperature", 1.0))
        if resolved.top_p is None:
            resolved.top_p = float(defaults.get("top_p", 1.0))
        if resolved.top_k is None:
            resolved.top_k = int(defaults.get("top_k", 0))
        if resolved.repetition_penalty is None:
            resolved.repetition_penalty = float(defaults.get("repetition_penalty", 1.0))
        return resolved

    def validate(self, vocab_size: int, max_logprobs: int = 20, max_n: int = 16) -> None:
        """Raises ``InvalidParameterError`` naming the first invalid parameter."""
        if not 1 <= self.n <= max_n:
            raise InvalidParameterError("n", f"n must be between 1 and {max_n}, got {self.n}")
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise InvalidParameterError("temperature", f"temperature must be in [0, 2], got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise InvalidParameterError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (self.top_k < -1 or self.top_k > vocab_size):
            raise InvalidParameterError("top_k",
                                        f"top_k must be -1, 0 (disabled) or in [1, {vocab_size}], got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParameterError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidParameterError(name, f"{name} must be in [-2, 2], got {value}")
        if self.repetition_penalty is not None and not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidParameterError(
                "repetition_penalty", f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"
            )
        for token_id, bias in self.logit_bias.items():
            if not 0 <= token_id < vocab_size:
                raise InvalidParameterError(
                    "logit_bias", f"logit_bias token id {token_id} is outside the vocabulary (0..{vocab_size - 1})")
            if not -100.0 <= bias <= 100.0:
                raise InvalidParameterError("logit_bias", f"logit_bias values must be in [-100, 100], got {bias}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidParameterError("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise InvalidParameterError("min_tokens", f"min_tokens must be at least 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameterError(
                "min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if any(not s for s in self.stop):
            raise InvalidParameterError("stop", "stop strings must not be empty")
        for token_id in self.stop_token_ids:
            if not 0 <= token_id < vocab_size:
                raise InvalidParameterError(
                    "stop_token_ids", f"stop token id {token_id} is outside the vocabulary (0..{vocab_size - 1})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= max_logprobs:
                raise InvalidParameterError(name, f"{name} must be between 0 and {max_logprobs}, got {value}")
        if self.structured_output is not None and self.structured_output.kind not in KINDS:
            raise InvalidParameterError("response_format", f"unknown constraint kind {self.structured_output.kind!r}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise InvalidParameterError("seed", "seed must fit in a signed 64-bit integer")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
