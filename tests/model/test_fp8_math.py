"""The FP8 matmuls: per-row quantization, weight-only tiles (exact in float32), W8A8 through torch._scaled_mm (the
CPU build runs it too), and the fail-safe fallback when the fast path fails its self-check."""
import logging

import pytest
import torch
import torch.nn.functional as F

import model.fp8 as fp8
from model.fp8 import dequantize, quantize_per_token, quantize_rows, supports_w8a8, w8a8_linear, weight_only_linear


def test_rows_quantize_to_their_own_scale():
    weight = torch.randn(6, 40) * torch.arange(1, 7)[:, None]
    weight[2] = 0  # a zero row keeps a usable scale
    quantized, scale = quantize_rows(weight)
    assert quantized.dtype == torch.float8_e4m3fn and scale.shape == (6,)
    assert torch.equal(scale[[0, 1, 3]], weight[[0, 1, 3]].abs().amax(dim=1) / 448)
    assert quantized.float().abs().amax(dim=1)[[0, 1, 3]].eq(448).all()
    restored = dequantize(quantized, scale, torch.float32)
    assert torch.equal(restored[2], torch.zeros(40))
    assert ((restored - weight).abs() <= weight.abs().amax(dim=1, keepdim=True) / 16).all()  # 3 mantissa bits


def test_weight_only_gives_exactly_the_dequantized_product():
    x, bias = torch.randn(7, 40), torch.randn(10)
    quantized, scale = quantize_rows(torch.randn(10, 40))
    expected = F.linear(x, quantized.float() * scale[:, None], bias)
    assert torch.equal(weight_only_linear(x, quantized, scale, bias), expected)


@pytest.mark.parametrize("tile_elements", [3 * 40, 1], ids=["three_rows", "one_row"])
def test_weight_only_tiles_of_a_large_weight(monkeypatch, tile_elements):
    """Each tile's values are exact; the BLAS may block a narrower matmul differently, so sums can differ in the
    last bit."""
    monkeypatch.setattr(fp8, "TILE_ELEMENTS", tile_elements)
    x, bias = torch.randn(7, 40), torch.randn(10)
    quantized, scale = quantize_rows(torch.randn(10, 40))
    expected = F.linear(x, quantized.float() * scale[:, None], bias)
    torch.testing.assert_close(weight_only_linear(x, quantized, scale, bias), expected, rtol=1e-6, atol=1e-5)


def test_w8a8_is_the_product_of_per_token_and_per_channel_quantized_operands():
    x = (torch.randn(9, 64) * torch.linspace(0.1, 10, 9)[:, None]).to(torch.bfloat16)
    quantized, scale = quantize_rows(torch.randn(48, 64))
    x_q, x_scale = quantize_per_token(x)
    assert x_scale.shape == (9, 1)
    expected = (x_q.float() * x_scale) @ (quantized.float() * scale[:, None]).t()
    actual = w8a8_linear(x, quantized, scale[None, :])
    assert actual.dtype == torch.bfloat16
    assert ((actual.float() - expected).abs() <= expected.abs() / 128 + 1e-3).all()  # bfloat16 rounding of the output
    exact = x.float() @ dequantize(quantized, scale, torch.float32).t()
    assert (actual.float() - exact).norm() / exact.norm() < 0.05


def test_w8a8_only_on_cuda_8_9_in_bfloat16_with_aligned_shapes():
    assert not supports_w8a8(torch.device("cpu"), torch.bfloat16, 64, 64)


def test_a_failing_fast_path_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(fp8, "_w8a8_checks", {})
    passed = fp8.logged_w8a8_check(torch.device("cpu"))  # the real _scaled_mm passes its check
    assert passed.passed and passed.check == "check_w8a8" and "relative error" in passed.detail

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(torch, "_scaled_mm", broken)
    assert fp8.logged_w8a8_check(torch.device("cpu")) is passed  # once per device and process
    with caplog.at_level(logging.WARNING, logger="model.fp8"):
        failed = fp8.logged_w8a8_check(torch.device("cpu", 1))
    assert not failed.passed and failed.detail == "RuntimeError: no kernel image is available"
    assert "failed its self-check" in caplog.text and "no kernel image" in caplog.text


def test_weight_only_in_bfloat16_scales_the_output_of_the_widened_weight():
    x = torch.randn(7, 40)
    quantized, scale = quantize_rows(torch.randn(10, 40) * 1e-3)
    exact = F.linear(x, dequantize(quantized, scale, torch.float32))
    actual = weight_only_linear(x.to(torch.bfloat16), quantized, scale).float()
    assert ((actual - exact).norm() / exact.norm()).item() < 1e-2
