"""The memory plan: --gpu-memory-utilization as a fraction of the card's total memory, less the weights, the
profiling step's peak, memory outside PyTorch, the decode graphs and the sampler's per-slot state. The card is a fake
with injected numbers; the profiling step is the real model's forward on the CPU."""
import gc
import weakref

import pytest
import torch
from random_dots1 import save_random_dots1

from model.forward_batch import ForwardBatch
from model.kv_cache import kv_cache_bytes_per_block
from scheduler.config import EngineConfig
from scheduler.cuda_graph_runner import EagerStepGraph
from scheduler.memory_plan import GIB, MemoryPlan, MemoryPlanError, check_utilization
from scheduler.memory_profile import KVCaches, ProfileShape, profile_memory, profile_prompts
from scheduler.model_runner import CPU_KV_CACHE_BYTES, ModelExecutor
from scheduler.sampling_batch import SamplingBatch, sampling_batch_bytes

CONFIG = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-5,
    max_position_embeddings=64, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
)
MIB = 2**20


class FakeCard:
    """A card of ``total`` bytes: the allocator holds ``weights`` and peaks ``peak`` above them during the profiling
    step; ``outside`` bytes are used outside PyTorch's allocator."""

    def __init__(self, total: int, weights: int, peak: int, outside: int) -> None:
        self.total_bytes, self.weights, self.peak, self.outside = total, weights, peak, outside
        self.calls: list[str] = []
        self.watched: list[weakref.ref] = []  # tensors that must be freed before the allocator's cache is released
        self.alive_at_release: list[bool] = []

    def total(self) -> int:
        return self.total_bytes

    def free(self) -> int:
        return self.total_bytes - self.weights - self.outside

    def allocated(self) -> int:
        return self.weights

    def reserved(self) -> int:
        return self.weights

    def reset_peak(self) -> None:
        self.calls.append("reset_peak")

    def peak_allocated(self) -> int:
        self.calls.append("peak_allocated")
        return self.weights + self.peak

    def release_cached(self) -> None:
        self.calls.append("release_cached")
        self.alive_at_release.append(any(ref() is not None for ref in self.watched))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("memory_plan")
    save_random_dots1(path, CONFIG)
    return path


def engine_config(model_dir, **overrides) -> EngineConfig:
    options = dict(model=str(model_dir), dtype="float32", device="cpu", block_size=4, max_num_seqs=4,
                   max_num_batched_tokens=96, max_model_len=40, gpu_memory_utilization=0.5)
    return EngineConfig(**{**options, **overrides})


def plan(**terms) -> MemoryPlan:
    values = dict(total_bytes=80 * GIB, utilization=0.9, weight_bytes=40 * GIB, activation_peak_bytes=3 * GIB,
                  non_torch_bytes=GIB, graph_bytes=GIB // 2, sampling_state_bytes=GIB // 4)
    return MemoryPlan(**{**values, **terms})


def test_the_kv_cache_gets_the_share_of_the_total_left_after_every_other_term():
    assert plan().budget_bytes == int(80 * GIB * 0.9)
    assert plan().kv_cache_bytes == int(80 * GIB * 0.9) - 40 * GIB - 3 * GIB - GIB - GIB // 2 - GIB // 4
    assert plan(utilization=1.0).kv_cache_bytes - plan().kv_cache_bytes == 80 * GIB - int(80 * GIB * 0.9)
    line = plan().describe()
    assert "\n" not in line
    for term in ("0.9 of 80.00 GiB = 72.00 GiB", "weights 40.00 GiB", "activation peak 3.00 GiB",
                 "outside PyTorch 1.00 GiB", "CUDA graphs 0.50 GiB", "sampling state 0.25 GiB", "KV cache 27.25 GiB"):
        assert term in line


def test_a_share_that_leaves_no_kv_cache_is_refused_naming_the_numbers():
    plan().check()
    refused = plan(utilization=0.5)  # 40 GiB: the weights alone
    assert refused.kv_cache_bytes == -(3 * GIB + GIB + GIB // 2 + GIB // 4)
    with pytest.raises(MemoryPlanError) as error:
        refused.check()
    message = str(error.value)
    assert "0.5 of 80.00 GiB = 40.00 GiB" in message and "weights 40.00 GiB" in message
    assert "KV cache -4.75 GiB" in message and "--gpu-memory-utilization" in message
    with pytest.raises(MemoryPlanError):
        plan(total_bytes=int(44.75 * GIB), utilization=1.0).check()  # exactly nothing left


@pytest.mark.parametrize("utilization", [0.0, -0.1, 1.01, 90.0])
def test_utilization_outside_zero_to_one_is_refused(utilization):
    with pytest.raises(MemoryPlanError, match="fraction of the card's total memory"):
        check_utilization(utilization)
    check_utilization(1.0)
    check_utilization(0.05)


def test_sampling_state_bytes_are_what_the_sampling_batch_allocates():
    batch = SamplingBatch(4, 97, torch.device("cpu"))
    allocated = sum(tensor.nbytes for tensor in vars(batch).values() if isinstance(tensor, torch.Tensor))
    assert sampling_batch_bytes(4, 97) == allocated
    assert sampling_batch_bytes(256, 152064) / GIB == pytest.approx(0.1813, abs=1e-4)
    assert sampling_batch_bytes(0, 152064) == 0


def test_the_profiling_step_fills_the_token_budget_within_the_context_length():
    shape = ProfileShape(max_num_batched_tokens=100, max_num_seqs=8, max_model_len=40, block_size=4, vocab_size=97)
    prompts = profile_prompts(shape)
    assert [len(tokens) for tokens in prompts] == [40, 40, 20]
    assert all(0 <= token < 97 for tokens in prompts for token in tokens)
    few_seqs = ProfileShape(max_num_batched_tokens=100, max_num_seqs=2, max_model_len=40, block_size=4, vocab_size=97)
    assert [len(tokens) for tokens in profile_prompts(few_seqs)] == [40, 40]

    seen: list[tuple[ForwardBatch, int]] = []
    cache_blocks: list[int] = []

    def forward(batch: ForwardBatch, caches: KVCaches) -> torch.Tensor:
        seen.append((batch, caches[0][0].shape[0]))
        return torch.zeros(len(batch.logits_indices), 97)

    card = FakeCard(total=10 * GIB, weights=2 * GIB, peak=300 * MIB, outside=GIB)

    def allocate(num_blocks: int) -> KVCaches:
        cache_blocks.append(num_blocks)
        caches = [(torch.zeros(num_blocks, 4), torch.zeros(num_blocks, 4))]
        card.watched.append(weakref.ref(caches[0][0]))
        return caches

    profile = profile_memory(forward, allocate, shape, torch.device("cpu"), card)
    (batch, blocks_seen), = seen
    assert batch.input_ids.numel() == 100 and batch.query_lens_cpu == [40, 40, 20]
    assert cache_blocks == [10 + 10 + 5] and blocks_seen == 25
    assert int(batch.slot_mapping.max()) < 25 * 4 and len(set(batch.slot_mapping.tolist())) == 100
    assert profile.total_bytes == 10 * GIB and profile.weight_bytes == 2 * GIB
    assert profile.activation_peak_bytes == 300 * MIB and profile.non_torch_bytes == GIB
    assert card.calls.index("reset_peak") < card.calls.index("peak_allocated")
    assert card.calls[-1] == "release_cached"
    assert card.alive_at_release[-1] is False  # the step's cache was freed before the cache was released


def test_a_profiling_step_out_of_memory_is_refused_and_releases_its_tensors():
    shape = ProfileShape(max_num_batched_tokens=16, max_num_seqs=2, max_model_len=16, block_size=4, vocab_size=97)
    allocated: list[weakref.ref] = []

    def allocate(num_blocks: int) -> KVCaches:
        caches = [(torch.zeros(num_blocks, 4), torch.zeros(num_blocks, 4))]
        allocated.append(weakref.ref(caches[0][0]))
        return caches

    def forward(batch: ForwardBatch, caches: KVCaches) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    card = FakeCard(total=10 * GIB, weights=9 * GIB, peak=0, outside=0)
    with pytest.raises(MemoryPlanError, match="--max-num-batched-tokens") as error:
        profile_memory(forward, allocate, shape, torch.device("cpu"), card)
    assert "16 prompt tokens" in str(error.value) and "9.00 GiB of weights" in str(error.value)
    assert card.calls[-1] == "release_cached"
    del error
    gc.collect()
    assert len(allocated) == 1 and allocated[0]() is None


def test_the_executor_sizes_the_kv_cache_from_the_plan(model_dir):
    config = engine_config(model_dir)
    card = FakeCard(total=2 * GIB, weights=100 * MIB, peak=200 * MIB, outside=300 * MIB)
    executor = ModelExecutor(config, device_memory=card)
    plan = executor.memory_plan
    assert plan is not None and plan.total_bytes == 2 * GIB and plan.utilization == 0.5
    assert plan.weight_bytes == 100 * MIB and plan.activation_peak_bytes == 200 * MIB
    assert plan.non_torch_bytes == 300 * MIB and plan.graph_bytes == 0
    assert plan.sampling_state_bytes == sampling_batch_bytes(4, 97)
    assert plan.kv_cache_bytes == GIB - 600 * MIB - sampling_batch_bytes(4, 97)
    bytes_per_block = kv_cache_bytes_per_block(executor.model_config, 4, torch.float32, executor.parallel)
    assert executor.num_kv_blocks == plan.kv_cache_bytes // bytes_per_block
    assert executor.kv_caches[0][0].shape[0] == executor.num_kv_blocks
    assert "reset_peak" in card.calls  # the profiling step ran
    layer_ids, counts = executor.take_expert_counts()
    assert layer_ids and int(counts.sum()) == 0  # its routing is not counted as traffic


def test_decode_graphs_are_set_aside_from_the_plan(model_dir):
    card = FakeCard(total=2 * GIB, weights=100 * MIB, peak=200 * MIB, outside=300 * MIB)
    eager = ModelExecutor(engine_config(model_dir), device_memory=card)
    graphs = ModelExecutor(engine_config(model_dir), device_memory=card, make_graph=EagerStepGraph)
    assert graphs.cuda_graphs and graphs.memory_plan.graph_bytes > 256 * MIB  # the pool's slack and the buffers
    assert graphs.memory_plan.kv_cache_bytes == eager.memory_plan.kv_cache_bytes - graphs.memory_plan.graph_bytes


def test_the_executor_refuses_a_share_that_leaves_no_kv_cache(model_dir):
    card = FakeCard(total=2 * GIB, weights=900 * MIB, peak=100 * MIB, outside=100 * MIB)
    with pytest.raises(MemoryPlanError, match="no GPU memory is left for the KV cache") as error:
        ModelExecutor(engine_config(model_dir), device_memory=card)
    assert "weights 0.88 GiB" in str(error.value) and "activation peak 0.10 GiB" in str(error.value)
    with pytest.raises(MemoryPlanError, match="must be in"):
        ModelExecutor(engine_config(model_dir, gpu_memory_utilization=1.5), device_memory=card)


def test_kv_cache_memory_overrides_the_plan_and_a_cpu_keeps_its_default(model_dir):
    card = FakeCard(total=2 * GIB, weights=100 * MIB, peak=200 * MIB, outside=300 * MIB)
    fixed = ModelExecutor(engine_config(model_dir, kv_cache_memory=4 * MIB), device_memory=card)
    bytes_per_block = kv_cache_bytes_per_block(fixed.model_config, 4, torch.float32, fixed.parallel)
    assert fixed.memory_plan is None and card.calls == []
    assert fixed.num_kv_blocks == 4 * MIB // bytes_per_block
    cpu = ModelExecutor(engine_config(model_dir, gpu_memory_utilization=0.01))
    assert cpu.memory_plan is None and cpu.num_kv_blocks == CPU_KV_CACHE_BYTES // bytes_per_block


def test_every_rank_takes_the_smallest_plans_block_count(model_dir):
    card = FakeCard(total=2 * GIB, weights=100 * MIB, peak=200 * MIB, outside=300 * MIB)
    agreed: list[int] = []

    def smallest_of_two_ranks(blocks: int) -> int:  # the other rank's plan leaves room for 5 blocks
        agreed.append(blocks)
        return min(blocks, 5)

    executor = ModelExecutor(engine_config(model_dir), device_memory=card, agree=smallest_of_two_ranks)
    bytes_per_block = kv_cache_bytes_per_block(executor.model_config, 4, torch.float32, executor.parallel)
    assert agreed[0] == executor.memory_plan.kv_cache_bytes // bytes_per_block > 5
    assert executor.num_kv_blocks == 5 and executor.kv_caches[0][0].shape[0] == 5
    with pytest.raises(ValueError, match="holds no block"):
        ModelExecutor(engine_config(model_dir), device_memory=card, agree=lambda blocks: 0)
