"""Tile settings of the grouped MoE GEMMs, keyed by the batch's token count.

Chosen for dots.llm1's routed experts (hidden 4096, 128 experts, top-6, intermediate 1408, so 6T/128 pairs per expert
at T tokens) on Hopper-class cards: decode batches give each touched expert a handful of pairs, so BLOCK_M is the
smallest tile tl.dot takes (16) with a deep K tile to keep the weight stream wide; prefill batches of thousands of
tokens give each expert hundreds of pairs, so larger M tiles reuse each weight tile across more rows, and GROUP_M
orders programs so neighbouring M blocks share weight tiles in L2. BLOCK_N is 64 for both GEMMs: gate-and-up keeps
two accumulators (gate and up) per program.

The stage counts suit Hopper's 227 KiB of shared memory per block in 16-bit types; ``fit_stages`` lowers them where
a tile takes more (fp32) or the card has less (sm_89: 99 KiB).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class MoETileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# (most tokens, config), in increasing token counts; the last entry covers everything larger.
TILE_CONFIGS: tuple[tuple[int, MoETileConfig], ...] = (
    (32, MoETileConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)),
    (256, MoETileConfig(block_m=32, block_n=64, block_k=128, group_m=4, num_warps=4, num_stages=3)),
    (1024, MoETileConfig(block_m=64, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3)),
    (1 << 62, MoETileConfig(block_m=128, block_n=64, block_k=64, group_m=8, num_warps=8, num_stages=3)),
)


def tile_config(num_tokens: int) -> MoETileConfig:
    for most_tokens, config in TILE_CONFIGS:
        if num_tokens <= most_tokens:
            return config
    raise AssertionError("the last entry covers every count")


def fit_stages(tiles: MoETileConfig, activation_bytes: int, weight_bytes: int, shared_memory_limit: int) -> int:
    """The most pipeline stages (at most the config's, at least 1) whose buffers fit ``shared_memory_limit`` bytes.

    Sized for gate-and-up, the larger of the two GEMMs: per stage one [BLOCK_M, BLOCK_K] activation tile and two
    [BLOCK_K, BLOCK_N] weight tiles; Triton's pipeliner keeps stages - 1 of them in shared memory.
    """
    per_stage = tiles.block_k * (tiles.block_m * activation_bytes + 2 * tiles.block_n * weight_bytes)
    stages = tiles.num_stages
    while stages > 1 and (stages - 1) * per_stage > shared_memory_limit:
        stages -= 1
    return stages
