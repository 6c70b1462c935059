"""Compiles every Triton attention kernel variant for a CUDA target, offline: no GPU needed, only Triton.

Catches what the CPU interpreter cannot (bf16, the real code generator) before a GPU machine is at hand, and prints
each variant's registers and spill stack (from Triton's bundled cuobjdump) and shared memory.

    PYTHONPATH=. python3 bench/compile_attention_kernels.py                 # sm_90 (H100/H200), dots.llm1 shapes
    PYTHONPATH=. python3 bench/compile_attention_kernels.py --arch 80 --head-dim 64
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.kernels.attention import decode_reduce, decode_split_kv, store_kv, varlen_attention  # noqa: E402

FLOAT_ARGS = ("k_inv_scale", "v_inv_scale", "k_scale", "v_scale", "scale_log2")


def compile_kernel(kernel, pointers: dict[str, str], constexprs: dict, target: GPUTarget, num_warps: int):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target,
                          options={"num_warps": num_warps})


def resource_usage(cubin: bytes) -> str:
    """"REG:n STACK:n" of a cubin, or "?" when Triton ships no cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([str(tool), "-res-usage", handle.name], capture_output=True, text=True).stdout
    return " ".join(re.findall(r"(?:REG|STACK):\d+", report)) or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 89, 90")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--group", type=int, default=1, help="query heads per kv head")
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    block_d = triton.next_power_of_2(args.head_dim)
    print(f"{'kernel':<34} {'dtype':<6} {'cache':<8} {'registers, spill stack':<22} {'smem B':>7} {'s':>5}")
    pairs = [("bf16", "bf16"), ("fp16", "fp16")]
    if args.arch >= 89:  # Triton's float8_e4m3fn (fp8e4nv) needs sm_89+; below, the FP8 cache runs on torch
        pairs += [("bf16", "fp8e4nv"), ("fp16", "fp8e4nv")]
    for dtype, cache in pairs:
        fp8 = cache == "fp8e4nv"
        cache_pointers = {"key_cache_ptr": f"*{cache}", "value_cache_ptr": f"*{cache}", "block_tables_ptr": "*i32"}
        variants = [("store", store_kv._store_kv_kernel, 4,
                     {"key_ptr": f"*{dtype}", "value_ptr": f"*{dtype}", **cache_pointers, "slot_mapping_ptr": "*i64"},
                     dict(NUM_KV_HEADS=args.kv_heads, HEAD_DIM=args.head_dim, BLOCK_SIZE=args.block_size, BLOCK_T=1,
                          BLOCK_HD=triton.next_power_of_2(args.kv_heads * args.head_dim), QUANTIZE=fp8))]
        for sliding in (False, True):
            for single in (True, False):
                variants.append((f"decode sliding={sliding:d} single={single:d}",
                                 decode_split_kv._decode_split_kv_kernel, decode_split_kv.NUM_WARPS,
                                 {"query_ptr": f"*{dtype}", **cache_pointers, "context_lens_ptr": "*i32",
                                  "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "output_ptr": f"*{dtype}"},
                                 dict(GROUP=args.group, BLOCK_SIZE=args.block_size, BLOCK_N=decode_split_kv.BLOCK_N,
                                      HEAD_DIM=args.head_dim, BLOCK_D=block_d, SLIDING=sliding, DEQUANTIZE=fp8,
                                      SINGLE_SPLIT=single)))
            for max_query_len in (1, 64):
                block_m, block_n, num_warps = varlen_attention.tiles_for(max_query_len)
                variants.append((f"varlen sliding={sliding:d} M={block_m} N={block_n}",
                                 varlen_attention._varlen_attention_kernel, num_warps,
                                 {"query_ptr": f"*{dtype}", **cache_pointers, "query_start_loc_ptr": "*i32",
                                  "context_lens_ptr": "*i32", "output_ptr": f"*{dtype}"},
                                 dict(GROUP=args.group, BLOCK_SIZE=args.block_size, BLOCK_M=block_m,
                                      BLOCK_N=block_n, HEAD_DIM=args.head_dim,
                                      BLOCK_D=max(16, block_d), SLIDING=sliding, DEQUANTIZE=fp8,
                                      DOT_PRECISION="tf32")))
        variants.append(("reduce", decode_reduce._decode_reduce_kernel, 4,
                         {"partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "output_ptr": f"*{dtype}"},
                         dict(HEAD_DIM=args.head_dim, BLOCK_D=block_d, BLOCK_S=decode_split_kv.MAX_SPLITS)))
        for name, kernel, num_warps, pointers, constexprs in variants:
            start = time.perf_counter()
            compiled = compile_kernel(kernel, pointers, constexprs, target, num_warps)
            print(f"{name:<34} {dtype:<6} {cache:<8} {resource_usage(compiled.asm['cubin']):<22} "
                  f"{compiled.metadata.shared:>7} {time.perf_counter() - start:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
