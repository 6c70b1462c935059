"""Tensor-parallel decode: what the collectives cost per step, and whether TP N reproduces TP 1.

    python bench/tp_bench.py                                  # CPU, gloo, TP 2 vs TP 1
    python bench/tp_bench.py --device cuda --tensor-parallel-size 8   # GPUs, NCCL, bf16

For the embedded tiny model and a random mid-size checkpoint, each rank runs decode steps of B sequences over a
prefilled context. Per step it reports the step time at TP 1 and at TP N, the time spent inside the forward's
collectives (2 all-reduces per layer, 1 for the embedding, 1 all-gather of the logits; it includes waiting for the
slower rank), the same count of all-reduces of a [B, hidden] tensor timed alone, decode throughput, and the largest
logits difference between TP N and TP 1 on the same inputs.
"""
import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.embedded import EMBEDDED_MODEL_DIR  # noqa: E402
from model.forward_batch import ForwardBatch  # noqa: E402
from model.kv_cache import allocate_kv_cache  # noqa: E402
from model.loader import load_model  # noqa: E402
from model.parallel import ParallelState  # noqa: E402
from mid_size import write_mid_size_checkpoint  # noqa: E402

BLOCK_SIZE = 16


class TimedParallelState(ParallelState):
    """Adds up the time spent in collectives (synchronizing the GPU around each one when ``timing`` is on)."""

    timing: bool = False
    seconds: float = 0.0
    calls: int = 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._timed(super().all_reduce, tensor)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return self._timed(super().all_gather, tensor, dim)

    def _timed(self, collective, *args):
        if not self.timing:
            return collective(*args)
        synchronize(args[0].device)
        start = time.perf_counter()
        result = collective(*args)
        synchronize(args[0].device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rank(rank: int, world_size: int, port: int, options: dict, out_path: str) -> None:
    device = torch.device("cpu") if options["device"] == "cpu" else torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, options["cpu_threads"] // world_size))
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world_size)
    dtype = getattr(torch, options["dtype"])
    parallel = TimedParallelState(rank=rank, world_size=world_size)
    model = load_model(options["model_dir"], dtype=dtype, device=device, parallel=parallel)
    context, steps = options["context"], options["steps"]
    blocks_per_seq = -(-(context + 2 * steps + 4) // BLOCK_SIZE)
    kv_caches = allocate_kv_cache(model.config, blocks_per_seq * max(options["batch_sizes"]), BLOCK_SIZE, dtype,
                                  device, parallel)
    generator = torch.Generator().manual_seed(0)  # the same tokens on every rank and in every run
    rows = []
    for batch_size in options["batch_sizes"]:
        tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch_size)]
        prompts = torch.randint(0, model.config.vocab_size, (batch_size, context), generator=generator).tolist()
        model(ForwardBatch.build(prompts, [0] * batch_size, tables, BLOCK_SIZE).to(device), kv_caches)
        position = context

        def decode_steps(count: int) -> torch.Tensor:
            nonlocal position
            logits = None
            for _ in range(count):
                tokens = [[(position * 7 + i) % model.config.vocab_size] for i in range(batch_size)]
                batch = ForwardBatch.build(tokens, [position] * batch_size, tables, BLOCK_SIZE)
                logits = model(batch.to(device), kv_caches)
                position += 1
            synchronize(device)
            return logits

        decode_steps(2)  # warm-up
        start = time.perf_counter()
        logits = decode_steps(steps)
        step_s = (time.perf_counter() - start) / steps
        parallel.timing, parallel.seconds, parallel.calls = True, 0.0, 0
        decode_steps(steps)
        parallel.timing = False
        row = {"batch": batch_size, "step_ms": 1e3 * step_s, "tokens_per_s": batch_size / step_s,
               "collective_ms": 1e3 * parallel.seconds / steps, "collectives": parallel.calls // steps,
               "isolated_ms": isolated_all_reduce_ms(batch_size, model.config.hidden_size, dtype, device, world_size,
                                                     parallel.calls // steps)}
        rows.append(row)
        if rank == 0:
            torch.save(logits.float().cpu(), f"{out_path}.b{batch_size}.pt")
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    if world_size > 1:
        dist.destroy_process_group()


def isolated_all_reduce_ms(batch_size: int, hidden: int, dtype: torch.dtype, device: torch.device, world_size: int,
                           per_step: int) -> float:
    """``per_step`` all-reduces of a [batch, hidden] tensor with nothing else running, in ms."""
    if world_size == 1:
        return 0.0
    tensor = torch.randn(batch_size, hidden, device=device).to(dtype)
    for _ in range(5):
        dist.all_reduce(tensor)
    repeats = 50
    dist.barrier()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(tensor)
    synchronize(device)
    return 1e3 * (time.perf_counter() - start) / repeats * per_step


def measure(world_size: int, options: dict, work_dir: Path) -> tuple[list[dict], Path]:
    out_path = work_dir / f"tp{world_size}-{Path(options['model_dir']).name}.json"
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(run_rank, args=(world_size, port, options, str(out_path)), nprocs=world_size, join=True)
    return json.loads(out_path.read_text()), out_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--dtype", help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--context", type=int, default=128, help="prefilled tokens per sequence")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps")
    parser.add_argument("--cpu-threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of TP 1 on the CPU; each of N ranks gets a 1/N share")
    parser.add_argument("--models", default="embedded,mid", help="embedded, mid, or both")
    parser.add_argument("--mid-checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "dots-tp-bench-mid",
                        help="where the random mid-size checkpoint is written once and reused")
    args = parser.parse_args()
    if args.tensor_parallel_size < 2:
        parser.error("--tensor-parallel-size must be at least 2 (it is compared with 1)")
    if args.device == "cuda" and torch.cuda.device_count() < args.tensor_parallel_size:
        parser.error(f"--tensor-parallel-size {args.tensor_parallel_size} needs as many GPUs, found "
                     f"{torch.cuda.device_count()}")
    model_dirs = {"embedded": EMBEDDED_MODEL_DIR, "mid": args.mid_checkpoint}
    if "mid" in args.models and not (args.mid_checkpoint / "config.json").is_file():
        print(f"writing the random mid-size checkpoint to {args.mid_checkpoint}", flush=True)
        write_mid_size_checkpoint(args.mid_checkpoint)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    tp = args.tensor_parallel_size
    print(f"device: {device_name}, {dtype}, TP {tp} vs 1, context {args.context}, {args.steps} decode steps"
          + (f", {args.cpu_threads} torch threads for TP 1" if args.device == "cpu" else ""))
    print(f"| model | batch | TP1 step ms | TP{tp} step ms | TP{tp} tok/s | collectives/step | in-forward "
          f"collective ms/step | share of step | isolated all-reduces ms/step | max abs logit diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            options = {"device": args.device, "dtype": dtype, "model_dir": str(model_dirs[name]),
                       "batch_sizes": [int(b) for b in args.batch_sizes.split(",")], "context": args.context,
                       "steps": args.steps, "cpu_threads": args.cpu_threads}
            single, single_path = measure(1, options, Path(work))
            split, split_path = measure(tp, options, Path(work))
            for one, many in zip(single, split):
                batch = one["batch"]
                diff = (torch.load(f"{split_path}.b{batch}.pt") - torch.load(f"{single_path}.b{batch}.pt")).abs()
                print(f"| {name} | {batch} | {one['step_ms']:.2f} | {many['step_ms']:.2f} | "
                      f"{many['tokens_per_s']:.0f} | {many['collectives']} | {many['collective_ms']:.2f} | "
                      f"{100 * many['collective_ms'] / many['step_ms']:.0f}% | {many['isolated_ms']:.2f} | "
                      f"{diff.max().item():.2e} |", flush=True)


if __name__ == "__main__":
    main()
