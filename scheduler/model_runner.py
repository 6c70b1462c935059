"""The engine's one seam to the model on one rank: load the weights (this rank's shard), size and allocate the paged
KV cache, capture decode graphs, run a batch.

The one-process executor is this class; with tensor parallelism rank 0 (in ParallelExecutor) and every worker
process run this same class, and ``agree`` (a minimum over ranks) keeps the KV block count and the use of graphs
identical on all ranks, so every rank takes the same path through every step and the collectives line up.
"""
import logging
from collections.abc import Callable

import torch

from model.config import ModelConfig
from model.device import resolve_device, resolve_dtype
from model.forward_batch import ForwardBatch
from model.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block, resolve_kv_cache_dtype
from model.loader import load_model, weight_breakdown, weight_summary
from model.parallel import ParallelState
from scheduler.config import EngineConfig
from scheduler.context_length import requested_max_model_len
from scheduler.cuda_graph_runner import DecodeGraphRunner, StepGraph, cuda_graph_factory
from scheduler.memory_plan import MemoryPlan, check_utilization, graph_memory_estimate
from scheduler.memory_profile import CudaMemory, DeviceMemory, ProfileShape, profile_memory
from scheduler.sampling_batch import sampling_batch_bytes
from scheduler.step_inputs import BatchCapacity, StepInputs

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on CPU, where free memory says little about what is safe to take


def _same_on_every_rank(value: int) -> int:
    return value


class ModelExecutor:
    def __init__(self, config: EngineConfig, parallel: ParallelState | None = None,
                 device: torch.device | None = None, expert_metrics: bool | None = None,
                 agree: Callable[[int], int] = _same_on_every_rank,
                 make_graph: Callable[[], StepGraph] | None = None,
                 device_memory: DeviceMemory | None = None) -> None:
        """``make_graph`` overrides how decode graphs are made (tests pass ``EagerStepGraph`` to drive the graph
        path on a CPU); by default they are CUDA graphs, used on CUDA unless ``enforce_eager``, and only when the
        model's forward is free of host syncs. ``device_memory`` is what the memory plan reads (tests inject one to
        drive the plan on a CPU); by default the card's on CUDA, and none on a CPU, where the KV cache gets 1 GiB."""
        self.parallel = parallel or ParallelState()
        self.device = device or resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = config.block_size
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.max_model_len = requested_max_model_len(config.max_model_len, self.model_config.max_position_embeddings)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype,
                                                     self.model_config.has_kv_cache_scales)
        self.model = load_model(
            config.model, dtype=self.dtype, device=self.device, load_format=config.load_format,
            parallel=self.parallel, expert_metrics=config.expert_metrics if expert_metrics is None else expert_metrics,
            quantization=config.quantization, moe_backend=config.moe_backend,
            attention_backend=config.attention_backend, kv_cache_dtype=self.kv_cache_dtype,
        )
        self.attention_backend = self.model.attention_backend.name
        self.weight_dtype, self.weight_bytes = weight_summary(self.model)
        logger.info("weights: %s, %.1f MiB on %s (rank %d)", self.weight_dtype, self.weight_bytes / 2**20,
                    self.device, self.parallel.rank)
        breakdown = weight_breakdown(self.model)
        if len(breakdown) > 1:
            logger.info("weight bytes by type: %s", ", ".join(f"{name} {size / 2**20:.1f} MiB"
                                                             for name, size in breakdown.items()))
        make_graph = make_graph or self._cuda_graphs(config)
        graph_reserve = 0
        if make_graph is not None:
            graph_reserve = graph_memory_estimate(self.model_config, config.max_num_seqs, self.dtype)
        bytes_per_block = kv_cache_bytes_per_block(self.model_config, config.block_size, self.kv_cache_dtype,
                                                   self.parallel)
        # A decode graph pads its batch with rows that write and read one reserved block nobody else owns.
        reserved_blocks = 1 if make_graph is not None else 0
        if device_memory is None and self.device.type == "cuda":
            device_memory = CudaMemory(self.device)
        self.memory_plan = self._plan_memory(config, graph_reserve, device_memory)
        budget = self.memory_plan.kv_cache_bytes if self.memory_plan is not None else self._fixed_budget(config)
        self.num_kv_blocks = agree(max(0, budget // bytes_per_block - reserved_blocks))
        if self.num_kv_blocks < 1:
            if self.memory_plan is not None:
                self.memory_plan.check()
            raise ValueError(
                f"the KV cache budget of {budget} bytes holds no block of {config.block_size} tokens "
                f"({bytes_per_block} bytes each on every rank); raise --kv-cache-memory or --gpu-memory-utilization"
            )
        self.kv_caches = allocate_kv_cache(self.model_config, self.num_kv_blocks + reserved_blocks,
                                           config.block_size, self.kv_cache_dtype, self.device, self.parallel)
        logger.info("rank %d: KV cache of %d blocks of %d tokens (%.1f MiB, %s) on %s; attention backend %s",
                    self.parallel.rank, self.num_kv_blocks, config.block_size,
                    self.num_kv_blocks * bytes_per_block / 2**20, str(self.kv_cache_dtype).removeprefix("torch."),
                    self.device, self.attention_backend)
        self.inputs: StepInputs | None = None
        if self.device.type != "cpu":
            max_tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
            self.inputs = StepInputs(BatchCapacity(max_tokens, config.max_num_seqs, self._table_width(), max_tokens),
                                     self.device)
        self.graphs: DecodeGraphRunner | None = None
        if make_graph is not None:
            self.graphs = self._capture_graphs(config, make_graph, graph_reserve, agree)

    @property
    def moe_backend(self) -> str:
        return self.model.moe_backend.name

    @property
    def cuda_graphs(self) -> bool:
        """Whether pure-decode steps replay captured CUDA graphs."""
        return self.graphs is not None

    @property
    def is_alive(self) -> bool:
        """False once shut down (a tensor-parallel executor is also dead once a rank is)."""
        return self.model is not None

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """Runs one step; float32 logits [len(batch.logits_indices), vocab] on the model's device. Every rank must
        run the same batch."""
        with torch.inference_mode():
            if self.graphs is not None and self.graphs.can_run(batch):
                return self.graphs.run(batch)
            return self.model(self._on_device(batch), self.kv_caches)

    def take_expert_counts(self) -> tuple[list[int], torch.Tensor] | None:
        """Token-expert assignment counts since the previous call, (layer ids, int64 CPU [layers, experts])."""
        counts = self.model.take_expert_counts()
        if counts is None:
            return None
        layer_ids, tensor = counts
        return layer_ids, tensor.to("cpu", torch.int64)

    def shutdown(self) -> None:
        """Releases the graphs, the KV cache and the weights; the executor cannot run afterwards. Safe to call
        twice."""
        self.graphs = None
        self.inputs = None
        self.kv_caches = []
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _on_device(self, batch: ForwardBatch) -> ForwardBatch:
        if self.inputs is None:
            return batch.to(self.device)
        if not self.inputs.capacity.holds(batch):
            return batch.to(self.device)
        return self.inputs.load(batch)

    def _table_width(self) -> int:
        return -(-self.max_model_len // self.block_size)

    def _cuda_graphs(self, config: EngineConfig) -> Callable[[], StepGraph] | None:
        if self.device.type != "cuda" or config.enforce_eager:
            return None
        if not getattr(self.model, "graph_safe", False):
            logger.info("decode runs eagerly: the model's attention or MoE backend is not free of host syncs, so "
                        "its forward cannot be captured in a CUDA graph")
            return None
        return cuda_graph_factory()

    def _capture_graphs(self, config: EngineConfig, make_graph: Callable[[], StepGraph], reserve: int,
                        agree: Callable[[int], int]) -> DecodeGraphRunner | None:
        runner = DecodeGraphRunner(
            lambda batch: self.model(batch, self.kv_caches), make_graph, self.model_config.vocab_size,
            config.max_num_seqs, self.max_model_len, config.block_size, padding_block=self.num_kv_blocks,
            device=self.device,
        )
        try:
            with torch.inference_mode():
                runner.capture(show_progress=self.parallel.rank == 0)
            captured = True
        except Exception:
            logger.warning("rank %d: capturing the decode graphs failed; decode runs eagerly", self.parallel.rank,
                           exc_info=True)
            captured = False
        if not agree(int(captured)):
            if captured:
                logger.warning("rank %d: another rank failed to capture its decode graphs; decode runs eagerly",
                               self.parallel.rank)
            del runner
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        if self.device.type == "cuda" and config.kv_cache_memory is None:
            logger.info("decode graphs take %.1f MiB of GPU memory; %.1f MiB was set aside from the KV budget",
                        runner.capture_bytes / 2**20, reserve / 2**20)
            if runner.capture_bytes > reserve:
                logger.warning("decode graphs took %.1f MiB more than set aside: lower --gpu-memory-utilization if "
                               "memory runs short", (runner.capture_bytes - reserve) / 2**20)
        return runner

    def _fixed_budget(self, config: EngineConfig) -> int:
        return config.kv_cache_memory if config.kv_cache_memory is not None else CPU_KV_CACHE_BYTES

    def _plan_memory(self, config: EngineConfig, graph_reserve: int,
                     device_memory: DeviceMemory | None) -> MemoryPlan | None:
        """The KV cache's share of --gpu-memory-utilization x the card's total memory, after a profiling step has
        measured the peak activations; None when --kv-cache-memory fixes the budget or there is no card to read."""
        if config.kv_cache_memory is not None or device_memory is None:
            return None
        check_utilization(config.gpu_memory_utilization)
        shape = ProfileShape(config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len,
                             config.block_size, self.model_config.vocab_size)
        profile = profile_memory(self.model, self._allocate_profile_cache, shape, self.device, device_memory)
        self.model.take_expert_counts()  # the profiling step's routing is no traffic
        plan = MemoryPlan(
            total_bytes=profile.total_bytes, utilization=config.gpu_memory_utilization,
            weight_bytes=profile.weight_bytes, activation_peak_bytes=profile.activation_peak_bytes,
            non_torch_bytes=profile.non_torch_bytes, graph_bytes=graph_reserve,
            sampling_state_bytes=sampling_batch_bytes(config.max_num_seqs, self.model_config.vocab_size),
        )
        logger.info("rank %d: %s", self.parallel.rank, plan.describe())
        return plan

    def _allocate_profile_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return allocate_kv_cache(self.model_config, num_blocks, self.block_size, self.kv_cache_dtype, self.device,
                                 self.parallel)
