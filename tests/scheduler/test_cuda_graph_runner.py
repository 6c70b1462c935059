"""The decode-graph bookkeeping on a CPU: the stand-in graph re-runs the captured forward over the static buffers,
so padded batches, buffer refills and output rows must give the eager executor's logits step after step."""
import logging
import random

import pytest
import torch
from random_dots1 import save_random_dots1
from sched_helpers import GRAPH_TEST_CONFIG

from model.forward_batch import ForwardBatch
from scheduler.config import EngineConfig
from scheduler.cuda_graph_runner import EagerStepGraph, capture_sizes
from scheduler.model_runner import ModelExecutor
from scheduler.step_inputs import BatchCapacity, StepInputs

CONFIG = GRAPH_TEST_CONFIG
BLOCK_SIZE = 4
MAX_NUM_SEQS = 12  # captured sizes 1, 2, 4, 8, 12
KV_BYTES = 64 * 2 * 2 * BLOCK_SIZE * 2 * 8 * 4  # 64 blocks of the eager executor; the graph one keeps 1 for padding


class CountingGraph(EagerStepGraph):
    replays: list[int] = []

    def __init__(self, size_of: dict[int, int]) -> None:
        super().__init__()
        self.size_of = size_of

    def replay(self) -> None:
        CountingGraph.replays.append(self.size_of[id(self)])
        super().replay()


class FailingGraph(EagerStepGraph):
    def capture(self, run) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("graphs")
    save_random_dots1(path, CONFIG)
    return path


def engine_config(model_dir) -> EngineConfig:
    return EngineConfig(model=str(model_dir), dtype="float32", device="cpu", block_size=BLOCK_SIZE,
                        kv_cache_memory=KV_BYTES, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=64,
                        expert_metrics=False)


class Driver:
    """Ragged steps for named sequences over shuffled blocks, run through several executors with the same tables."""

    def __init__(self, num_blocks: int) -> None:
        self.free = list(range(num_blocks))
        random.Random(0).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}
        self.cached: dict[str, int] = {}

    def batch(self, chunks: dict[str, list[int]]) -> ForwardBatch:
        for name, tokens in chunks.items():
            table = self.tables.setdefault(name, [])
            cached = self.cached.setdefault(name, 0)
            while len(table) * BLOCK_SIZE < cached + len(tokens):
                table.append(self.free.pop())
        names = list(chunks)
        batch = ForwardBatch.build([chunks[n] for n in names], [self.cached[n] for n in names],
                                   [self.tables[n] for n in names], BLOCK_SIZE)
        for name in names:
            self.cached[name] += len(chunks[name])
        return batch


def test_capture_sizes_are_powers_of_two_then_steps_of_eight():
    assert capture_sizes(256) == [1, 2, 4, 8, *range(16, 257, 8)]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1) == [1]


def test_replayed_decode_steps_give_the_eager_logits(model_dir):
    eager = ModelExecutor(engine_config(model_dir))
    size_of: dict[int, int] = {}

    def make_graph() -> CountingGraph:
        graph = CountingGraph(size_of)
        size_of[id(graph)] = capture_order.pop(0)
        return graph

    capture_order = list(reversed(capture_sizes(MAX_NUM_SEQS)))  # captured largest first
    CountingGraph.replays.clear()
    graphed = ModelExecutor(engine_config(model_dir), make_graph=make_graph)
    try:
        assert eager.graphs is None and len(eager.kv_caches[0][0]) == eager.num_kv_blocks == 64
        runner = graphed.graphs
        assert sorted(runner.graphs) == [1, 2, 4, 8, 12]
        assert graphed.num_kv_blocks == 63 and len(graphed.kv_caches[0][0]) == 64
        assert runner.padding_block == 63  # outside every block the engine can hand out
        CountingGraph.replays.clear()  # capture's own runs do not count
        driver = Driver(graphed.num_kv_blocks)
        rng = random.Random(1)
        last: dict[str, int] = {}
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (logits as returned, a copy made at once)

        def step(chunks: dict[str, list[int]]) -> None:
            batch = driver.batch(chunks)
            expected = eager.execute(batch)
            got = graphed.execute(batch)
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() < 1e-4
            for name, logits in zip(chunks, expected):
                last[name] = int(logits.argmax())
            assert got.argmax(-1).tolist() == [last[name] for name in chunks]
            kept.append((got, got.clone()))

        def prompt(n: int) -> list[int]:
            return [rng.randrange(CONFIG["vocab_size"]) for _ in range(n)]

        def decode(names: str) -> None:
            step({name: [last[name]] for name in names})

        step({"a": prompt(5), "b": prompt(7), "c": prompt(3)})  # prefill: eager
        decode("abc")
        decode("abc")
        step({"a": [last["a"]], "d": prompt(6), "b": [last["b"]], "c": [last["c"]]})  # mixed: eager
        decode("abcd")
        decode("acd")  # b finished: its rows become padding
        decode("d")
        step({name: prompt(2 + i) for i, name in enumerate("efghij")})
        decode("defghij")
        step({"k": prompt(9), "l": prompt(4)})
        decode("defghijkl")
        decode("defghijkl")
        decode("ac")
        assert CountingGraph.replays == [4, 4, 4, 4, 1, 8, 12, 12, 2]
        assert all(torch.equal(returned, copy) for returned, copy in kept)  # later replays left them alone
        # The padded rows of the last replay (2 real of 2) and of the one before (9 of 12) point at the padding
        # block only; the real sequences' cache blocks hold what the eager run wrote.
        static = runner.inputs.on_device
        assert static.slot_mapping[9:12].tolist() == [63 * BLOCK_SIZE] * 3
        assert static.context_lens[9:12].tolist() == [1] * 3
        assert static.block_tables[9:12, 0].tolist() == [63] * 3
        for (eager_keys, eager_values), (keys, values) in zip(eager.kv_caches, graphed.kv_caches):
            assert (keys[:63] - eager_keys[:63]).abs().max().item() < 1e-4
            assert (values[:63] - eager_values[:63]).abs().max().item() < 1e-4
    finally:
        eager.shutdown()
        graphed.shutdown()


def test_a_failed_capture_leaves_an_eager_executor(model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        executor = ModelExecutor(engine_config(model_dir), make_graph=FailingGraph)
    try:
        assert executor.graphs is None
        assert any("capturing the decode graphs failed" in r.getMessage() for r in caplog.records)
        driver = Driver(executor.num_kv_blocks)
        executor.execute(driver.batch({"a": [1, 2, 3]}))
        logits = executor.execute(driver.batch({"a": [4]}))
        assert logits.shape == (1, CONFIG["vocab_size"]) and torch.isfinite(logits).all()
    finally:
        executor.shutdown()


def test_step_inputs_carry_batches_through_one_buffer_whatever_came_before(model_dir):
    """Eager steps on CUDA go through these buffers: a small batch after a big one sees stale table entries past
    its own blocks, which the forward must never read."""
    executor = ModelExecutor(engine_config(model_dir))
    try:
        capacity = BatchCapacity(max_tokens=16, max_seqs=4, table_width=6, max_logits=16)
        inputs = StepInputs(capacity, torch.device("cpu"))
        reference_driver, driver = Driver(executor.num_kv_blocks), Driver(executor.num_kv_blocks)
        steps = [{"a": [1, 2, 3, 4, 5, 6, 7], "b": [8, 9, 10], "c": [11, 12, 13, 14, 15, 16]},
                 {"a": [17], "b": [18], "c": [19]}, {"b": [20]}, {"c": [21, 22], "a": [23]}]
        for chunks in steps:
            batch = driver.batch(chunks)
            assert capacity.holds(batch)
            loaded = inputs.load(batch)
            for name in ("input_ids", "positions", "slot_mapping", "logits_indices", "query_start_loc",
                         "context_lens"):
                assert torch.equal(getattr(loaded, name), getattr(batch, name)), name
            assert loaded.block_tables.shape == (batch.num_seqs, capacity.table_width)
            assert torch.equal(loaded.block_tables[:, :batch.block_tables.shape[1]], batch.block_tables)
            expected = executor.model(reference_driver.batch(chunks), executor.kv_caches)
            assert (executor.model(loaded, executor.kv_caches) - expected).abs().max().item() < 1e-5
        assert not capacity.holds(Driver(executor.num_kv_blocks).batch({str(i): [i] for i in range(5)}))
    finally:
        executor.shutdown()
