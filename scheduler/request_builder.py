"""Builds the engine core's ``Request`` for an admitted request: one sequence per choice, each with its sampling state
and, for a seeded request, a generator of its own."""
import itertools

import torch

from scheduler.core_messages import EngineCoreRequest
from scheduler.request import Request
from scheduler.sampling_params import SamplingParams
from scheduler.sampling_state import build_sampling_state
from scheduler.sequence import Sequence
from scheduler.stats import RequestStats


class RequestBuilder:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], max_model_len: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.device = device
        self._seq_ids = itertools.count()

    def build(self, core_request: EngineCoreRequest, params: SamplingParams) -> Request:
        """``params``: the request's resolved parameters."""
        request_id = core_request.request_id
        prompt = list(core_request.prompt_token_ids)
        stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_token_ids.update(self.eos_token_ids)
        seqs = []
        for index in range(params.n):
            seq = Sequence(
                seq_id=next(self._seq_ids), request_id=request_id, index=index, token_ids=list(prompt),
                num_prompt_tokens=len(prompt), params=params,
                needs_prompt_logprobs=index == 0 and params.prompt_logprobs is not None,
                priority=core_request.priority,
            )
            seq.sampling = build_sampling_state(params, self.vocab_size, self.eos_token_ids, self.device,
                                                self._choice_generator(params.seed, index))
            seqs.append(seq)
        return Request(
            request_id=request_id, params=params, seqs=seqs,
            stats=RequestStats(request_id, core_request.arrival_time, len(prompt)),
            stop_token_ids=frozenset(stop_token_ids), max_model_len=self.max_model_len,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )

    def _choice_generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        # Each choice gets its own stream; choice 0 uses the request's seed as given.
        return torch.Generator(self.device).manual_seed((seed + index * 0x9E3779B97F4A7C15) % 2**64)
