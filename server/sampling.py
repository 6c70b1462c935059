"""Turns request fields into engine ``SamplingParams``, checked by the engine's own request check."""
from scheduler import request_check
from scheduler.async_engine import AsyncEngine
from scheduler.outputs import RequestRejected
from scheduler.sampling_params import InvalidParameterError, SamplingParams
from server.errors import from_engine_error, invalid_request
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
    request: SamplingRequest, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None
) -> SamplingParams:
    """The request's fields as engine parameters, unchecked: ``check_prompts`` runs the engine's own check."""
    if request.stream_options is not None and not request.stream:
        raise invalid_request("stream_options is only allowed when stream is true", param="stream_options")
    return SamplingParams(
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


def check_prompts(
    engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams, param_names: dict[str, str]
) -> list[SamplingParams]:
    """The engine's check of each prompt with ``params``: resolved parameters per prompt, or a 400 naming the
    parameter as the request spells it (``param_names`` renames engine names: max_tokens -> max_completion_tokens)."""
    try:
        return [engine.check_request(token_ids, params) for token_ids in prompts]
    except (InvalidParameterError, RequestRejected) as error:
        api_error = from_engine_error(error)
        api_error.param = param_names.get(api_error.param, api_error.param)
        raise api_error from None


def check_num_sequences(num_prompts: int, n: int) -> None:
    try:
        request_check.check_num_sequences(num_prompts, n)
    except InvalidParameterError as error:
        raise from_engine_error(error) from None
