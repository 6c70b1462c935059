"""The offline engine (LLM API) on the embedded model gives the same greedy tokens at tensor parallel 2 as at 1."""
import random

import pytest

from scheduler.llm import LLM
from scheduler.parallel_executor import ParallelExecutor
from scheduler.sampling_params import SamplingParams

ENGINE_OPTIONS = dict(dtype="float32", device="cpu", kv_cache_memory=8 << 20, max_num_batched_tokens=48)


class ExpertCounts:
    def __init__(self) -> None:
        self.total = 0

    def on_step(self, step) -> None:
        pass

    def on_request_finished(self, request) -> None:
        pass

    def on_expert_counts(self, layer_ids, counts) -> None:
        self.total += int(counts.sum())


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert all(result.error is None for result in results)
    return [result.outputs[0].token_ids for result in results]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(7)
    # Ragged, and longer than the 48-token step budget together: prompts are prefilled in chunks next to decodes.
    return [[rng.randrange(4000) for _ in range(length)] for length in (40, 5, 23, 61, 2)]


@pytest.fixture(scope="module")
def expected(prompts) -> tuple[list[list[int]], int]:
    counts = ExpertCounts()
    llm = LLM(stats_listener=counts, **ENGINE_OPTIONS)
    try:
        return greedy_tokens(llm, prompts), counts.total
    finally:
        llm.shutdown()


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["split_experts", "expert_parallel"])
def test_tensor_parallel_engine_matches_one_process(prompts, expected, expert_parallel):
    expected_tokens, expected_expert_pairs = expected
    counts = ExpertCounts()
    llm = LLM(stats_listener=counts, tensor_parallel_size=2, enable_expert_parallel=expert_parallel,
              **ENGINE_OPTIONS)
    try:
        assert isinstance(llm.engine.executor, ParallelExecutor)
        assert greedy_tokens(llm, prompts) == expected_tokens
    finally:
        llm.shutdown()
    assert not llm.engine.executor.is_alive
    # Rank 0 reports every token's expert assignments (top-2 per token per MoE layer), as one process does.
    assert counts.total == expected_expert_pairs > 0
