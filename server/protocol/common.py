"""Fields shared by chat and text completion requests."""
import logging

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False
    continuous_usage_stats: bool = False  # extension: running usage on every chunk


class OpenAIRequest(BaseModel):
    """Strict types (a string is not an int), finite floats, unknown fields kept aside to warn about."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    def warn_unknown_fields(self, route: str) -> None:
        if self.model_extra:
            logger.warning("%s: ignoring unknown fields %s", route, sorted(self.model_extra))


class SamplingRequest(OpenAIRequest):
    """OpenAI sampling fields and the extensions both endpoints accept."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions.
    priority: int = 0  # lower runs first with --scheduling-policy priority
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage_stats(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats
