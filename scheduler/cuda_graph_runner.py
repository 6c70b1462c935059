"""Pure-decode steps replayed from graphs captured at start-up, one per padded batch size.

Every graph reads its inputs from one set of static buffers (``StepInputs``) and writes its logits into one static
``[max batch, vocab]`` buffer. A step of B decodes is padded to the next captured size: padded rows decode token 0
at position 0 of a sequence whose only block is the reserved padding block (context length 1), so they write and
read nothing a real sequence owns, and the batch's ``real_tokens`` keeps them out of the expert counts. Prefill and
mixed steps never come here.

A graph is a small abstraction: ``CudaStepGraph`` on CUDA; ``EagerStepGraph`` re-runs the captured callable on the
same static buffers, so the bookkeeping (padding, refills, output rows) is testable on a CPU.
"""
import bisect
import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch
from tqdm import tqdm

from model.forward_batch import ForwardBatch
from scheduler.step_inputs import BatchCapacity, StepInputs

logger = logging.getLogger(__name__)

Forward = Callable[[ForwardBatch], torch.Tensor]  # a batch on the device -> float32 logits [L, V]


class StepGraph(Protocol):
    def capture(self, run: Callable[[], None]) -> None: ...

    def replay(self) -> None: ...


class CudaStepGraph:
    """A CUDA graph; every graph made with the same ``pool`` shares one memory pool."""

    def __init__(self, pool: tuple[int, int]) -> None:
        self.pool = pool
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, run: Callable[[], None]) -> None:
        with torch.cuda.graph(self.graph, pool=self.pool):
            run()

    def replay(self) -> None:
        self.graph.replay()


class EagerStepGraph:
    """Stand-in for a CUDA graph: replay runs the captured callable again over the same static buffers."""

    def __init__(self) -> None:
        self._run: Callable[[], None] | None = None

    def capture(self, run: Callable[[], None]) -> None:
        run()
        self._run = run

    def replay(self) -> None:
        self._run()


def cuda_graph_factory() -> Callable[[], StepGraph]:
    pool = torch.cuda.graph_pool_handle()
    return lambda: CudaStepGraph(pool)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to ``max_num_seqs`` (itself included)."""
    sizes = [size for size in (1, 2, 4, 8) if size <= max_num_seqs]
    sizes += range(16, max_num_seqs + 1, 8)
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphRunner:
    def __init__(self, forward: Forward, make_graph: Callable[[], StepGraph], vocab_size: int, max_num_seqs: int,
                 max_model_len: int, block_size: int, padding_block: int, device: torch.device) -> None:
        self._free_before = _free_device_memory(device)  # static buffers and graphs both count as capture memory
        self.forward = forward
        self.make_graph = make_graph
        self.sizes = capture_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.max_model_len = max_model_len
        self.padding_block = padding_block
        self.padding_slot = padding_block * block_size
        table_width = -(-max_model_len // block_size)
        self.inputs = StepInputs(BatchCapacity(self.max_batch, self.max_batch, table_width, self.max_batch), device)
        self.logits = torch.zeros(self.max_batch, vocab_size, dtype=torch.float32, device=device)  # [max batch, V]
        self._row_numbers = torch.arange(self.max_batch + 1, dtype=torch.int64)
        self.graphs: dict[int, StepGraph] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0  # device memory the static buffers and the graphs took (0 off CUDA)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (bool(self.graphs) and batch.num_seqs <= self.max_batch and batch.is_decode_only
                and self.inputs.capacity.holds(batch))

    def padded_size(self, num_seqs: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, num_seqs)]

    def capture(self, show_progress: bool = True) -> None:
        """Captures every size, largest first (smaller graphs then fit in the memory the largest left in the pool),
        each after one warm-up run so Triton kernels compile and autotune outside the capture."""
        start = time.perf_counter()
        for size in tqdm(list(reversed(self.sizes)), desc="capturing decode graphs", disable=not show_progress):
            self._write_inputs(None, size)
            static = self.inputs.on_device.batch(size, size, size, [1] * size, [self.max_model_len] * size,
                                                 padded=True)

            def run(static: ForwardBatch = static, size: int = size) -> None:
                self.logits[:size].copy_(self.forward(static))

            run()
            graph = self.make_graph()
            graph.capture(run)
            self.graphs[size] = graph
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = self._free_before - _free_device_memory(self.logits.device)
        logger.info("captured %d decode graphs (batch sizes %d..%d) in %.1f s, %.1f MiB", len(self.sizes),
                    self.sizes[0], self.max_batch, self.capture_seconds, self.capture_bytes / 2**20)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits [len(batch.logits_indices), V] for a pure-decode batch, by replay. A copy of the static
        output rows: a caller may keep them past the next replay (one more [L, V] copy on the device)."""
        size = self.padded_size(batch.num_seqs)
        self._write_inputs(batch, size)
        self.graphs[size].replay()
        return self.logits[:batch.logits_indices.shape[0]].clone()

    def _write_inputs(self, batch: ForwardBatch | None, size: int) -> None:
        """The batch's rows (none for a capture), padding rows up to ``size``, and the one copy to the device."""
        host = self.inputs.host()
        num_seqs, num_logits = 0, 0
        if batch is not None:
            host.write(batch)
            num_seqs, num_logits = batch.num_seqs, int(batch.logits_indices.shape[0])
        padding = slice(num_seqs, size)
        host.real_tokens[0] = num_seqs  # one token per decode
        host.input_ids[padding] = 0
        host.positions[padding] = 0
        host.slot_mapping[padding] = self.padding_slot
        host.context_lens[padding] = 1
        host.block_tables[padding, 0] = self.padding_block
        host.query_start_loc[num_seqs + 1:size + 1].copy_(self._row_numbers[num_seqs + 1:size + 1])
        host.logits_indices[num_logits:size].copy_(self._row_numbers[num_logits:size])
        self.inputs.copy_to_device(size)


def _free_device_memory(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0]
