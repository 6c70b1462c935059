"""What the engine hands back to its caller: incremental deltas per request, and rejections."""
from dataclasses import dataclass, field


class RequestRejected(Exception):
    """A request the engine will not run (it can never fit, or its parameters are invalid).

    ``code`` and ``param`` follow OpenAI's error object, for example ``context_length_exceeded``.
    """

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served until restart."""


@dataclass
class TokenLogprob:
    """A token's log-probability under the raw model logits, and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), most likely first


@dataclass
class CompletionDelta:
    """What one choice produced since its previous delta."""

    index: int
    text: str  # new text; all deltas of a choice concatenate to its full output
    token_ids: list[int]  # new token ids
    logprobs: list[TokenLogprob] | None = None  # one per new token when logprobs were requested
    finish_reason: str | None = None  # "stop", "length", "abort", or "error" (with RequestOutput.error)
    stop_reason: int | str | None = None  # the stop string or stop token that ended it


@dataclass
class RequestOutput:
    """One update of one request. Only choices with something new appear in ``outputs``."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionDelta]
    finished: bool  # every choice has finished
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, on the first output; None for token 0
    error: str | None = None  # set when the engine failed this request
