"""One choice of one request, as the scheduler and block manager see it."""
import enum
from dataclasses import dataclass, field

from scheduler.sampling_params import SamplingParams
from scheduler.sampling_state import SamplingState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Token ids (prompt then output), KV blocks, and how many tokens already have their K/V in the cache.

    ``params`` is resolved (defaults filled in, ``max_tokens`` set). Identity equality: a sequence is a live object.
    """

    seq_id: int
    request_id: str
    index: int  # choice index within its request
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    sampling: SamplingState | None = None  # built at admission
    needs_prompt_logprobs: bool = False  # prompt logprobs still to compute: bypasses the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks of token_ids
    num_computed_tokens: int = 0  # tokens whose K/V is in the cache
    num_cached_tokens: int | None = None  # prompt tokens served by the prefix cache at first admission
    priority: int = 0  # the request's; lower runs first under the priority scheduling policy
    arrival_order: int = 0  # set by the scheduler when the sequence is first queued: breaks priority ties
    grammar_pending: bool = False  # its grammar is still compiling: the scheduler leaves it waiting

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
