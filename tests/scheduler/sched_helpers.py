"""Shared builders for the scheduler unit tests."""
import itertools

from scheduler.sampling_params import SamplingParams
from scheduler.sequence import Sequence

_seq_ids = itertools.count()


def make_seq(token_ids: list[int], max_tokens: int = 16, **params: object) -> Sequence:
    resolved = SamplingParams(max_tokens=max_tokens, **params).with_defaults({})
    seq_id = next(_seq_ids)
    return Sequence(
        seq_id=seq_id,
        request_id=f"r{seq_id}",
        index=0,
        token_ids=list(token_ids),
        num_prompt_tokens=len(token_ids),
        params=resolved,
    )
