"""The C++ CPU quantized kernels (model.kernels.cpu) against the dequantized reference, on every SIMD path.

Error bound of qlinear: activations are quantized per 32-block to int8 with d = max|x_b| / 127, so each x_i moves by
at most d / 2 (round to nearest), a uniform error of standard deviation d / sqrt(12) ≈ 0.0023 max|x_b|. For Gaussian
x, max|x_b| ≈ 2.2 sigma_x over 32 values, so the error of y = sum_i w_i x_i has about 0.5% of y's standard deviation
(the errors are independent, like the products), and its largest value over a few thousand outputs about 4 times that.
Integer dots and the scale corrections are exact up to float32 rounding. Weights with a large mean (zero points, mins)
share one error term mean(w) * sum_i e_i across a row of outputs, so for M = 1 the mean error is a single draw of that
0.5% ratio. Asserted: max |err| <= 2e-2 * max |ref| and mean |err| <= 2e-2 * mean |ref| (observed up to 0.7% and 1.4%).
qmoe quantizes twice (x, then silu(g) * u, whose heavier tails give coarser blocks): the same bounds (observed 1.1%).
For a bfloat16 x of 16 rows or more, on CPUs with AVX-512 BF16, qlinear dequantizes the weight to bfloat16 and runs
oneDNN instead: the weight is rounded to bfloat16 (relative error <= 2^-9 per weight), within the same bounds, and
the bfloat16 result is within its own rounding (2^-8 relative) of the product with the rounded weight.
Beyond those bounds, each int8 qlinear result equals the reference computed from fake-quantized activations (the same int8
rounding done in torch) to 1e-4 relative: only float32 summation order differs, so the SIMD paths agree with each other
too. For qmoe that holds up to a few intermediate codes one step apart (torch's silu differs in the last bit).
"""
import pytest
import torch
import torch.nn.functional as F

from model.kernels.cpu.extension import load
from model.kernels.cpu.qlinear import qlinear, qlinear_shared_input, weight_args
from model.kernels.cpu.qmoe import qmoe
from model.quant.packed import PackedQuantWeight, dequantize, dequantize_rows, describe, pack, unpack_codes

FORMATS = {  # name: (bits, group_size, zero, has_min)
    "Q8_0": (8, 32, 128, False),
    "Q4_0": (4, 32, 8, False),
    "Q4_K": (4, 32, 0, True),
    "Q5_0": (5, 32, 16, False),
    "Q5_K": (5, 32, 0, True),
    "Q6_K": (6, 16, 32, False),
}
ISAS = ["avx512", "avx2", "scalar"]


@pytest.fixture(params=ISAS)
def isa(request):
    module = load()
    wanted = request.param
    if ISAS.index(module.best_isa()) > ISAS.index(wanted):
        pytest.skip(f"this CPU has no {wanted}")
    module.set_isa(wanted)
    yield wanted
    module.set_isa(module.best_isa())


def random_weight(shape: tuple[int, ...], name: str, seed: int) -> PackedQuantWeight:
    bits, group, zero, has_min = FORMATS[name]
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, shape, generator=gen, dtype=torch.uint8)
    groups = (*shape[:-1], shape[-1] // group)
    scale = (torch.rand(groups, generator=gen) * 0.02 + 0.005).half()
    minimum = (torch.rand(groups, generator=gen) * 0.1).half() if has_min else None
    return pack(codes, scale, minimum, bits=bits, group_size=group, zero=zero)


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernels quantize activations: int8 per 32-block, d = max|x| / 127, float32 result."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.full_like(amax, 127).div(amax)  # as the kernel divides (127 / tensor would take a reciprocal)
    codes = torch.round(blocks * torch.where(amax > 0, inverse, 0))
    return (codes * (amax / 127)).reshape(x.shape)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, max_bound: float, mean_bound: float) -> None:
    """max |err| <= max_bound * max |expected| and mean |err| <= mean_bound * mean |expected|."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    err, size = (actual - expected).abs(), expected.abs()
    assert err.max() <= max_bound * size.max(), f"max err {err.max():.3g}, max |ref| {size.max():.3g}"
    assert err.mean() <= mean_bound * size.mean(), f"mean err {err.mean():.3g}, mean |ref| {size.mean():.3g}"


@pytest.mark.parametrize("name", FORMATS)
def test_pack_round_trips_codes(name):
    bits, group, zero, has_min = FORMATS[name]
    codes = torch.randint(0, 2 ** bits, (3, 40, 160), dtype=torch.uint8)
    scale = torch.rand(3, 40, 160 // group).half()
    w = pack(codes, scale, scale if has_min else None, bits=bits, group_size=group, zero=zero)
    assert torch.equal(unpack_codes(w), codes)
    assert torch.equal(unpack_codes(w[1]), codes[1])
    reference = (codes.float() - zero) * scale.float().repeat_interleave(group, -1)
    if has_min:
        reference -= scale.float().repeat_interleave(group, -1)
    assert torch.equal(dequantize(w), reference)
    rows = torch.tensor([[5, 0], [39, 5]])
    assert torch.equal(dequantize_rows(w[2], rows), reference[2][rows])
    assert describe(w).startswith(f"{bits}-bit g{group}")


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("n,k", [(96, 256), (1000, 160)])
def test_qlinear_matches_dequantized_matmul(isa, name, n, k):
    w = random_weight((n, k), name, seed=n + k)
    reference_weight = dequantize(w)
    gen = torch.Generator().manual_seed(k)
    for m in (1, 5, 200):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k, generator=gen).to(dtype)
            y = qlinear(x, w)
            assert_within(y, x.float() @ reference_weight.T, 2e-2, 2e-2)
            if dtype == torch.bfloat16 and load().prefers_bf16_gemm(m):
                rounded = x.float() @ reference_weight.bfloat16().float().T
                assert_within(y, rounded, 2 ** -8, 2 ** -9)  # the result is rounded to bfloat16
            else:
                assert_within(y, fake_quantize(x) @ reference_weight.T, 1e-4, 1e-4)


@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_bf16_rounds_the_reference(isa, name):
    w = random_weight((40, 160), name, seed=7)
    tensors, fmt = weight_args(w)
    assert torch.equal(load().dequantize_bf16(tensors, fmt), dequantize(w).bfloat16())


def test_isa_paths_agree():
    module = load()
    w = random_weight((64, 512), "Q6_K", seed=3)
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(0))
    outputs = []
    for name in ISAS[ISAS.index(module.best_isa()):]:
        module.set_isa(name)
        outputs.append(qlinear(x, w))
    module.set_isa(module.best_isa())
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], rtol=1e-4, atol=1e-4 * outputs[0].abs().max().item())


def test_shared_input_matches_separate_calls(isa):
    ws = [random_weight((96, 256), "Q4_K", 1), random_weight((32, 256), "Q8_0", 2), random_weight((64, 256), "Q6_K", 3)]
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    for y, w in zip(qlinear_shared_input(x, ws), ws):
        assert torch.equal(y, qlinear(x, w))


def reference_moe(x, ids, weights, gate, up, down, expert_start, rounding=lambda v: v.float()):
    """The plain loop over dequantized experts; ``rounding`` applied to each matmul's input."""
    gate_w, up_w, down_w = dequantize(gate), dequantize(up), dequantize(down)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) - expert_start
            if 0 <= e < gate_w.shape[0]:
                xt = rounding(x[t])
                h = F.silu(gate_w[e] @ xt) * (up_w[e] @ xt)
                out[t] += weights[t, j] * (down_w[e] @ rounding(h))
    return out


MOE_FORMATS = [("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q5_0", "Q4_0"), ("Q6_K", "Q5_K", "Q8_0")]


@pytest.mark.parametrize("formats", MOE_FORMATS)
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_qmoe_matches_expert_loop(isa, formats, tokens):
    experts, hidden, inter, k, expert_start = 6, 256, 160, 3, 4
    gate = random_weight((experts, inter, hidden), formats[0], 1)
    up = random_weight((experts, inter, hidden), formats[1], 2)
    down = random_weight((experts, hidden, inter), formats[2], 3)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.randint(0, 12, (tokens, k), generator=gen)  # 4..9 local; the others another rank's
    ids[:, 0] = expert_start + 1  # every token reaches a local expert
    ids[ids == expert_start + 3] = expert_start + 2  # local expert 3 gets no pairs
    weights = torch.rand(tokens, k, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        y = qmoe(xd, ids, weights, gate, up, down, expert_start)
        assert_within(y, reference_moe(xd, ids, weights, gate, up, down, expert_start), 2e-2, 2e-2)
        if dtype == torch.bfloat16 and load().prefers_bf16_gemm(tokens):
            continue  # local expert 1 (all tokens) and maybe others ran in bfloat16 through oneDNN: bounds as qlinear's
        # torch's silu rounds differently in the last bit, so a few intermediate codes may land one step apart
        assert_within(y, reference_moe(xd, ids, weights, gate, up, down, expert_start, fake_quantize), 5e-3, 5e-4)


def test_qmoe_without_local_pairs_is_zero():
    w = random_weight((2, 32, 64), "Q4_0", 1)
    down = random_weight((2, 64, 32), "Q4_0", 2)
    out = qmoe(torch.randn(3, 64), torch.full((3, 2), 7), torch.ones(3, 2), w, w, down, expert_start=0)
    assert torch.equal(out, torch.zeros(3, 64))
