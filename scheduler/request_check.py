"""The one check every request passes before it enters the engine: parameter ranges, per-step cost caps, context.

The engine core runs it on every new request; the front ends (server, offline API) run the same function with the
limits the core announced (``EngineInfo``) to refuse a request before it is sent. Nothing else repeats these rules.
"""
from scheduler.outputs import RequestRejected
from scheduler.sampling_params import InvalidParameterError, SamplingParams

# Caps on what drives the per-step cost of a request (sampler work, stop matching, logprob copies).
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 128
MAX_LOGIT_BIAS = 300  # as OpenAI
MAX_SEQUENCES_PER_REQUEST = 128  # n x prompts of one API request


def check_request(
    prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int,
    sampling_defaults: dict[str, float | int],
) -> SamplingParams:
    """The request's resolved parameters (defaults filled in, ``max_tokens`` always set).

    Raises InvalidParameterError (a bad value, naming the parameter) or RequestRejected (it can never fit).
    """
    if not prompt_token_ids:
        raise InvalidParameterError("prompt", "the prompt must contain at least one token")
    outside = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if outside is not None:
        raise InvalidParameterError("prompt",
                                    f"prompt token id {outside} is outside the vocabulary (0..{vocab_size - 1})")
    check_caps(params)
    resolved = params.with_defaults(sampling_defaults)
    resolved.validate(vocab_size, max_logprobs=MAX_LOGPROBS, max_n=MAX_N)
    num_prompt = len(prompt_token_ids)
    completion = resolved.max_tokens if resolved.max_tokens is not None else max(1, max_model_len - num_prompt)
    if num_prompt + completion > max_model_len:
        raise RequestRejected(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt + completion} tokens ({num_prompt} in the prompt, {completion} in the completion). "
            "Please reduce the length of the prompt or of the completion (max_tokens).",
            code="context_length_exceeded",
            param="prompt" if num_prompt >= max_model_len else "max_tokens",
        )
    if resolved.min_tokens > completion:
        raise InvalidParameterError(
            "min_tokens",
            f"min_tokens ({resolved.min_tokens}) exceeds the {completion} tokens this request can generate",
        )
    resolved.max_tokens = completion
    return resolved


def check_caps(params: SamplingParams) -> None:
    if len(params.stop) > MAX_STOP_STRINGS:
        raise InvalidParameterError("stop",
                                    f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(params.stop)}")
    longest = max((len(s) for s in params.stop), default=0)
    if longest > MAX_STOP_STRING_CHARS:
        raise InvalidParameterError(
            "stop", f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters long, got one of {longest}"
        )
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidParameterError(
            "stop_token_ids",
            f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, got {len(params.stop_token_ids)}",
        )
    if len(params.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidParameterError(
            "logit_bias", f"logit_bias may have at most {MAX_LOGIT_BIAS} entries, got {len(params.logit_bias)}"
        )


def check_num_sequences(num_prompts: int, n: int) -> None:
    """An API request runs n choices of each of its prompts: n x prompts sequences."""
    if num_prompts * n > MAX_SEQUENCES_PER_REQUEST:
        raise InvalidParameterError(
            "n", f"n x prompts may be at most {MAX_SEQUENCES_PER_REQUEST} sequences per request, got "
            f"{n} x {num_prompts} = {n * num_prompts}"
        )
