"""The fused MoE entry point: align, gate-and-up with SiLU, down with routing weights, combine; no host syncs.

Every launch is sized from host-known shapes (tokens, top-k, experts, tile config); what depends on routing (pairs
per expert, the padded total) stays in device tensors the kernels read.
"""
from functools import cache

import torch
import triton

from model.kernels.moe.align import moe_align
from model.kernels.moe.combine import moe_combine_kernel
from model.kernels.moe.down import moe_down_kernel
from model.kernels.moe.gate_up import moe_gate_up_kernel
from model.kernels.moe.tile_config import MoETileConfig, fit_stages, tile_config

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
COMBINE_BLOCK_H = 512


def supports_fp8_compute(device: torch.device) -> bool:
    """float8 x float8 tensor-core matmuls: CUDA compute capability 8.9 (Ada, Hopper) and newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@cache
def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory one program may use on ``device`` (no limit that matters for the interpreter)."""
    if device.type != "cuda":
        return 1 << 30
    index = device.index if device.index is not None else torch.cuda.current_device()
    limit = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    return limit or triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] -> (float8_e4m3fn [N, K], fp32 scales [N]) with x ~= q * scale; dynamic, amax / 448 per row."""
    scale = x.abs().amax(dim=-1).float().clamp(min=1e-12) / FP8_MAX  # [N]
    quantized = (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, expert_start: int = 0, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, quantize_activations: bool | None = None,
              config: MoETileConfig | None = None) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) over the experts this rank holds.

    x [T, H] (fp32, fp16 or bf16); w13 [E_local, 2I, H] gate rows then up rows; w2 [E_local, H, I]; local expert e is
    global expert expert_start + e, and pairs routed to other experts add nothing (expert parallel). topk_weights
    [T, k] (fp32), topk_ids [T, k] (global ids). Returns [T, H] in x's dtype.

    FP8: w13/w2 in float8_e4m3fn with w13_scale [E_local, 2I] and w2_scale [E_local, H] fp32 per-output-channel
    scales. quantize_activations (default: on where ``supports_fp8_compute``) also quantizes x and the intermediate
    per token (W8A8); otherwise the weights are widened to x's dtype tile by tile (weight-only, any GPU).
    """
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_local_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    if w2.shape != (num_local_experts, hidden, inter) or w13.shape[2] != hidden:
        raise ValueError(f"expert weights {tuple(w13.shape)} / {tuple(w2.shape)} do not fit hidden size {hidden}")
    weight_fp8 = w13.dtype == FP8_DTYPE
    if weight_fp8 != (w2.dtype == FP8_DTYPE) or weight_fp8 != (w13_scale is not None) or (
            weight_fp8 != (w2_scale is not None)):
        raise ValueError("FP8 expert weights need both w13 and w2 in float8_e4m3fn, each with its scales")
    if weight_fp8 and (w13_scale.shape != (num_local_experts, two_inter) or
                       w2_scale.shape != (num_local_experts, hidden)):
        raise ValueError(f"FP8 scales {tuple(w13_scale.shape)} / {tuple(w2_scale.shape)} are not per output channel")
    if quantize_activations is None:
        quantize_activations = weight_fp8 and supports_fp8_compute(x.device)
    if quantize_activations and not weight_fp8:
        raise ValueError("quantize_activations needs FP8 weights")
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    tiles = config or tile_config(num_tokens)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    if weight_fp8 and not quantize_activations:
        w13, w2 = w13.view(torch.uint8), w2.view(torch.uint8)  # weight-only kernels decode the e4m3 bits
    num_pairs = num_tokens * top_k
    sorted_pair_ids, block_expert, padded_total = moe_align(topk_ids, num_local_experts, tiles.block_m, expert_start)
    num_m_blocks = block_expert.numel()
    activation_bytes = 1 if quantize_activations else x.element_size()
    num_stages = fit_stages(tiles, activation_bytes, w13.element_size(), shared_memory_per_block(x.device))
    flags = dict(WEIGHT_FP8=weight_fp8, ACT_FP8=quantize_activations, IEEE_FP32=x.dtype == torch.float32,
                 BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
                 num_warps=tiles.num_warps, num_stages=num_stages)

    a, a_scale = quantize_per_token(x) if quantize_activations else (x, x)
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [P, I]
    moe_gate_up_kernel[(num_m_blocks * triton.cdiv(inter, tiles.block_n),)](
        a, a_scale, w13, w13_scale if weight_fp8 else w13, h, sorted_pair_ids, block_expert, padded_total,
        num_pairs, num_m_blocks, inter, hidden, a.stride(0), w13.stride(0), w13.stride(1),
        w13_scale.stride(0) if weight_fp8 else 0, h.stride(0), TOP_K=top_k, **flags)

    h_in, h_scale = quantize_per_token(h) if quantize_activations else (h, h)
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # [P, H]
    weights = topk_weights.float().contiguous()
    moe_down_kernel[(num_m_blocks * triton.cdiv(hidden, tiles.block_n),)](
        h_in, h_scale, w2, w2_scale if weight_fp8 else w2, weights, y, sorted_pair_ids, block_expert, padded_total,
        num_pairs, num_m_blocks, hidden, inter, h_in.stride(0), w2.stride(0), w2.stride(1),
        w2_scale.stride(0) if weight_fp8 else 0, y.stride(0), **flags)

    block_h = min(COMBINE_BLOCK_H, triton.next_power_of_2(hidden))
    moe_combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, topk_ids.contiguous(), out, hidden, expert_start, num_local_experts, y.stride(0), out.stride(0),
        TOP_K=top_k, BLOCK_H=block_h)
    return out
