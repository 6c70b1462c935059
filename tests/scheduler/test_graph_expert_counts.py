"""Expert counts through the decode-graph path on a CPU (the replaying stand-in graph): a replayed batch is padded
to a captured size, and the padding rows route to experts like any token, yet only the real tokens may count."""
import pytest
import torch
from random_dots1 import save_random_dots1
from sched_helpers import GRAPH_TEST_CONFIG

from model.forward_batch import ForwardBatch
from scheduler.config import EngineConfig
from scheduler.cuda_graph_runner import EagerStepGraph
from scheduler.model_runner import ModelExecutor

CONFIG = dict(GRAPH_TEST_CONFIG, num_hidden_layers=3)  # two MoE layers behind the dense one
BLOCK_SIZE = 4
TOP_K = CONFIG["num_experts_per_tok"]


@pytest.fixture(scope="module")
def executors(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph_counts")
    save_random_dots1(path, CONFIG)
    config = EngineConfig(model=str(path), dtype="float32", device="cpu", block_size=BLOCK_SIZE,
                          kv_cache_memory=1 << 20, max_num_seqs=8, max_num_batched_tokens=64, expert_metrics=True)
    eager, graphed = ModelExecutor(config), ModelExecutor(config, make_graph=EagerStepGraph)
    yield eager, graphed
    eager.shutdown()
    graphed.shutdown()


def batch(tokens: list[list[int]], cached: list[int]) -> ForwardBatch:
    """Sequence i owns blocks 8i..8i+7, which both executors' caches have."""
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(tokens))]
    return ForwardBatch.build(tokens, cached, tables, BLOCK_SIZE)


def test_capture_and_padding_rows_count_for_no_expert(executors):
    eager, graphed = executors
    assert graphed.graphs is not None and graphed.graphs.sizes == [1, 2, 4, 8]
    assert graphed.take_expert_counts()[1].sum() == 0  # the capture runs, all padding, counted nothing
    eager.take_expert_counts()
    prompts = [[5, 9, 14, 3, 77], [8, 8, 21], [60, 2, 33, 41, 12, 19, 7]]
    steps = [batch(prompts, [0, 0, 0])]  # a prefill runs eagerly
    lengths = [len(prompt) for prompt in prompts]
    for step in range(3):  # three decodes of 3 sequences, each padded to 4 rows
        steps.append(batch([[10 + step], [20 + step], [30 + step]], lengths))
        lengths = [length + 1 for length in lengths]
    steps.append(batch([[40]], lengths[:1]))  # one decode: no padding
    for step_batch in steps:
        assert (graphed.execute(step_batch) - eager.execute(step_batch)).abs().max().item() < 1e-4
    assert [graphed.graphs.padded_size(b.num_seqs) for b in steps[1:]] == [4, 4, 4, 1]
    layer_ids, counts = graphed.take_expert_counts()
    eager_layer_ids, eager_counts = eager.take_expert_counts()
    real_tokens = sum(b.num_tokens for b in steps)
    assert layer_ids == eager_layer_ids == [1, 2]
    assert counts.sum(dim=1).tolist() == [real_tokens * TOP_K] * 2  # not the 3 padding rows' pairs
    assert torch.equal(counts, eager_counts)  # the same experts the eager forward counted
