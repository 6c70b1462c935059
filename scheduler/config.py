"""Engine configuration: what the CLI, the YAML presets and the offline API all fill in."""
from dataclasses import dataclass

from model.embedded import EMBEDDED_MODEL_DIR
from scheduler.kv_events_config import KVEventsConfig


@dataclass
class EngineConfig:
    model: str = str(EMBEDDED_MODEL_DIR)  # local Hugging Face checkpoint directory
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or float32, bfloat16, float16
    device: str = "auto"  # auto: cuda when available, else cpu
    load_format: str = "auto"  # auto (safetensors) or dummy (random weights for the config)
    quantization: str | None = None  # fp8: quantize a high-precision checkpoint's Linear weights while loading
    max_model_len: int | None = None  # None: the config's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    scheduling_policy: str = "fcfs"  # fcfs (arrival order) or priority (a request's priority, then arrival)
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV cache; None: gpu_memory_utilization on CUDA, 1 GiB on CPU
    gpu_memory_utilization: float = 0.9  # fraction of the GPU's total memory this engine may use (vLLM's meaning)
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    attention_backend: str = "auto"  # torch, triton (its self-check must pass), or auto: triton on CUDA if it passes
    kv_cache_dtype: str = "auto"  # auto: fp8 if the checkpoint has KV scales, else model; model; fp8 (e4m3)
    enforce_eager: bool = False  # never capture or replay CUDA graphs for decode steps
    expert_metrics: bool = True  # count token-expert assignments on device for the metrics
    moe_backend: str = "auto"  # routed experts: auto (triton on CUDA, else torch), torch or triton
    chat_template: str | None = None  # a file or a literal template overriding the checkpoint's
    seed: int = 0
    kv_events_config: KVEventsConfig | None = None  # vLLM-style KV-cache events over ZeroMQ for prefix-aware routers
