"""What travels between a front end and the engine core: requests and aborts in, one batch of outputs per step out.

Every message is a msgspec struct (or a dataclass msgspec knows), encoded as MessagePack. Outputs carry token ids,
never text: the front end detokenizes.
"""
import msgspec

from scheduler.outputs import TokenLogprob
from scheduler.sampling_params import SamplingParams
from scheduler.stats import RequestStats, StepStats


class EngineCoreRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # resolved by the front end's check_request: the core trusts them
    arrival_time: float
    priority: int = 0  # lower runs first under the priority scheduling policy


class FinishChoice(msgspec.Struct, array_like=True):
    """Ends one choice (``index``), or with ``index`` None every choice of the request, for ``reason``."""

    request_id: str
    index: int | None
    reason: str  # "abort", or "stop" (the front end found a stop string)


class ChoiceDelta(msgspec.Struct, array_like=True):
    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" (a stop token, the last of token_ids), "length", "abort", "error"
    stop_reason: int | None = None  # the stop token id when it was one of the request's stop_token_ids
    grammar_end: bool = False  # "stop" because the last token completed the grammar: that token is text


class CoreRequestOutput(msgspec.Struct, array_like=True):
    request_id: str
    choices: list[ChoiceDelta]
    finished: bool  # the engine holds nothing of this request any more
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the request's first output only
    error: str | None = None


class EngineCoreOutputs(msgspec.Struct, array_like=True):
    """Everything one engine step (or one round of inputs while idle) produced."""

    outputs: list[CoreRequestOutput]
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    step: StepStats | None = None
    finished_requests: list[RequestStats] = []
    expert_counts: tuple[list[int], list[list[int]]] | None = None  # (layer ids, [layers, experts])


class EngineInfo(msgspec.Struct):
    """What the core tells its front end once the model is loaded."""

    vocab_size: int
    max_model_len: int
    num_kv_blocks: int
    device: str
    dtype: str
    weight_dtype: str  # e.g. "float8_e4m3fn+float32" for FP8 weights with their scales
    weight_bytes: int  # on one rank
    kv_cache_dtype: str
    attention_backend: str
    moe_backend: str
    cuda_graphs: bool
    sampling_defaults: dict[str, float]
    eos_token_ids: list[int]


class EngineDead(msgspec.Struct):
    reason: str


INPUT_TYPES = EngineCoreRequest | list[FinishChoice] | None  # None: shut down
ADD, FINISH, SHUTDOWN = b"A", b"F", b"S"
OUTPUTS, READY, DEAD = b"O", b"R", b"D"

encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
finish_decoder = msgspec.msgpack.Decoder(list[FinishChoice])
outputs_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
info_decoder = msgspec.msgpack.Decoder(EngineInfo)
dead_decoder = msgspec.msgpack.Decoder(EngineDead)
