"""The engine's one seam to the model: load weights, size and allocate the paged KV cache, run a batch.

A tensor-parallel executor (one worker process per rank) replaces this class with the same interface.
"""
import logging

import torch

from model.config import ModelConfig
from model.device import resolve_device, resolve_dtype
from model.forward_batch import ForwardBatch
from model.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block, resolve_kv_cache_dtype
from model.loader import load_model, weight_summary
from scheduler.config import EngineConfig

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on CPU, where free memory says little about what is safe to take


class ModelExecutor:
    def __init__(self, config: EngineConfig) -> None:
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = config.block_size
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.model_config = ModelConfig.from_pretrained(config.model)
        self.model = load_model(
            config.model,
            dtype=self.dtype,
            device=self.device,
            load_format=config.load_format,
            expert_metrics=config.expert_metrics,
            quantization=config.quantization,
            moe_backend=config.moe_backend,
            attention_backend=config.attention_backend,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        self.attention_backend = self.model.attention_backend.name
        self.weight_dtype, self.weight_bytes = weight_summary(self.model)
        logger.info("weights: %s, %.1f MiB on %s", self.weight_dtype, self.weight_bytes / 2**20, self.device)
        budget = self._kv_cache_budget(config)
        bytes_per_block = kv_cache_bytes_per_block(self.model_config, config.block_size, self.kv_cache_dtype)
        self.num_kv_blocks = budget // bytes_per_block
        if self.num_kv_blocks < 1:
            raise ValueError(
                f"the KV cache budget of {budget} bytes holds no block of {config.block_size} tokens "
                f"({bytes_per_block} bytes each); raise --kv-cache-memory or --gpu-memory-utilization"
            )
        self.kv_caches = allocate_kv_cache(
            self.model_config, self.num_kv_blocks, config.block_size, self.kv_cache_dtype, self.device
        )
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB, %s) on %s; attention backend %s",
            self.num_kv_blocks, config.block_size, self.num_kv_blocks * bytes_per_block / 2**20,
            str(self.kv_cache_dtype).removeprefix("torch."), self.device, self.attention_backend,
        )

    @property
    def is_alive(self) -> bool:
        """False once shut down (a tensor-parallel executor is also dead once a rank is)."""
        return self.model is not None

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """Runs one step; float32 logits [len(batch.logits_indices), vocab] on the model's device."""
        with torch.inference_mode():
            return self.model(batch.to(self.device), self.kv_caches)

    def take_expert_counts(self) -> tuple[list[int], torch.Tensor] | None:
        """Token-expert assignment counts since the previous call, (layer ids, int64 CPU [layers, experts])."""
        counts = self.model.take_expert_counts()
        if counts is None:
            return None
        layer_ids, tensor = counts
        return layer_ids, tensor.to("cpu", torch.int64)

    def shutdown(self) -> None:
        """Releases the KV cache and the weights; the executor cannot run afterwards. Safe to call twice."""
        self.kv_caches = []
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _kv_cache_budget(self, config: EngineConfig) -> int:
        if config.kv_cache_memory is not None:
            return config.kv_cache_memory
        if self.device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
            return int(free_bytes * config.gpu_memory_utilization)
        return CPU_KV_CACHE_BYTES
