"""GEMV (M=1) throughput of the CPU quantized kernels (model.kernels.cpu.qlinear) with weights streamed from DRAM.

Each row of the table cycles over enough distinct matrices (> 2x a 32 MB L3) that every call reads its weight from
memory, and reports 10^9 weights per second (Gw/s) and the bytes read per second. Baselines on the same shapes:
bfloat16 oneDNN on a packed weight (model.linear.pack_weight) and torch's int4 group-32 kernel
(_weight_int4pack_mm_for_cpu, bfloat16 activations).

    .venv/bin/python bench/cpu_qgemm_bench.py [--threads 2] [--seconds 2.0] [--rounds 8] [--rows 1]
"""
import argparse
import time

import torch

from model.kernels.cpu.extension import load
from model.kernels.cpu.qlinear import qlinear
from model.linear import linear, pack_weight
from model.quant.packed import PackedQuantWeight, describe, nbytes, pack

SHAPES = [(2816, 4096), (151936 // 8, 1024)]  # fused gate/up of dots1's shared experts; an eighth of its vocabulary
FORMATS = {"Q8_0": (8, 32, 128, False), "Q6_K": (6, 16, 32, False), "Q5_K": (5, 32, 0, True),
           "Q5_0": (5, 32, 16, False), "Q4_K": (4, 32, 0, True), "Q4_0": (4, 32, 8, False)}
STREAM_BYTES = 96 << 20


def copies_for(bytes_each: int) -> int:
    return max(2, -(-STREAM_BYTES // bytes_each))


def time_round(calls: list, seconds: float) -> float:
    """Seconds per call over one round of cycling through ``calls`` for about ``seconds``."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for call in calls:
            call()
        count += len(calls)
    return (time.perf_counter() - start) / count


def packed_copies(n: int, k: int, name: str) -> list[PackedQuantWeight]:
    bits, group, zero, has_min = FORMATS[name]
    codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8)
    scale = (torch.rand(n, k // group) * 0.01).half()
    w = pack(codes, scale, scale.clone() if has_min else None, bits=bits, group_size=group, zero=zero)
    clone = lambda t: None if t is None else t.clone()  # noqa: E731
    return [PackedQuantWeight(w.bits, w.group_size, w.zero, clone(w.lo), clone(w.hi), clone(w.scale), clone(w.min))
            for _ in range(copies_for(nbytes(w)))]


def bench_shape(n: int, k: int, rows: int, seconds: float, rounds: int) -> list[tuple[str, float, float]]:
    """[(kernel, Gw/s, GB/s)] for one [n, k] weight: the best of ``rounds`` rounds, kernels interleaved in each round
    so that a burst of load from another process does not land on one kernel only."""
    x = torch.randn(rows, k)
    x_bf16 = x.bfloat16()
    kernels = []  # (name, bytes per weight matrix, calls)
    bf16 = [pack_weight(torch.randn(n, k, dtype=torch.bfloat16) * 0.02) for _ in range(copies_for(2 * n * k))]
    kernels.append(("bf16 oneDNN packed", 2 * n * k, [lambda w=w: linear(x_bf16, w) for w in bf16]))
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_and_zeros = (torch.rand(k // 32, n, 2) * 0.01).bfloat16()
    int4_bytes = int4.numel() + scales_and_zeros.numel() * 2
    int4_copies = [(int4.clone(), scales_and_zeros.clone()) for _ in range(copies_for(int4_bytes))]
    kernels.append(("int4pack g32 (bf16 x)", int4_bytes,
                    [lambda c=c: torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, c[0], 32, c[1])
                     for c in int4_copies]))
    for name in FORMATS:
        ws = packed_copies(n, k, name)
        kernels.append((f"qlinear {name} ({describe(ws[0])})", nbytes(ws[0]), [lambda w=w: qlinear(x, w) for w in ws]))
    best = [float("inf")] * len(kernels)
    for _ in range(rounds):
        for i, (_, _, calls) in enumerate(kernels):
            best[i] = min(best[i], time_round(calls, seconds / rounds))
    return [(name, n * k / t / 1e9, size / t / 1e9) for (name, size, _), t in zip(kernels, best)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per kernel and shape")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds; the best one counts")
    parser.add_argument("--rows", type=int, default=1, help="activation rows M")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module = load()
    print(f"threads {args.threads}, M = {args.rows}, instruction set {module.active_isa()}")
    table = {shape: bench_shape(*shape, args.rows, args.seconds, args.rounds) for shape in SHAPES}
    names = [name for name, _, _ in table[SHAPES[0]]]
    header = f"{'kernel':34s}" + "".join(f" | {f'[{n}, {k}] Gw/s (GB/s)':>26s}" for n, k in SHAPES)
    print(header)
    print("-" * len(header))
    for i, name in enumerate(names):
        cells = "".join(f" | {f'{table[s][i][1]:6.1f} ({table[s][i][2]:5.1f})':>26s}" for s in SHAPES)
        print(f"{name:34s}{cells}")


if __name__ == "__main__":
    main()
