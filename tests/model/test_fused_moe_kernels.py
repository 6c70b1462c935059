"""The Triton fused-MoE kernels under TRITON_INTERPRET=1 on the CPU, against plain PyTorch references."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported: it decides how @triton.jit runs

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import model.kernels.moe.fused_moe as fused_moe_module  # noqa: E402
import model.kernels.moe.self_check as self_check_module  # noqa: E402
from model.kernels.moe.align import moe_align, sorted_length_bound  # noqa: E402
from model.kernels.moe.fp8_bits import e4m3_bits_to_scaled  # noqa: E402
from model.kernels.moe.fused_moe import fused_moe, quantize_per_token  # noqa: E402
from model.kernels.moe.self_check import check_fused_moe, moe_reference, quantize_weight_per_channel  # noqa: E402
from model.kernels.moe.tile_config import TILE_CONFIGS, tile_config  # noqa: E402
from model.backend_selection import resolve_moe_backend  # noqa: E402
from model.self_check import SelfCheckResult  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}


def random_problem(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, dtype: torch.dtype,
                   routable: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for num_experts experts; tokens route (distinct experts each) among the first ``routable``."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, routable or num_experts, generator=generator)
    return dict(
        x=torch.randn(num_tokens, hidden, generator=generator).to(dtype),
        w13=(torch.randn(num_experts, 2 * inter, hidden, generator=generator) / hidden**0.5).to(dtype),
        w2=(torch.randn(num_experts, hidden, inter, generator=generator) / inter**0.5).to(dtype),
        topk_weights=torch.rand(num_tokens, top_k, generator=generator),
        topk_ids=scores.topk(top_k, dim=-1).indices,
    )


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("expert_start,chunk_pairs", [(0, 256), (3, 256), (3, 32)],
                         ids=["one_chunk", "expert_slice", "several_chunks"])
def test_align_sorts_each_experts_pairs_into_padded_blocks(expert_start, chunk_pairs):
    num_local, block_m = 5, 4
    topk_ids = torch.randint(0, 10, (37, 3), generator=torch.Generator().manual_seed(1))
    topk_ids[:, 0] = expert_start + 2  # one expert gets many pairs (several blocks); others none at all
    topk_ids[topk_ids == expert_start + 4] = expert_start + 1
    sorted_pair_ids, block_expert, padded_total = moe_align(topk_ids, num_local, block_m, expert_start, chunk_pairs)

    num_pairs = topk_ids.numel()
    flat = topk_ids.view(-1).tolist()
    expected_ids, expected_blocks = [], []
    for local in range(num_local):
        pairs = [p for p, expert in enumerate(flat) if expert == expert_start + local]
        padded = -(-len(pairs) // block_m) * block_m
        expected_ids += pairs + [num_pairs] * (padded - len(pairs))
        expected_blocks += [local] * (padded // block_m)
    assert 0 < len(expected_blocks) < len(sorted_pair_ids) // block_m  # some experts are empty
    assert expected_blocks.count(2) > 3  # one expert spans several blocks
    bound = sorted_length_bound(num_pairs, num_local, block_m)
    assert len(sorted_pair_ids) == -(-bound // block_m) * block_m and len(block_expert) == -(-bound // block_m)
    assert padded_total.tolist() == [len(expected_ids)]
    total = len(expected_ids)
    assert sorted_pair_ids[:total].tolist() == expected_ids
    assert (sorted_pair_ids[total:] == num_pairs).all()
    assert block_expert[:len(expected_blocks)].tolist() == expected_blocks
    assert (block_expert[len(expected_blocks):] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_experts_without_tokens_and_every_tile_config(dtype):
    """Experts 5-7 get no pairs; each config's BLOCK_M pads the runs differently."""
    problem = random_problem(num_tokens=9, hidden=48, inter=40, num_experts=8, top_k=2, dtype=dtype, routable=5)
    expected = moe_reference(**problem)
    for _, tiles in TILE_CONFIGS:
        actual = fused_moe(**problem, config=tiles)
        assert actual.dtype == dtype and actual.shape == problem["x"].shape
        assert max_relative_error(actual, expected) < TOLERANCE[dtype], tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_top6_of_128_experts(dtype):
    problem = random_problem(num_tokens=10, hidden=32, inter=16, num_experts=128, top_k=6, dtype=dtype)
    assert max_relative_error(fused_moe(**problem), moe_reference(**problem)) < TOLERANCE[dtype]


def test_expert_parallel_shards_add_up_to_all_experts():
    problem = random_problem(num_tokens=7, hidden=32, inter=16, num_experts=8, top_k=3, dtype=torch.float32)
    total = torch.zeros_like(problem["x"])
    for start in (0, 4):
        shard = problem | dict(w13=problem["w13"][start:start + 4], w2=problem["w2"][start:start + 4])
        part = fused_moe(**shard, expert_start=start)
        assert max_relative_error(part, moe_reference(**shard, expert_start=start)) < 1e-5
        total += part
    assert max_relative_error(total, moe_reference(**problem)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fp8_weight_only_matches_dequantized_weights(dtype):
    problem = random_problem(num_tokens=6, hidden=64, inter=32, num_experts=6, top_k=2, dtype=dtype, routable=4)
    w13, w13_scale = quantize_weight_per_channel(problem["w13"])
    w2, w2_scale = quantize_weight_per_channel(problem["w2"])
    assert w13.dtype == w2.dtype == torch.float8_e4m3fn and w13_scale.shape == (6, 64) and w2_scale.shape == (6, 64)
    quantized = problem | dict(w13=w13, w2=w2, w13_scale=w13_scale, w2_scale=w2_scale)
    actual = fused_moe(**quantized, quantize_activations=False)
    dequantized = problem | dict(w13=(w13.float() * w13_scale[:, :, None]).to(dtype),
                                 w2=(w2.float() * w2_scale[:, :, None]).to(dtype))
    assert max_relative_error(actual, moe_reference(**dequantized)) < TOLERANCE[dtype]
    # Quantization itself moved the output: the comparison above is against the 8-bit weights, not the originals.
    assert max_relative_error(actual, moe_reference(**problem)) > 1e-3


def test_fp8_w8a8_matches_per_token_quantized_reference():
    problem = random_problem(num_tokens=6, hidden=64, inter=32, num_experts=6, top_k=2, dtype=torch.float32)
    w13, w13_scale = quantize_weight_per_channel(problem["w13"])
    w2, w2_scale = quantize_weight_per_channel(problem["w2"])
    quantized = problem | dict(w13=w13, w2=w2, w13_scale=w13_scale, w2_scale=w2_scale)
    actual = fused_moe(**quantized, quantize_activations=True)
    assert max_relative_error(actual, moe_reference(**quantized, quantize_activations=True)) < 1e-2
    weight_only = moe_reference(**quantized)
    assert max_relative_error(actual, weight_only) > 1e-3  # the activations really went through 8 bits


@triton.jit
def _decode_e4m3_kernel(bits_ptr, out_ptr):
    codes = tl.arange(0, 256)
    tl.store(out_ptr + codes, e4m3_bits_to_scaled(tl.load(bits_ptr + codes), tl.float32) * 256.0)


def test_e4m3_bits_decode_to_every_value_exactly():
    bits = torch.arange(256, dtype=torch.uint8)
    decoded = torch.empty(256)
    _decode_e4m3_kernel[(1,)](bits, decoded)
    expected = bits.view(torch.float8_e4m3fn).float()
    finite = ~expected.isnan()  # 0x7f and 0xff are NaN in e4m3fn; weights never hold them
    assert finite.sum() == 254 and torch.equal(decoded[finite], expected[finite])


def test_quantize_per_token_scales_each_row_to_the_fp8_range():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [300.0, 10.0, -896.0]])
    quantized, scale = quantize_per_token(x)
    assert quantized.dtype == torch.float8_e4m3fn
    assert torch.allclose(scale, torch.tensor([2.0, 1e-12, 896.0]) / 448)
    assert quantized.float().abs().amax(dim=1).tolist() == [448.0, 0.0, 448.0]


def test_tile_config_grows_with_the_token_count():
    assert tile_config(1).block_m == 16 and tile_config(32).block_m == 16
    assert tile_config(8192).block_m > tile_config(256).block_m > tile_config(1).block_m


def test_self_check_passes_here_and_reports_a_wrong_kernel(monkeypatch):
    passed = check_fused_moe("cpu", torch.float32, fp8=True)
    assert passed.passed and passed.check == "check_fused_moe" and "fp8 weight-only" in passed.detail
    assert 0.0 <= passed.max_abs_diff < 1e-4
    real = fused_moe_module.fused_moe
    monkeypatch.setattr(fused_moe_module, "fused_moe", lambda *args, **kwargs: real(*args, **kwargs) * 1.01)
    failure = check_fused_moe("cpu", torch.float32)
    assert not failure.passed and "off by" in failure.detail and failure.max_abs_diff > 1e-4


def test_failed_self_check_refuses_explicit_triton_and_auto_falls_back(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(fused_moe_module, "fused_moe", broken)
    with pytest.raises(ValueError, match="--moe-backend triton: .*check_fused_moe.*no kernel image for this device"):
        resolve_moe_backend("triton", "cpu", torch.float32)
    monkeypatch.setattr(self_check_module, "check_fused_moe",
                        lambda *args, **kwargs: SelfCheckResult("check_fused_moe", False, "no kernel image"))
    with caplog.at_level(logging.WARNING, logger="model.backend_selection"):
        assert resolve_moe_backend("auto", "cuda", torch.float32).name == "torch"  # auto checks on CUDA only
    assert "check_fused_moe" in caplog.text and "using the torch MoE backend" in caplog.text
    assert resolve_moe_backend("auto", "cpu", torch.float32).name == "torch"
    with pytest.raises(ValueError, match="unknown MoE backend"):
        resolve_moe_backend("cutlass", "cpu", torch.float32)
