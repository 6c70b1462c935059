"""The Triton paged-attention kernels (under TRITON_INTERPRET=1, see tests/conftest.py) against the torch backend."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.attention_backend import TorchAttentionBackend, TritonAttentionBackend
from model.forward_batch import ForwardBatch
from model.kernels.attention.decode_split_kv import plan_splits
from paged_problem import Layer, make_problem, run, slice_problem
from scheduler.cuda_graph_runner import DecodeGraphRunner, EagerStepGraph

TORCH = TorchAttentionBackend()
TRITON = TritonAttentionBackend()


def assert_same(problem, layer, atol=2e-5, dtype=torch.float32, **kwargs):
    """Both backends give the same output and write the same cache bytes; returns the triton output."""
    expected, expected_caches = run(TORCH, problem, layer, **kwargs)
    actual, caches = run(TRITON, problem, layer, dtype=dtype, **kwargs)
    assert torch.isfinite(actual).all()
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"
    if dtype == torch.float32:
        for written, reference in zip(caches, expected_caches):
            assert torch.equal(written, reference)
    return actual


@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_decode_with_ragged_contexts_and_shuffled_tables(block_size):
    """GQA decode: contexts of 1 token, a partial block, exactly one block, and several blocks."""
    cached = [0, 36, block_size - 1, 2 * block_size + 3]
    problem = make_problem(cached, [1] * 4, block_size, num_heads=4, num_kv_heads=2, seed=block_size)
    assert_same(problem, Layer(scale=0.25))


def test_long_decode_is_split_and_reduced():
    """Contexts long enough for several splits (and one sequence too short to reach the later ones), MHA."""
    problem = make_problem([700, 20, 300], [1, 1, 1], 16, num_heads=2, num_kv_heads=2, seed=1)
    num_splits, _ = plan_splits(3, 2, problem.batch.block_tables.shape[1] * 16)
    assert num_splits >= 3
    assert_same(problem, Layer(scale=0.25))


def test_decode_over_a_wider_block_table_gives_the_same_output():
    """A CUDA-graph runner passes block tables of a fixed width: only the device-side lengths bound the work."""
    narrow = make_problem([40, 9], [1, 1], 16, num_heads=2, num_kv_heads=1, seed=2)
    wide = make_problem([40, 9], [1, 1], 16, num_heads=2, num_kv_heads=1, seed=2, table_width=40)
    assert plan_splits(2, 2, 40 * 16)[0] > 1  # the wide table is split, the narrow one is not
    narrow_out, _ = run(TRITON, narrow, Layer(scale=0.25))
    wide_out, _ = run(TRITON, wide, Layer(scale=0.25))
    torch.testing.assert_close(wide_out, narrow_out, atol=2e-6, rtol=0)


@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_prefill_from_zero(block_size):
    problem = make_problem([0, 0], [block_size + 5, 3], block_size, num_heads=4, num_kv_heads=1, seed=3)
    assert_same(problem, Layer(scale=0.25))


def test_prefill_over_a_cached_prefix():
    problem = make_problem([37, 16], [20, 2], 16, num_heads=2, num_kv_heads=2, seed=4)
    assert_same(problem, Layer(scale=0.25))


def test_chunked_prefill_continues_where_the_previous_chunk_stopped():
    """A 45-token prompt in chunks of 17, 20 and 8 tokens: each chunk sees every earlier one through the cache."""
    whole = make_problem([0], [45], 16, num_heads=2, num_kv_heads=1, seed=5)
    layer = Layer(scale=0.25)
    outputs, caches = {}, {}
    for backend in (TORCH, TRITON):
        caches[backend.name] = None
        chunks = []
        for start, length in ((0, 17), (17, 20), (37, 8)):
            chunk = slice_problem(whole, [start], [length], slice(start, start + length))
            out, caches[backend.name] = run(backend, chunk, layer, caches=caches[backend.name])
            chunks.append(out)
        outputs[backend.name] = torch.cat(chunks)
    torch.testing.assert_close(outputs["triton"], outputs["torch"], atol=2e-5, rtol=0)
    one_pass, _ = run(TRITON, whole, layer)
    torch.testing.assert_close(outputs["triton"], one_pass, atol=2e-5, rtol=0)


@pytest.mark.parametrize("num_kv_heads", [1, 4])
def test_mixed_batch_of_prefills_and_decodes(num_kv_heads):
    """Decodes, a chunk over a prefix, and a fresh prompt in one flat batch (MQA and MHA)."""
    problem = make_problem([30, 0, 5, 50], [1, 19, 1, 7], 16, num_heads=4, num_kv_heads=num_kv_heads, seed=6)
    assert_same(problem, Layer(scale=0.3))


@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_sliding_window(kind):
    """A window smaller than the contexts and not a multiple of the block size."""
    new = [1, 1, 1] if kind == "decode" else [1, 21, 6]
    problem = make_problem([60, 3, 40], new, 16, num_heads=4, num_kv_heads=2, seed=7)
    assert_same(problem, Layer(scale=0.25, window=11))


@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_half_precision_matches_the_float32_reference(kind):
    new = [1, 1, 1] if kind == "decode" else [1, 17, 4]
    problem = make_problem([33, 64, 2], new, 16, num_heads=4, num_kv_heads=2, seed=8)
    assert_same(problem, Layer(scale=0.25), atol=3e-3, dtype=torch.float16)


def test_rows_padded_by_the_graph_runner_touch_only_the_padding_block():
    """A decode step of 3 replayed through DecodeGraphRunner (padded to 4 the runner's way: token 0 at position 0
    in the reserved padding block, context 1, stale table columns): the real rows are exact, and capture and replay
    write nothing outside the padding block."""
    block_size, num_heads, head_dim = 16, 2, 16
    problem = make_problem([21, 40, 5], [1, 1, 1], block_size, num_heads=num_heads, num_kv_heads=1, seed=9)
    layer = Layer(scale=0.25)
    real, real_caches = run(TRITON, problem, layer)
    owned = set(problem.batch.block_tables.flatten().tolist())
    padding_block = min(set(range(problem.history[0].shape[0])) - owned)
    caches = tuple(history.clone() for history in problem.history)
    # Row 0 of each table is what a padding row (token 0) stores and attends to; rows 1.. are the real tokens.
    query, key, value = (torch.cat([torch.full((1, *x.shape[1:]), 7.0), x])
                         for x in (problem.query, problem.key, problem.value))

    def forward(batch: ForwardBatch) -> torch.Tensor:
        metadata = TRITON.build_metadata(batch, block_size)
        rows = batch.input_ids
        out = TRITON.forward(layer, query[rows], key[rows], value[rows], *caches, metadata)  # [T, Hq, D]
        return out.reshape(out.shape[0], -1)[batch.logits_indices]

    runner = DecodeGraphRunner(forward, EagerStepGraph, vocab_size=num_heads * head_dim, max_num_seqs=4,
                               max_model_len=4 * block_size, block_size=block_size, padding_block=padding_block,
                               device=torch.device("cpu"))
    runner.capture(show_progress=False)
    stale = runner.inputs.host().block_tables
    stale[:, 1:] = problem.batch.block_tables[0, 0]  # earlier steps' tables: a real sequence's block
    batch = problem.batch
    batch.input_ids = torch.arange(1, 4, dtype=torch.int64)
    out = runner.run(batch)
    assert runner.padded_size(3) == 4
    torch.testing.assert_close(out.reshape(real.shape), real, atol=0, rtol=0)
    torch.testing.assert_close(runner.logits[3], torch.full((num_heads * head_dim,), 7.0))  # its own key only
    for written, reference in zip(caches, real_caches):
        outside = torch.ones(written.shape[0], dtype=torch.bool)
        outside[padding_block] = False
        assert torch.equal(written[outside], reference[outside])


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


READ_BACK_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "is_nonzero")


@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_triton_metadata_is_the_batch_tensors_and_the_forward_reads_nothing_back(kind):
    """What a CUDA graph needs: metadata built without a tensor op (no host lists copied to the device), and no op
    in store + attend that reads a device value on the host."""
    new = [1, 1, 1] if kind == "decode" else [1, 12, 1]
    problem = make_problem([30, 0, 70], new, 16, num_heads=2, num_kv_heads=1, seed=10)
    batch = pad_batch(problem.batch, rows=1, context=0)
    query, key, value = (torch.cat([x, torch.zeros(1, *x.shape[1:])])
                         for x in (problem.query, problem.key, problem.value))
    caches = (problem.history[0].clone(), problem.history[1].clone())
    with RecordOps() as building:
        metadata = TRITON.build_metadata(batch, 16)
    assert building.ops == []
    with RecordOps() as forward:
        TRITON.forward(Layer(scale=0.25), query, key, value, *caches, metadata)
    assert not [op for op in forward.ops if any(name in op for name in READ_BACK_OPS)], forward.ops


def pad_batch(batch: ForwardBatch, rows: int, context: int) -> ForwardBatch:
    width = batch.block_tables.shape[1]
    starts = batch.query_start_loc[-1] + torch.arange(1, rows + 1, dtype=torch.int32)
    return ForwardBatch(
        input_ids=torch.cat([batch.input_ids, torch.zeros(rows, dtype=torch.int64)]),
        positions=torch.cat([batch.positions, torch.zeros(rows, dtype=torch.int64)]),
        query_start_loc=torch.cat([batch.query_start_loc, starts]),
        context_lens=torch.cat([batch.context_lens, torch.full((rows,), context, dtype=torch.int32)]),
        block_tables=torch.cat([batch.block_tables, torch.zeros(rows, width, dtype=torch.int32)]),
        slot_mapping=torch.cat([batch.slot_mapping, torch.full((rows,), -1, dtype=torch.int64)]),
        logits_indices=batch.logits_indices,
        query_lens_cpu=batch.query_lens_cpu + [1] * rows,
        context_lens_cpu=batch.context_lens_cpu + [context] * rows,
    )
