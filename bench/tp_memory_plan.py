"""One rank of a tensor-parallel preset on one GPU: the real shapes with random weights, the preset's KV cache, and
the largest steps the preset allows; prints weights, KV cache and peak memory against the card's.

    python bench/tp_memory_plan.py --config configs/dots.llm1.inst-8xH100.yaml

The other ranks are stood in for (collectives return tensors of the shape the full group would), so this checks
memory and step shapes, not numbers; the preset's memory comment should hold with the peak measured here.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import ModelConfig  # noqa: E402
from model.device import resolve_dtype  # noqa: E402
from model.forward_batch import ForwardBatch  # noqa: E402
from model.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block  # noqa: E402
from model.loader import load_model  # noqa: E402
from model.parallel import ParallelState  # noqa: E402
from server.cli import byte_size  # noqa: E402

REAL_ARCHITECTURE = Path(__file__).resolve().parents[1] / "configs" / "dots.llm1.inst"
GIB = 2**30


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
    preset = yaml.safe_load(args.config.read_text())
    device = torch.device(args.device)
    dtype = resolve_dtype(preset.get("dtype", "auto"), device)
    world_size = preset["tensor_parallel_size"]
    block_size = preset.get("block_size", 16)
    config = ModelConfig.from_pretrained(args.model)
    max_model_len = preset.get("max_model_len") or config.max_position_embeddings
    parallel = StandInGroup(rank=0, world_size=world_size, expert_parallel=preset.get("enable_expert_parallel", False))

    start = time.perf_counter()
    model = load_model(args.model, dtype=dtype, device=device, load_format="dummy", parallel=parallel,
                       quantization=preset.get("quantization"))
    weights = allocated(device)
    bytes_per_block = kv_cache_bytes_per_block(config, block_size, dtype, parallel)
    num_blocks = byte_size(preset["kv_cache_memory"]) // bytes_per_block
    kv_caches = allocate_kv_cache(config, num_blocks, block_size, dtype, device, parallel)
    baseline = allocated(device)
    print(f"{args.config.name}: rank 0 of {world_size} on {describe(device)}, loaded in "
          f"{time.perf_counter() - start:.0f}s")

    rows = []
    long_seq_blocks = list(range(math.ceil(max_model_len / block_size)))
    chunk = preset.get("max_num_batched_tokens", 8192)
    prompt = torch.randint(0, config.vocab_size, (max_model_len - 1,)).tolist()
    for first in range(0, len(prompt), chunk):
        tokens = prompt[first:first + chunk]
        batch = ForwardBatch.build([tokens], [first], [long_seq_blocks], block_size)
        rows.append((f"prefill {len(tokens)} tokens after {first}", *measure(model, batch, kv_caches, device,
                                                                                 baseline)))
    num_seqs = preset.get("max_num_seqs", 256)
    spare = iter(range(len(long_seq_blocks), num_blocks))
    short_tables = [[next(spare)] for _ in range(num_seqs - 1)]
    batch = ForwardBatch.build([[1]] * num_seqs, [max_model_len - 1] + [1] * (num_seqs - 1),
                               [long_seq_blocks] + short_tables, block_size)
    rows.append((f"decode {num_seqs} seqs, one at {max_model_len}", *measure(model, batch, kv_caches, device,
                                                                            baseline)))

    total = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else 0
    print(f"weights {weights / GIB:.2f} GiB, KV cache {(baseline - weights) / GIB:.2f} GiB "
          f"({num_blocks} blocks = {num_blocks * block_size} tokens), card {total / GIB:.2f} GiB")
    print(f"{'step':<36} {'time s':>8} {'activation peak GiB':>20} {'total peak GiB':>15}")
    for name, seconds, peak in rows:
        print(f"{name:<36} {seconds:>8.2f} {(peak - baseline) / GIB:>20.2f} {peak / GIB:>15.2f}")
    if device.type == "cuda":
        outside = total - torch.cuda.mem_get_info(device)[0] - torch.cuda.memory_reserved(device)
        print(f"outside PyTorch's allocator (CUDA context, kernels): {outside / GIB:.2f} GiB")


def measure(model, batch: ForwardBatch, kv_caches, device: torch.device, baseline: int) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model(batch.to(device), kv_caches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device)
    return time.perf_counter() - start, baseline


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def describe(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
