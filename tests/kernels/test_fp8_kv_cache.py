"""FP8 (float8_e4m3fn) KV cache: both attention backends against attention over the dequantized cache."""
import pytest
import torch

from model.attention_backend import TorchAttentionBackend, TritonAttentionBackend
from model.config import ModelConfig
from model.embedded import EMBEDDED_MODEL_DIR
from model.kernels.attention.store_kv import store_kv
from model.kv_cache import (FP8_KV_DTYPE, allocate_kv_cache, kv_cache_bytes_per_block, quantize_kv,
                            resolve_kv_cache_dtype)
from paged_problem import Layer, make_problem, run

TORCH = TorchAttentionBackend()
TRITON = TritonAttentionBackend()


def dequantized(x: torch.Tensor, scale: float) -> torch.Tensor:
    return quantize_kv(x, scale).float() * scale


def test_triton_store_writes_the_bytes_torch_does():
    """Round to nearest even onto the e4m3 grid, ties, subnormals, saturation and signed zeros included (the
    interpreter's own float8 conversion gets carries wrong, so the kernel rounds before converting)."""
    generator = torch.Generator().manual_seed(0)
    grid = torch.arange(256, dtype=torch.uint8)
    grid = grid[(grid & 0x7F) != 0x7F].view(FP8_KV_DTYPE).float()  # every finite e4m3 value
    midpoints = (grid.sort().values[1:] + grid.sort().values[:-1]) / 2
    values = torch.cat([torch.tensor([500.0, -1e4, 460.0, -0.0, 1e-12]), grid, midpoints,
                        torch.randn(2000, generator=generator) * 4, torch.randn(500, generator=generator) * 0.01])
    values = values[: values.numel() // 16 * 16].reshape(-1, 2, 8)  # [T, Hkv, D]
    num_tokens = values.shape[0]
    caches = [torch.zeros(-(-num_tokens // 16), 16, 2, 8, dtype=FP8_KV_DTYPE) for _ in range(2)]
    store_kv(values, -values, *caches, torch.arange(num_tokens), k_scale=0.5, v_scale=1.0)
    written = [cache.view(-1, 2, 8)[:num_tokens].view(torch.uint8) for cache in caches]
    assert torch.equal(written[0], quantize_kv(values, 0.5).view(torch.uint8))
    assert torch.equal(written[1], quantize_kv(-values, 1.0).view(torch.uint8))


@pytest.mark.parametrize("kind", ["decode", "mixed", "sliding mixed"])
def test_both_backends_attend_over_the_dequantized_cache(kind):
    new = [1, 1, 1] if kind == "decode" else [1, 13, 5]
    problem = make_problem([40, 0, 21], new, 16, num_heads=4, num_kv_heads=2, seed=11)
    layer = Layer(scale=0.25, window=9 if kind.startswith("sliding") else None, k_scale=0.05, v_scale=0.1)
    reference_problem = make_problem([40, 0, 21], new, 16, num_heads=4, num_kv_heads=2, seed=11)
    reference_problem.history = (dequantized(problem.history[0], 0.05), dequantized(problem.history[1], 0.1))
    reference_problem.key = dequantized(problem.key, 0.05)
    reference_problem.value = dequantized(problem.value, 0.1)
    expected, _ = run(TORCH, reference_problem, Layer(scale=0.25, window=layer.window))
    outputs, caches = {}, {}
    for backend in (TORCH, TRITON):
        outputs[backend.name], caches[backend.name] = run(backend, problem, layer, cache_dtype=FP8_KV_DTYPE)
        diff = (outputs[backend.name] - expected).abs().max().item()
        assert diff < 1e-5, f"{backend.name}: {diff:.3g}"
    for torch_cache, triton_cache in zip(caches["torch"], caches["triton"]):
        assert torch.equal(torch_cache.view(torch.uint8), triton_cache.view(torch.uint8))
    # The cache really is 8-bit: attention over the unquantized keys differs by far more than the tolerance.
    unquantized, _ = run(TORCH, problem, Layer(scale=0.25, window=layer.window))
    assert (unquantized - expected).abs().max().item() > 1e-3


def test_half_precision_queries_over_an_fp8_cache():
    problem = make_problem([30, 5], [1, 9], 16, num_heads=2, num_kv_heads=1, seed=12)
    layer = Layer(scale=0.25, k_scale=0.5, v_scale=0.5)
    expected, _ = run(TORCH, problem, layer, cache_dtype=FP8_KV_DTYPE)
    actual, _ = run(TRITON, problem, layer, dtype=torch.float16, cache_dtype=FP8_KV_DTYPE)
    assert (actual - expected).abs().max().item() < 3e-3


def test_fp8_cache_holds_twice_the_tokens_of_bf16():
    config = ModelConfig.from_pretrained(EMBEDDED_MODEL_DIR)
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16) == FP8_KV_DTYPE
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        resolve_kv_cache_dtype("int8", torch.bfloat16)
    assert 2 * kv_cache_bytes_per_block(config, 16, FP8_KV_DTYPE) == kv_cache_bytes_per_block(config, 16,
                                                                                                torch.bfloat16)
    caches = allocate_kv_cache(config, 3, 16, FP8_KV_DTYPE, "cpu")
    assert all(k.dtype == v.dtype == FP8_KV_DTYPE for k, v in caches)
