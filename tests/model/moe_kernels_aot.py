"""Compiles the fused-MoE kernels for CUDA targets on a machine without a GPU (Triton bundles ptxas).

Catches what the interpreter lets through (non-constexpr globals, types an architecture lacks, such as native fp8
before sm_89) and checks each tile configuration's shared memory against the card's limit. Must run without
TRITON_INTERPRET (then @triton.jit kernels are interpreted functions that cannot be compiled).

    python tests/model/moe_kernels_aot.py            # every tile config, sm_80 / sm_89 / sm_90
    python tests/model/moe_kernels_aot.py --quick    # what the test suite runs: one config per code path
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from model.kernels.moe.align_count import moe_align_count_kernel  # noqa: E402
from model.kernels.moe.align_offsets import moe_align_offsets_kernel  # noqa: E402
from model.kernels.moe.align_scatter import moe_align_scatter_kernel  # noqa: E402
from model.kernels.moe.combine import moe_combine_kernel  # noqa: E402
from model.kernels.moe.down import moe_down_kernel  # noqa: E402
from model.kernels.moe.gate_up import moe_gate_up_kernel  # noqa: E402
from model.kernels.moe.tile_config import TILE_CONFIGS, fit_stages  # noqa: E402

SHARED_MEMORY_LIMIT = {80: 166912, 89: 101376, 90: 232448}  # bytes per block (A100, L4/L40, H100/H200)
# (activation dtype, weight dtype, W8A8): the four code paths of the GEMMs. "u8" is weight-only FP8 (raw bytes).
VARIANTS = (("bf16", "bf16", False), ("fp32", "fp32", False), ("bf16", "u8", False), ("fp8e4nv", "fp8e4nv", True))
MOE_ROUTING = dict(NUM_EXPERTS=128, BLOCK_E=128, TOP_K=6)  # dots.llm1


# Arguments that are multiples of 16 for dots.llm1 (hidden 4096, intermediate 1408 and its TP shards, their
# strides): the JIT marks such values (and 16-byte-aligned pointers) divisible, which vectorized, pipelined loads
# need, so the compile here marks them too.
DIVISIBLE_ARGS = {"inter", "hidden", "stride_xt", "stride_we", "stride_wn", "stride_ws", "stride_op", "stride_hp",
                  "stride_yp", "stride_ot"}


def compile_kernel(kernel, signature: dict[str, str], constants: dict, arch: int, num_warps: int = 4,
                   num_stages: int = 3):
    signature = signature | {name: "constexpr" for name in constants}
    divisible = {(index,): [["tt.divisibility", 16]] for index, (name, kind) in enumerate(signature.items())
                 if kind.startswith("*") or name in DIVISIBLE_ARGS}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=divisible)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_align_and_combine(arch: int) -> None:
    experts = dict(NUM_EXPERTS=MOE_ROUTING["NUM_EXPERTS"], BLOCK_E=MOE_ROUTING["BLOCK_E"])
    compile_kernel(moe_align_count_kernel, dict(topk_ids_ptr="*i64", chunk_counts_ptr="*i32", num_pairs="i32",
                                                expert_start="i32"), experts | dict(CHUNK=256, BLOCK_P=32), arch)
    compile_kernel(moe_align_offsets_kernel, dict(chunk_counts_ptr="*i32", chunk_offsets_ptr="*i32",
                                                  block_expert_ptr="*i32", padded_total_ptr="*i32",
                                                  num_chunks="i32", num_blocks="i32"),
                   experts | dict(BLOCK_M=16, BLOCK_C=16, BLOCK_B=64), arch)
    compile_kernel(moe_align_scatter_kernel, dict(topk_ids_ptr="*i64", chunk_offsets_ptr="*i32",
                                                  sorted_pair_ids_ptr="*i32", num_pairs="i32", expert_start="i32"),
                   experts | dict(CHUNK=256, BLOCK_P=32), arch)
    compile_kernel(moe_combine_kernel, dict(y_ptr="*bf16", topk_ids_ptr="*i64", out_ptr="*bf16", hidden="i32",
                                            expert_start="i32", num_local_experts="i32", stride_yp="i32",
                                            stride_ot="i32"), dict(TOP_K=MOE_ROUTING["TOP_K"], BLOCK_H=512), arch)


def stages_for(arch: int, activation: str, weight: str, tiles) -> int:
    """The stages ``fused_moe`` picks on a card of this architecture."""
    size = {"bf16": 2, "fp32": 4, "u8": 1, "fp8e4nv": 1}
    return fit_stages(tiles, size[activation], size[weight], SHARED_MEMORY_LIMIT[arch])


def compile_gemms(arch: int, activation: str, weight: str, w8a8: bool, tiles) -> list[int]:
    """Shared memory bytes of the gate-and-up and down kernels for one variant and tile config."""
    output = "bf16" if w8a8 else activation
    num_stages = stages_for(arch, activation, weight, tiles)
    flags = dict(WEIGHT_FP8=weight in ("u8", "fp8e4nv"), ACT_FP8=w8a8, IEEE_FP32=activation == "fp32",
                 BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m)
    blocks = dict(sorted_pair_ids_ptr="*i32", block_expert_ptr="*i32", padded_total_ptr="*i32", num_pairs="i32",
                  num_m_blocks="i32")
    gate_up = compile_kernel(
        moe_gate_up_kernel, dict(x_ptr=f"*{activation}", x_scale_ptr="*fp32", w_ptr=f"*{weight}",
                                 w_scale_ptr="*fp32", out_ptr=f"*{output}", **blocks, inter="i32", hidden="i32",
                                 stride_xt="i32", stride_we="i32", stride_wn="i32", stride_ws="i32",
                                 stride_op="i32"),
        flags | dict(TOP_K=MOE_ROUTING["TOP_K"]), arch, tiles.num_warps, num_stages)
    down = compile_kernel(
        moe_down_kernel, dict(h_ptr=f"*{activation}", h_scale_ptr="*fp32", w_ptr=f"*{weight}", w_scale_ptr="*fp32",
                              topk_weights_ptr="*fp32", out_ptr=f"*{output}", **blocks, hidden="i32", inter="i32",
                              stride_hp="i32", stride_we="i32", stride_wn="i32", stride_ws="i32", stride_op="i32"),
        flags, arch, tiles.num_warps, num_stages)
    return [gate_up.metadata.shared, down.metadata.shared]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sm_90: one tile config per code path; sm_80 and "
                        "sm_89: one each")
    args = parser.parse_args()
    failures = []
    plans = ([(90, variant, TILE_CONFIGS[0][1]) for variant in VARIANTS] + [(80, VARIANTS[2], TILE_CONFIGS[0][1]),
                                                                             (89, VARIANTS[0], TILE_CONFIGS[0][1])]
             if args.quick else
             [(arch, variant, tiles) for arch in (80, 89, 90) for variant in VARIANTS for _, tiles in TILE_CONFIGS
              if arch >= 89 or not variant[2]])
    for arch in sorted({arch for arch, _, _ in plans}):
        compile_align_and_combine(arch)
        print(f"sm_{arch}: align and combine compiled", flush=True)
    for arch, (activation, weight, w8a8), tiles in plans:
        shared = compile_gemms(arch, activation, weight, w8a8, tiles)
        fits = max(shared) <= SHARED_MEMORY_LIMIT[arch]
        stages = stages_for(arch, activation, weight, tiles)
        print(f"sm_{arch} {activation}/{weight}{' w8a8' if w8a8 else ''} M{tiles.block_m} N{tiles.block_n} "
              f"K{tiles.block_k} stages {stages}: shared memory {shared} bytes"
              f"{'' if fits else ' TOO MUCH'}", flush=True)
        if not fits:
            failures.append((arch, activation, weight, tiles))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
