"""--quantization int8|int4 on a safetensors checkpoint, and split GGUF sets: packed weights for the CPU kernels."""
from pathlib import Path

import pytest
import torch
from gguf_checkpoints import hf_to_gguf
from paged_runner import PagedRunner

from model.embedded import EMBEDDED_MODEL_DIR
from model.loader import load_model, weight_breakdown, weight_summary
from model.quant.online import quantize_int4, quantize_int8
from model.quant.packed import dequantize
from scheduler.model_runner import ModelExecutor
from server.cli import engine_config, parse_args

PROMPT = [4093, 40, 300, 12, 77, 900, 1500, 20, 4094]


@pytest.mark.parametrize("quantize, bits_per_weight", [(quantize_int8, 8.5), (quantize_int4, 5.0)])
def test_online_quantization_error_is_half_a_step(quantize, bits_per_weight: float) -> None:
    """Codes round to nearest against the stored float16 scale (and min): every weight within half a step of the
    grid, plus the float16 rounding of the min."""
    weight = torch.randn(2, 96, 160) * torch.linspace(0.01, 1.0, 160)  # [E, N, K], groups of unequal ranges
    packed = quantize(weight)
    error = (dequantize(packed) - weight).abs().view(2, 96, 5, 32)
    step = packed.scale.float()[..., None]
    slack = 0 if packed.min is None else packed.min.float().abs()[..., None] * 2.0 ** -11
    assert (error <= step / 2 * 1.0001 + slack + 1e-7).all()
    assert packed.shape == (2, 96, 160)
    assert sum(t.numel() * t.element_size() for t in (packed.lo, packed.hi, packed.scale, packed.min)
               if t is not None) * 8 == bits_per_weight * weight.numel()


def plain(weight: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(weight, requires_grad=False)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_embedded_model_stays_close_to_its_dequantized_weights(method: str) -> None:
    quantized = load_model(EMBEDDED_MODEL_DIR, dtype=torch.float32, device="cpu", quantization=method)
    full = load_model(EMBEDDED_MODEL_DIR, dtype=torch.float32, device="cpu")
    assert weight_summary(quantized)[0] == f"{method}+float32"
    assert set(weight_breakdown(quantized)) == {method, "float32"}
    assert weight_summary(quantized)[1] < weight_summary(full)[1] * (0.45 if method == "int8" else 0.35)
    # The same model with every packed matrix dequantized back into plain float weights.
    reference = load_model(EMBEDDED_MODEL_DIR, dtype=torch.float32, device="cpu")
    originals = dict(reference.named_modules())
    replaced = 0
    for name, module in quantized.named_modules():
        original = originals[name]
        if getattr(module, "quant_parts", None) is not None:
            original.weight = plain(torch.cat([dequantize(part) for part in module.quant_parts]))
        elif getattr(module, "quantized", None) is not None:
            stacks = {part: dequantize(stack) for part, stack in module.quantized.items()}
            del original.w13, original.w2
            original.w13 = plain(torch.cat([stacks["gate"], stacks["up"]], dim=1))
            original.w2 = plain(stacks["down"])
            original.min_rows = 1
        elif name == "lm_head" and module.quant is not None:
            original.weight = plain(dequantize(module.quant))
        else:
            continue
        replaced += 1
    # Dense layer 0: qkv, o, gate_up, down; MoE layers 1-3: qkv, o, the expert stacks, the shared gate_up and down;
    # and the LM head.
    assert replaced == 4 + 3 * 5 + 1, replaced
    sequence = PROMPT + list(range(500, 530))
    expected = PagedRunner(reference).step({0: sequence}, all_logits=True)[0]
    got = PagedRunner(quantized).step({0: sequence}, all_logits=True)[0]
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    expected_logprobs, got_logprobs = torch.log_softmax(expected, -1), torch.log_softmax(got, -1)
    kl = (expected_logprobs.exp() * (expected_logprobs - got_logprobs)).sum(-1).mean().item()
    assert agreement >= 0.9 and kl <= 0.01, (agreement, kl)


def test_quantization_flag_reaches_the_executor() -> None:
    config = engine_config(parse_args(["--quantization", "int4", "--device", "cpu", "--dtype", "float32",
                                       "--kv-cache-memory", "4MiB"]))
    executor = ModelExecutor(config)
    try:
        assert executor.weight_dtype == "int4+float32"
    finally:
        executor.shutdown()


def test_a_split_gguf_set_loads_from_its_first_file(tmp_path: Path) -> None:
    hf_to_gguf.write_dots1_gguf(EMBEDDED_MODEL_DIR, tmp_path / "whole.gguf", "Q8_0")
    hf_to_gguf.write_dots1_gguf(EMBEDDED_MODEL_DIR, tmp_path / "split.gguf", "Q8_0", split_max_tensors=25)
    shards = sorted(path.name for path in tmp_path.glob("split-*.gguf"))
    assert shards == ["split-00001-of-00003.gguf", "split-00002-of-00003.gguf", "split-00003-of-00003.gguf"]
    whole = load_model(tmp_path / "whole.gguf", dtype=torch.float32, device="cpu")
    split = load_model(tmp_path / shards[0], dtype=torch.float32, device="cpu")
    assert torch.equal(PagedRunner(split).step({0: PROMPT}, all_logits=True)[0],
                       PagedRunner(whole).step({0: PROMPT}, all_logits=True)[0])
    with pytest.raises(ValueError, match="give the first file of a split GGUF set"):
        load_model(tmp_path / shards[1], dtype=torch.float32, device="cpu")
    (tmp_path / shards[2]).unlink()
    with pytest.raises(FileNotFoundError, match="split GGUF set of 3 files is missing"):
        load_model(tmp_path / shards[0], dtype=torch.float32, device="cpu")
