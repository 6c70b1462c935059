"""Turns request fields into engine ``SamplingParams`` and checks that a prompt plus its completion fits."""
from dataclasses import replace

from scheduler.sampling_params import InvalidParameterError, SamplingParams
from server.config import ServerConfig
from server.errors import APIError, invalid_request
from server.protocol.common import SamplingRequest


def parse_logit_bias(logit_bias: dict[str, float] | None) -> dict[int, float]:
    if not logit_bias:
        return {}
    parsed = {}
    for key, bias in logit_bias.items():
        try:
            parsed[int(key)] = bias
        except ValueError:
            raise invalid_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
    return parsed


def build_sampling_params(
    request: SamplingRequest,
    config: ServerConfig,
    vocab_size: int,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
    param_names: dict[str, str],
) -> SamplingParams:
    """``param_names`` renames engine parameters to the request's own spelling in errors (max_completion_tokens...)."""
    if request.stream_options is not None and not request.stream:
        raise invalid_request("stream_options is only allowed when stream is true", param="stream_options")
    params = SamplingParams(
        n=request.n,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        logit_bias=parse_logit_bias(request.logit_bias),
        seed=request.seed,
        max_tokens=max_tokens,
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
        stop=[request.stop] if isinstance(request.stop, str) else list(request.stop or []),
        stop_token_ids=list(request.stop_token_ids),
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    try:
        params.validate(vocab_size, max_logprobs=config.max_logprobs, max_n=config.max_n)
    except InvalidParameterError as error:
        raise invalid_request(str(error), param=param_names.get(error.param, error.param)) from None
    return params


def fit_to_context(
    params: SamplingParams, prompt_tokens: int, max_model_len: int, prompt_param: str, max_tokens_param: str
) -> SamplingParams:
    """The params with ``max_tokens`` resolved for this prompt; 400 ``context_length_exceeded`` if it cannot fit."""
    room = max_model_len - prompt_tokens
    if params.max_tokens is not None and params.max_tokens <= room:
        return params
    if params.max_tokens is None and room >= 1:
        if params.min_tokens > room:
            raise invalid_request(
                f"min_tokens ({params.min_tokens}) exceeds the {room} tokens left in the context after the prompt",
                param="min_tokens",
            )
        return replace(params, max_tokens=room)
    requested = 1 if params.max_tokens is None else params.max_tokens
    raise APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the completion). "
        f"Please reduce the length of the prompt or {max_tokens_param}.",
        param=prompt_param if room < 1 else max_tokens_param,
        code="context_length_exceeded",
    )
