"""The fused MoE kernels against a plain PyTorch reference on a tiny problem, on the device that will serve.

Run at start-up before the triton MoE backend is used (and by bench/gpu_check.py): a kernel that fails to compile
or computes something else must send the model to the torch backend, not to the client.
"""
import torch
import torch.nn.functional as F

from model.self_check import SelfCheckResult

CHECK_NAME = "check_fused_moe"

# Max abs error allowed, relative to the reference output's largest magnitude.
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
W8A8_RELATIVE_TOLERANCE = 3e-2  # the intermediate's fp8 rounding can flip one step on near-ties


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, *, expert_start: int = 0, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, quantize_activations: bool = False) -> torch.Tensor:
    """What ``fused_moe`` computes, in fp32, every local expert densely over every token: [T, H] in x's dtype.

    FP8 weights are dequantized (w * scale per output channel); with quantize_activations, x and the intermediate
    are rounded through per-token FP8 first, as the W8A8 kernels do.
    """
    from model.kernels.moe.fused_moe import quantize_per_token

    def through_fp8(values: torch.Tensor) -> torch.Tensor:
        quantized, scale = quantize_per_token(values)
        return quantized.float() * scale[:, None]

    gate_up_weights, down_weights = w13.float(), w2.float()  # [E, 2I, H], [E, H, I]
    if w13_scale is not None:
        gate_up_weights = gate_up_weights * w13_scale.float()[:, :, None]
        down_weights = down_weights * w2_scale.float()[:, :, None]
    inputs = through_fp8(x) if quantize_activations else x.float()
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for local_expert in range(w13.shape[0]):
        gate, up = (inputs @ gate_up_weights[local_expert].T).split(inter, dim=-1)  # [T, I] each
        hidden = (F.silu(gate) * up).to(x.dtype).float()  # the kernels keep the intermediate in x's dtype
        if quantize_activations:
            hidden = through_fp8(hidden)
        routed = ((topk_ids == expert_start + local_expert) * topk_weights.float()).sum(dim=1)  # [T]
        out += routed[:, None] * (hidden @ down_weights[local_expert].T)
    return out.to(x.dtype)


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> (float8_e4m3fn [E, N, K], fp32 scales [E, N]): amax / 448 per output channel."""
    from model.kernels.moe.fused_moe import FP8_DTYPE, FP8_MAX

    scale = weight.abs().amax(dim=-1).float().clamp(min=1e-12) / FP8_MAX
    return (weight.float() / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def check_fused_moe(device: torch.device | str, dtype: torch.dtype, fp8: bool = False) -> SelfCheckResult:
    """Every tile config of the fused MoE (and its FP8 variants, if asked) against the reference on ``device`` in
    ``dtype``: passed with the largest error seen, or failed with the mismatch or what the kernels raised."""
    try:
        return _compare_with_reference(torch.device(device), dtype, fp8)
    except Exception as error:  # Triton missing, compilation, launch or device errors
        return SelfCheckResult.failed_by(CHECK_NAME, error)


def _compare_with_reference(device: torch.device, dtype: torch.dtype, fp8: bool) -> SelfCheckResult:
    from model.kernels.moe.fused_moe import fused_moe, supports_fp8_compute
    from model.kernels.moe.tile_config import TILE_CONFIGS

    generator = torch.Generator().manual_seed(0)
    num_tokens, hidden, inter, num_experts, top_k = 5, 64, 32, 8, 2
    x = torch.randn(num_tokens, hidden, generator=generator).to(device, dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=generator) / hidden**0.5).to(device, dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=generator) / inter**0.5).to(device, dtype)
    # Expert 7 gets no token: its blocks must not exist, nothing it holds may leak into the output.
    topk_ids = torch.rand(num_tokens, num_experts - 1, generator=generator).topk(top_k).indices.to(device)
    topk_weights = torch.rand(num_tokens, top_k, generator=generator).to(device)
    variants: list[tuple[str, dict]] = [(str(dtype).removeprefix("torch."), {})]
    if fp8:
        w13_q, w13_scale = quantize_weight_per_channel(w13)
        w2_q, w2_scale = quantize_weight_per_channel(w2)
        fp8_weights = dict(w13=w13_q, w2=w2_q, w13_scale=w13_scale, w2_scale=w2_scale)
        variants.append(("fp8 weight-only", fp8_weights | dict(quantize_activations=False)))
        if supports_fp8_compute(device):
            variants.append(("fp8 w8a8", fp8_weights | dict(quantize_activations=True)))
    worst = 0.0
    for kind, variant in variants:
        weights = dict(w13=w13, w2=w2) | variant
        expected = moe_reference(x, topk_weights=topk_weights, topk_ids=topk_ids, **weights).float()
        tolerance = (W8A8_RELATIVE_TOLERANCE if variant.get("quantize_activations") else
                     RELATIVE_TOLERANCE[dtype]) * expected.abs().max().item()
        for _, tiles in TILE_CONFIGS:
            actual = fused_moe(x, topk_weights=topk_weights, topk_ids=topk_ids, config=tiles, **weights).float()
            error = (actual - expected).abs().max().item()
            if not error <= tolerance:
                return SelfCheckResult(CHECK_NAME, False, f"{kind} output off by {error:.3g} (allowed "
                                       f"{tolerance:.3g}) with {tiles}", error)
            worst = max(worst, error)
    return SelfCheckResult(CHECK_NAME, True, f"{', '.join(kind for kind, _ in variants)} over "
                           f"{len(TILE_CONFIGS)} tile configs", worst)
