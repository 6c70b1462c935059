"""ParallelExecutor (rank 0 here, rank 1 in a spawned gloo worker) against the one-process ModelExecutor."""
import os
import signal
import time

import pytest
import torch
from process_table import child_pids
from tp_checkpoint import PagedDriver, build_checkpoint, chunked_greedy_run

from model.forward_batch import ForwardBatch
from scheduler.config import EngineConfig
from scheduler.cuda_graph_runner import EagerStepGraph
from scheduler.executor_factory import create_executor
from scheduler.model_runner import ModelExecutor
from scheduler.parallel_executor import ParallelExecutor, TensorParallelError

# Ragged prompts: the first chunk of 5 ends the shortest prompt, so its first decode rides with the others' second
# chunks (which attend over a cached prefix).
PROMPTS = {0: [5, 9, 2, 77, 31, 8, 60, 11, 3], 1: [40, 41, 42], 2: [3, 1, 4, 1, 5, 9, 2]}
FIRST_CHUNK = 5
DECODES = 5
BLOCK_SIZE = 4


def engine_config(model_dir, **options) -> EngineConfig:
    return EngineConfig(model=str(model_dir), dtype="float32", device="cpu", block_size=BLOCK_SIZE,
                        kv_cache_memory=256 << 10, expert_metrics=False, **options)


def run(executor) -> tuple[torch.Tensor, list[list[int]]]:
    driver = PagedDriver(executor.execute, executor.num_kv_blocks, BLOCK_SIZE)
    return chunked_greedy_run(driver, PROMPTS, FIRST_CHUNK, DECODES)


@pytest.fixture(scope="module", params=[1, 2], ids=["kv_heads_below_ranks", "kv_heads_divisible"])
def checkpoint(request, tmp_path_factory):
    """4 query heads over 1 kv head (replicated on both ranks) or over 2 (one per rank); an odd vocabulary pads the
    second rank's rows; attention bias on the one-kv-head model."""
    model_dir = build_checkpoint(tmp_path_factory.mktemp("tp"), num_key_value_heads=request.param,
                                 attention_bias=request.param == 1)
    executor = ModelExecutor(engine_config(model_dir))
    try:
        expected = run(executor)
    finally:
        executor.shutdown()
    return model_dir, expected


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["split_experts", "expert_parallel"])
def test_two_ranks_give_the_logits_and_greedy_tokens_of_one(checkpoint, expert_parallel):
    model_dir, (expected_logits, expected_tokens) = checkpoint
    executor = create_executor(engine_config(model_dir, tensor_parallel_size=2,
                                             enable_expert_parallel=expert_parallel))
    try:
        assert isinstance(executor, ParallelExecutor)
        logits, tokens = run(executor)
    finally:
        executor.shutdown()
    # Every prompt token, the short prompt's decode during the second chunks, then DECODES steps of all three.
    assert logits.shape == expected_logits.shape == (sum(map(len, PROMPTS.values())) + 1 + DECODES * len(PROMPTS), 95)
    assert (logits - expected_logits).abs().max().item() < 1e-4
    assert tokens == expected_tokens


def test_two_ranks_replaying_padded_decode_graphs_give_the_logits_of_one(checkpoint):
    """Every rank captures the same graphs and pads each decode batch the same way (3 sequences to 4 rows), so the
    collectives inside the replayed forward line up; the stand-in graph replays over the static buffers."""
    model_dir, (expected_logits, expected_tokens) = checkpoint
    executor = ParallelExecutor(engine_config(model_dir, tensor_parallel_size=2, max_num_seqs=4),
                                make_graph=EagerStepGraph)
    try:
        assert sorted(executor._shard.graphs.graphs) == [1, 2, 4]
        logits, tokens = run(executor)
    finally:
        executor.shutdown()
    assert (logits - expected_logits).abs().max().item() < 1e-4
    assert tokens == expected_tokens


def test_kv_cache_per_rank_holds_only_its_heads(checkpoint):
    model_dir, _ = checkpoint
    config = engine_config(model_dir, tensor_parallel_size=2)
    executor = ParallelExecutor(config)
    try:
        model_config = executor.model_config
        heads_per_rank = max(1, model_config.num_key_value_heads // 2)  # one kv head is replicated on both ranks
        key_cache, value_cache = executor._shard.kv_caches[0]
        assert key_cache.shape == value_cache.shape == (executor.num_kv_blocks, BLOCK_SIZE, heads_per_rank, 8)
        bytes_per_block = 2 * model_config.num_hidden_layers * BLOCK_SIZE * heads_per_rank * 8 * 4
        assert executor.num_kv_blocks == config.kv_cache_memory // bytes_per_block  # the budget is per rank
    finally:
        executor.shutdown()


def test_a_killed_worker_fails_the_executor_with_a_clear_error(checkpoint, caplog):
    model_dir, _ = checkpoint
    executor = ParallelExecutor(engine_config(model_dir, tensor_parallel_size=2))
    try:
        driver = PagedDriver(executor.execute, executor.num_kv_blocks, BLOCK_SIZE)
        driver.step({0: [1, 2, 3]})
        [pid] = executor.worker_pids
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while executor.is_alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not executor.is_alive
        with pytest.raises(TensorParallelError, match=rf"worker rank 1 \(pid {pid}\) was killed by SIGKILL"):
            driver.step({0: [4]})
    finally:
        executor.shutdown()
    failures = [r for r in caplog.records if r.levelname == "ERROR" and "cannot continue" in r.getMessage()]
    assert len(failures) == 1


def test_a_failed_step_is_final_and_ends_the_worker(checkpoint):
    model_dir, _ = checkpoint
    executor = ParallelExecutor(engine_config(model_dir, tensor_parallel_size=2))
    try:
        outside = executor.num_kv_blocks + 5  # every rank fails writing K/V to a block that does not exist
        batch = ForwardBatch.build([[1, 2]], [0], [[outside]], BLOCK_SIZE)
        with pytest.raises(TensorParallelError):
            executor.execute(batch)
        assert not executor.is_alive
        [process] = executor._workers
        process.join(30)
        assert process.exitcode == 1  # it reported its error and left
        with pytest.raises(TensorParallelError):
            executor.execute(ForwardBatch.build([[1]], [0], [[0]], BLOCK_SIZE))
    finally:
        executor.shutdown()


def test_a_shape_that_does_not_split_is_refused_and_leaves_no_worker(checkpoint):
    model_dir, _ = checkpoint
    children_before = set(child_pids(os.getpid()))
    with pytest.raises(Exception, match="not divisible by the tensor-parallel world size"):
        ParallelExecutor(engine_config(model_dir, tensor_parallel_size=3))
    assert set(child_pids(os.getpid())) - children_before <= _resource_trackers()


def _resource_trackers() -> set[int]:
    trackers = set()
    for pid in child_pids(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"resource_tracker" in cmdline.read():
                    trackers.add(pid)
        except OSError:
            continue
    return trackers
