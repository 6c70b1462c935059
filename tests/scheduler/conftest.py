"""Engines on the embedded tiny checkpoint, shared per module; every test must leave the KV pool all free."""
import random
from collections.abc import Iterator

import pytest

from scheduler.llm import LLM
from scheduler.stats import RequestStats, StepStats

TINY_VOCAB_TEXT_IDS = 4089  # ids below this are ordinary tokens in the embedded tokenizer


class RecordingListener:
    def __init__(self) -> None:
        self.steps: list[StepStats] = []
        self.requests: list[RequestStats] = []
        self.expert_counts: list[tuple[list[int], object]] = []

    def on_step(self, step: StepStats) -> None:
        self.steps.append(step)

    def on_request_finished(self, request: RequestStats) -> None:
        self.requests.append(request)

    def on_expert_counts(self, layer_ids: list[int], counts: object) -> None:
        self.expert_counts.append((layer_ids, counts))


def make_llm(**options: object) -> LLM:
    """float32 on whatever device "auto" picks, so results compare exactly with the fp32 references."""
    return LLM(stats_listener=RecordingListener(), dtype="float32", **options)


def random_prompts(count: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(TINY_VOCAB_TEXT_IDS) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def assert_pool_free(llm: LLM) -> None:
    manager = llm.engine.block_manager
    assert not llm.engine.has_unfinished()
    assert manager.num_free_blocks == manager.num_blocks
    assert all(block.ref_count == 0 for block in manager.blocks)


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    engine = make_llm(max_num_batched_tokens=256, kv_cache_memory=8 << 20)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference_llm() -> Iterator[LLM]:
    """Runs one request at a time without prefix caching: the oracle for batched runs."""
    engine = make_llm(enable_prefix_caching=False, max_num_seqs=1, kv_cache_memory=8 << 20)
    yield engine
    engine.shutdown()


@pytest.fixture(autouse=True)
def pools_end_free(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("llm", "reference_llm"):
        if name in request.fixturenames:
            assert_pool_free(request.getfixturevalue(name))
