"""How much of a GPU the KV cache gets, as vLLM operators expect: ``--gpu-memory-utilization`` is a fraction of the
card's total memory, and the KV cache gets what that share leaves after everything else this process holds at its
peak. Pure arithmetic, so it is checked without a GPU; ``memory_profile`` measures the terms on a card."""
from dataclasses import dataclass

import torch

from model.config import ModelConfig
from scheduler.cuda_graph_runner import capture_sizes

GIB = 2**30
GRAPH_POOL_SLACK_BYTES = 256 << 20
# The sampler's per-slot vectors (temperature, top-k, top-p, min-p, three penalties, seed, min_tokens, lengths and
# flags), each at most 8 bytes: a generous count, so that a new vector does not silently outgrow the plan.


class MemoryPlanError(ValueError):
    """The card's share cannot hold the weights, the activations and the KV cache together."""


def graph_memory_estimate(model: ModelConfig, max_num_seqs: int, dtype: torch.dtype) -> int:
    """Bytes set aside for the decode graphs: the static logits and the pool's activations of the largest graph (a
    generous per-token figure; the real one is logged after capture)."""
    max_batch = capture_sizes(max_num_seqs)[-1]
    per_token = (3 * model.vocab_size * 4 + 32 * model.hidden_size * dtype.itemsize
                 + 4 * model.num_experts_per_tok * model.moe_intermediate_size * dtype.itemsize)
    return max_batch * per_token + GRAPH_POOL_SLACK_BYTES


@dataclass(frozen=True)
class MemoryPlan:
    """One rank's memory, in bytes: the share of the card this engine may use and what takes it."""
    total_bytes: int  # the card's memory as CUDA reports it
    utilization: float  # --gpu-memory-utilization
    weight_bytes: int  # what PyTorch's allocator held after loading (weights and the model's buffers)
    activation_peak_bytes: int  # the profiling forward's peak above that, sampler's work included
    non_torch_bytes: int  # on the card outside PyTorch's allocator: CUDA context, NCCL, other processes
    graph_bytes: int  # set aside for the decode graphs' pool (an estimate; 0 without graphs)
    sampling_state_bytes: int  # the sampler's persistent per-slot tensors

    @property
    def budget_bytes(self) -> int:
        return int(self.total_bytes * self.utilization)

    @property
    def non_kv_bytes(self) -> int:
        return (self.weight_bytes + self.activation_peak_bytes + self.non_torch_bytes + self.graph_bytes
                + self.sampling_state_bytes)

    @property
    def kv_cache_bytes(self) -> int:
        """What the KV cache gets; not positive when the share holds no cache."""
        return self.budget_bytes - self.non_kv_bytes

    def describe(self) -> str:
        """The plan in one line, every term in GiB."""
        return (f"memory plan: {self.utilization:g} of {_gib(self.total_bytes)} = {_gib(self.budget_bytes)}; "
                f"weights {_gib(self.weight_bytes)}, activation peak {_gib(self.activation_peak_bytes)}, "
                f"outside PyTorch {_gib(self.non_torch_bytes)}, CUDA graphs {_gib(self.graph_bytes)}, "
                f"sampling state {_gib(self.sampling_state_bytes)}; KV cache {_gib(self.kv_cache_bytes)}")

    def check(self) -> None:
        """Raises MemoryPlanError naming the numbers when nothing is left for the KV cache."""
        if self.kv_cache_bytes > 0:
            return
        raise MemoryPlanError(
            f"no GPU memory is left for the KV cache: {self.describe()}. Raise --gpu-memory-utilization, lower "
            f"--max-num-batched-tokens or --max-num-seqs, use more GPUs (--tensor-parallel-size), or set "
            f"--kv-cache-memory"
        )


def check_utilization(utilization: float) -> None:
    if not 0.0 < utilization <= 1.0:
        raise MemoryPlanError(f"--gpu-memory-utilization must be in (0, 1], a fraction of the card's total memory; "
                              f"got {utilization}")


def _gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"
