"""One tensor-parallel rank's part of the work: joining the process groups, its model shard and its KV cache.

Rank 0 (in the engine process) and every worker process run this same code, so all ranks build identical shapes.
"""
import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.forward_batch import ForwardBatch
from model.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block, resolve_kv_cache_dtype
from model.loader import load_model, weight_summary
from model.parallel import ParallelState
from scheduler.config import EngineConfig
from scheduler.model_runner import CPU_KV_CACHE_BYTES

logger = logging.getLogger(__name__)

STORE_HOST = "127.0.0.1"
# Collectives inside a forward: a peer that takes longer than this is treated as hung.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# The control group carries the per-step broadcasts; workers wait on it while the server is idle, for days.
CONTROL_TIMEOUT = timedelta(days=365)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on cuda:r (one GPU per rank), or on the CPU."""
    return device if device.type == "cpu" else torch.device("cuda", rank)


def join_process_group(rank: int, world_size: int, store: dist.Store, device: torch.device) -> dist.ProcessGroup:
    """Initializes the default group (NCCL on CUDA, gloo on CPU) for the forward's collectives and returns the gloo
    control group that carries the step broadcasts."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def min_over_ranks(value: int, group: dist.ProcessGroup) -> int:
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
    return int(tensor.item())


class ModelShard:
    """This rank's slice of the weights (read from the checkpoint slice by slice) and its heads' KV cache."""

    def __init__(self, config: EngineConfig, parallel: ParallelState, device: torch.device, dtype: torch.dtype,
                 expert_metrics: bool) -> None:
        self.device = device
        self.dtype = dtype
        self.parallel = parallel
        self.block_size = config.block_size
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype)
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.model = load_model(config.model, dtype=dtype, device=device, load_format=config.load_format,
                                parallel=parallel, expert_metrics=expert_metrics, quantization=config.quantization,
                                moe_backend=config.moe_backend, attention_backend=config.attention_backend,
                                kv_cache_dtype=self.kv_cache_dtype)
        self.weight_dtype, self.weight_bytes = weight_summary(self.model)
        logger.info("rank %d: weights %s, %.1f MiB on %s", parallel.rank, self.weight_dtype, self.weight_bytes / 2**20,
                    device)
        self.bytes_per_block = kv_cache_bytes_per_block(self.model_config, config.block_size, self.kv_cache_dtype,
                                                        parallel)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def blocks_that_fit(self, config: EngineConfig) -> int:
        """KV blocks this rank's budget holds: --kv-cache-memory bytes per rank, or a fraction of free GPU memory."""
        if config.kv_cache_memory is not None:
            budget = config.kv_cache_memory
        elif self.device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free_bytes * config.gpu_memory_utilization)
        else:
            budget = CPU_KV_CACHE_BYTES
        return budget // self.bytes_per_block

    def allocate_kv_cache(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(
                f"the KV cache budget holds no block of {self.block_size} tokens ({self.bytes_per_block} bytes each "
                f"on every rank); raise --kv-cache-memory or --gpu-memory-utilization"
            )
        self.kv_caches = allocate_kv_cache(self.model_config, num_blocks, self.block_size, self.kv_cache_dtype,
                                           self.device, self.parallel)
        logger.info("rank %d: KV cache of %d blocks of %d tokens (%.1f MiB, %s) on %s; attention backend %s",
                    self.parallel.rank, num_blocks, self.block_size, num_blocks * self.bytes_per_block / 2**20,
                    str(self.kv_cache_dtype).removeprefix("torch."), self.device, self.model.attention_backend.name)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits [len(batch.logits_indices), vocab]; every rank must run the same batch."""
        with torch.inference_mode():
            return self.model(batch.to(self.device), self.kv_caches)

    def release(self) -> None:
        self.kv_caches = []
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
