"""One rank of a tensor-parallel preset on one GPU: the real shapes with random weights, sized by the engine's own
memory plan (the profiling step, then the KV cache from --gpu-memory-utilization of the card), its decode graphs, and
the largest steps the preset allows; prints the plan and each step's peak against the plan's budget.

    python bench/tp_memory_plan.py --config configs/dots.llm1.inst-8xH100.yaml

The other ranks are stood in for (collectives return tensors of the shape the full group would), so this checks
memory and step shapes, not numbers; the preset's memory comment should hold with the plan and peaks printed here.
"""
import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.forward_batch import ForwardBatch  # noqa: E402
from model.parallel import ParallelState  # noqa: E402
from scheduler.memory_plan import GIB  # noqa: E402
from scheduler.model_runner import ModelExecutor  # noqa: E402
from server.cli import engine_config, parse_args  # noqa: E402

REAL_ARCHITECTURE = Path(__file__).resolve().parents[1] / "configs" / "dots.llm1.inst"


class StandInGroup(ParallelState):
    """Rank ``rank`` of ``world_size`` without the other ranks: sums are left as they are, gathers repeat."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return torch.cat([tensor] * self.world_size, dim=dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="a tensor-parallel preset in configs/")
    parser.add_argument("--model", type=Path, default=REAL_ARCHITECTURE, help="directory with the config.json")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = engine_config(parse_args(["--config", str(args.config), "--model", str(args.model),
                                       "--load-format", "dummy", "--device", args.device]))
    device = torch.device(args.device)
    parallel = StandInGroup(rank=0, world_size=config.tensor_parallel_size,
                            expert_parallel=config.enable_expert_parallel)

    start = time.perf_counter()
    executor = ModelExecutor(config, parallel=parallel)
    plan = executor.memory_plan
    print(f"{args.config.name}: rank 0 of {parallel.world_size} on {describe(device)}, ready in "
          f"{time.perf_counter() - start:.0f}s")
    print(plan.describe() if plan is not None else f"no memory plan on {device.type}: the KV cache is fixed")
    baseline = allocated(device)
    block_size = executor.block_size
    print(f"KV cache {executor.num_kv_blocks} blocks = {executor.num_kv_blocks * block_size} tokens; "
          f"{baseline / GIB:.2f} GiB allocated with it and the decode graphs")

    rows = []
    max_model_len = executor.max_model_len
    long_seq_blocks = list(range(math.ceil(max_model_len / block_size)))
    prompt = torch.randint(0, executor.model_config.vocab_size, (max_model_len - 1,)).tolist()
    for first in range(0, len(prompt), config.max_num_batched_tokens):
        tokens = prompt[first:first + config.max_num_batched_tokens]
        batch = ForwardBatch.build([tokens], [first], [long_seq_blocks], block_size)
        rows.append((f"prefill {len(tokens)} tokens after {first}", *measure(executor, batch, device)))
    num_seqs = config.max_num_seqs
    spare = iter(range(len(long_seq_blocks), executor.num_kv_blocks))
    short_tables = [[next(spare)] for _ in range(num_seqs - 1)]
    batch = ForwardBatch.build([[1]] * num_seqs, [max_model_len - 1] + [1] * (num_seqs - 1),
                               [long_seq_blocks] + short_tables, block_size)
    graphs = "graph" if executor.cuda_graphs else "eager"
    rows.append((f"decode {num_seqs} seqs ({graphs}), one at {max_model_len}", *measure(executor, batch, device)))

    budget = plan.budget_bytes - plan.non_torch_bytes if plan is not None else 0
    print(f"{'step':<44} {'time s':>8} {'activation peak GiB':>20} {'total peak GiB':>15} {'within plan':>12}")
    for name, seconds, peak in rows:
        within = "yes" if plan is None or peak <= budget else "NO"
        print(f"{name:<44} {seconds:>8.2f} {(peak - baseline) / GIB:>20.2f} {peak / GIB:>15.2f} {within:>12}")
    if device.type == "cuda":
        total, free = torch.cuda.mem_get_info(device)[1], torch.cuda.mem_get_info(device)[0]
        outside = total - free - torch.cuda.memory_reserved(device)
        print(f"outside PyTorch's allocator now (CUDA context, NCCL, kernels): {outside / GIB:.2f} GiB; "
              f"card {total / GIB:.2f} GiB")


def measure(executor: ModelExecutor, batch: ForwardBatch, device: torch.device) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    executor.execute(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device)
    return time.perf_counter() - start, 0


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def describe(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
