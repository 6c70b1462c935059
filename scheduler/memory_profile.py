"""The profiling run that measures a rank's memory plan: one dummy prefill of ``max_num_batched_tokens`` tokens and
the sampler's largest work on ``max_num_seqs`` rows, with the allocator's peak tracked around them.

The card is read through ``DeviceMemory`` so that tests drive the same path on a CPU with injected numbers."""
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from model.forward_batch import ForwardBatch
from scheduler.memory_plan import MemoryPlanError

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (key, value)
Forward = Callable[[ForwardBatch, KVCaches], torch.Tensor]
AllocateCache = Callable[[int], KVCaches]  # blocks -> per-layer caches


class DeviceMemory(Protocol):
    """What the plan reads from a device's memory, in bytes."""

    def total(self) -> int: ...

    def free(self) -> int: ...

    def allocated(self) -> int: ...

    def reserved(self) -> int: ...

    def reset_peak(self) -> None: ...

    def peak_allocated(self) -> int: ...

    def release_cached(self) -> None: ...


class CudaMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def total(self) -> int:
        return torch.cuda.mem_get_info(self.device)[1]

    def free(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_allocated(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def release_cached(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class ProfileShape:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    block_size: int
    vocab_size: int


@dataclass(frozen=True)
class MemoryProfile:
    total_bytes: int
    weight_bytes: int  # allocated before the run: the weights and the model's buffers
    activation_peak_bytes: int  # the run's peak above what it started with (the weights and the step's KV cache)
    non_torch_bytes: int  # used on the card but not reserved by PyTorch's allocator, after the run


def profile_memory(forward: Forward, allocate_cache: AllocateCache, shape: ProfileShape, device: torch.device,
                   memory: DeviceMemory) -> MemoryProfile:
    """Runs the profiling step and measures it; the run's tensors are freed (and the allocator's cache released)
    on every path. Raises MemoryPlanError when the step itself does not fit."""
    memory.release_cached()
    weight_bytes = memory.allocated()
    token_ids = profile_prompts(shape)
    try:
        caches = allocate_cache(sum(-(-len(tokens) // shape.block_size) for tokens in token_ids))
        batch = _prefill_batch(token_ids, shape.block_size).to(device)
        started = memory.allocated()
        memory.reset_peak()
        with torch.inference_mode():
            forward(batch, caches)
            _sampler_work(shape.max_num_seqs, shape.vocab_size, device)
        peak = max(0, memory.peak_allocated() - started)
    except torch.cuda.OutOfMemoryError as error:
        raise MemoryPlanError(
            f"the profiling step ({sum(map(len, token_ids))} prompt tokens, then sampling {shape.max_num_seqs} rows) "
            f"ran out of GPU memory with {weight_bytes / 2**30:.2f} GiB of weights loaded: lower "
            f"--max-num-batched-tokens or --max-num-seqs, or use more GPUs (--tensor-parallel-size)"
        ) from error
    finally:
        caches = batch = None
        memory.release_cached()
    non_torch = max(0, memory.total() - memory.free() - memory.reserved())
    return MemoryProfile(memory.total(), weight_bytes, peak, non_torch)


def profile_prompts(shape: ProfileShape) -> list[list[int]]:
    """The step a full token budget allows: ``max_num_batched_tokens`` prompt tokens, in as few sequences as the
    context length allows (at most ``max_num_seqs``), random ids so that routing spreads over the experts."""
    tokens = min(shape.max_num_batched_tokens, shape.max_num_seqs * shape.max_model_len)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab_size, (tokens,), generator=generator).tolist()
    return [ids[start:start + shape.max_model_len] for start in range(0, tokens, shape.max_model_len)]


def _prefill_batch(token_ids: list[list[int]], block_size: int) -> ForwardBatch:
    tables, next_block = [], 0
    for tokens in token_ids:
        blocks = -(-len(tokens) // block_size)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    return ForwardBatch.build(token_ids, [0] * len(token_ids), tables, block_size)


def _sampler_work(rows: int, vocab_size: int, device: torch.device) -> None:
    """The tensors the sampler holds at once in its largest step: float32 logits for every row, sorted with their
    order for top-k/top-p, probabilities and their running sum, the masked copy scattered back, and logprobs."""
    logits = torch.randn(rows, vocab_size, device=device)  # [R, V]
    sorted_logits, order = logits.sort(dim=-1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    masked = sorted_logits.masked_fill(cumulative <= 0.05, float("-inf"))
    restored = torch.empty_like(logits).scatter_(1, order, masked)
    logprobs = torch.log_softmax(restored, dim=-1)
    torch.multinomial(logprobs.exp(), 1)
