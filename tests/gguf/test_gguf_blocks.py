"""GGUF blocks: dequantization bit for bit as llama.cpp's reference (gguf.quants), and their packed form's error."""
import gguf
import numpy as np
import pytest
import torch

from model.gguf.blocks import LAYOUTS, dequantize, split_blocks
from model.quant.packed import dequantize as dequantize_packed
from model.quant.packed import pack

Q = gguf.GGMLQuantizationType
# Byte offsets of each type's float16 fields (d, and dmin or m where there is one).
HALF_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2),
               Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# Types whose group scales and mins are float16 in the file: their packed form is exact.
EXACT_WHEN_PACKED = {Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}


def random_blocks(qtype: Q, rows: int, blocks_per_row: int, seed: int, finite: bool = True) -> np.ndarray:
    """Random bytes for every code, scale and bit plane; with ``finite``, the float16 fields hold weight-sized
    values (a file's), else raw bytes (NaN and infinity included)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, type_size), dtype=np.uint8)
    if finite:
        for start in HALF_FIELDS[qtype]:
            values = (rng.standard_normal((rows, blocks_per_row)) * 0.01).astype(np.float16)
            raw[:, :, start:start + 2] = values.view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, blocks_per_row * type_size)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))).all())


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda t: t.name)
@pytest.mark.parametrize("finite", [True, False], ids=["file-like", "raw-bytes"])
def test_dequantization_equals_the_reference_bit_for_bit(qtype: Q, finite: bool) -> None:
    raw = random_blocks(qtype, rows=13, blocks_per_row=3, seed=int(qtype), finite=finite)
    with np.errstate(invalid="ignore", over="ignore"):  # raw bytes include infinite and NaN scales
        reference = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(torch.from_numpy(raw), qtype).numpy()
    assert ours.shape == reference.shape
    assert same_bits(ours, reference)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda t: t.name)
def test_float_types_read_as_the_reference(qtype: Q) -> None:
    values = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    raw_bytes = np.ascontiguousarray(raw).view(np.uint8).reshape(5, -1)
    assert same_bits(dequantize(torch.from_numpy(raw_bytes), qtype).numpy(), gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda t: t.name)
def test_packed_form_is_exact_or_within_float16_scale_rounding(qtype: Q) -> None:
    """The 32-weight types keep their float16 scales: exact. K-quant group scales (a float16 times a 6- or 8-bit
    integer) and mins are rounded to float16, a relative error of at most 2^-11 each on the two terms."""
    raw = torch.from_numpy(random_blocks(qtype, rows=17, blocks_per_row=2, seed=100 + int(qtype)))
    reference = dequantize(raw, qtype)
    fields = split_blocks(raw, qtype)
    bits, group_size, zero, has_min = LAYOUTS[qtype]
    assert (fields.bits, fields.group_size, fields.zero, fields.min is not None) == (bits, group_size, zero, has_min)
    assert int(fields.codes.max()) < 2 ** bits
    packed = pack(fields.codes, fields.scale.half(), None if fields.min is None else fields.min.half(),
                  bits=bits, group_size=group_size, zero=zero)
    ours = dequantize_packed(packed)
    if qtype in EXACT_WHEN_PACKED:
        assert torch.equal(ours, reference)
        return
    scaled = (fields.scale.repeat_interleave(group_size, -1) * (fields.codes.float() - zero)).abs()
    minimum = 0 if fields.min is None else fields.min.repeat_interleave(group_size, -1).abs()
    bound = 2.0 ** -11 * (scaled + minimum) + 1e-12
    assert ((ours - reference).abs() <= bound).all()
    assert not torch.equal(ours, reference)  # the rounding is real, so the bound above is what is tested
