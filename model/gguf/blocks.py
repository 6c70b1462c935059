"""GGUF quantization blocks as integer codes with per-group scales and mins, in torch.

Every supported block type is the same idea: each group of 16 or 32 weights has a scale (and for some types a min),
and each weight an unsigned code: ``w = scale * (code - zero) - min``. This module splits the file's bytes into
those fields, computing scales and mins in float32 exactly as llama.cpp's reference (``gguf.quants``) does, so
``dequantize`` equals it bit for bit. ``to_codes`` hands the same fields to ``model.quant.packed`` with float16
scales and mins: exact for the 32-weight types (their scales and mins are float16 in the file), and rounded to
float16 (relative error at most 2^-11) for the K-quants, whose group scales are a float16 times a 6- or 8-bit integer.

Shapes: ``raw`` is uint8 [rows, row_bytes] with row_bytes = K / block_size * type_size; codes are uint8 [rows, K],
scales and mins [rows, K / group_size].
"""
from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


@dataclass
class BlockFields:
    codes: torch.Tensor  # uint8 [rows, K]
    scale: torch.Tensor  # float32 [rows, K / group_size]
    min: torch.Tensor | None  # float32 [rows, K / group_size], subtracted; None for symmetric types
    bits: int
    group_size: int
    zero: int


# (bits, group size, zero point, has min) of each quantized type.
LAYOUTS: dict[Q, tuple[int, int, int, bool]] = {
    Q.Q8_0: (8, 32, 128, False), Q.Q4_0: (4, 32, 8, False), Q.Q4_1: (4, 32, 0, True),
    Q.Q5_0: (5, 32, 16, False), Q.Q5_1: (5, 32, 0, True), Q.Q4_K: (4, 32, 0, True),
    Q.Q5_K: (5, 32, 0, True), Q.Q6_K: (6, 16, 32, False),
}


def row_elements(qtype: Q, row_bytes: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return row_bytes // type_size * block_size


def split_blocks(raw: torch.Tensor, qtype: Q) -> BlockFields:
    """The codes, float32 scales and mins of the blocks in ``raw`` (uint8 [rows, row_bytes])."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, type_size)  # [rows, B, type_size]
    bits, group, zero, _ = LAYOUTS[qtype]
    codes, scale, minimum = _SPLITTERS[qtype](blocks)
    return BlockFields(codes.reshape(rows, -1), scale.reshape(rows, -1),
                       None if minimum is None else minimum.reshape(rows, -1), bits, group, zero)


def dequantize(raw: torch.Tensor, qtype: Q) -> torch.Tensor:
    """float32 [rows, K] weights of ``raw``, bit for bit as ``gguf.quants.dequantize``."""
    if qtype in FLOAT_TYPES:
        return raw.view(FLOAT_TYPES[qtype]).float()
    fields = split_blocks(raw, qtype)
    rows, elements = fields.codes.shape
    groups = fields.scale.shape[1]
    codes = fields.codes.view(rows, groups, -1)
    if fields.zero:
        values = fields.scale[:, :, None] * (codes.to(torch.int16) - fields.zero).float()
    else:
        values = fields.scale[:, :, None] * codes.float()
    if fields.min is not None:
        values = values - fields.min[:, :, None]
    return values.reshape(rows, elements)


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """float32 [rows, B] from the float16 at byte ``start`` of each block."""
    return blocks[:, :, start:start + 2].contiguous().view(torch.float16)[..., 0].float()


def _nibbles_half_split(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] codes: low nibbles are codes 0-15, high nibbles codes 16-31 (Q4_0/Q5_0 order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[..., 4] bytes (a little-endian uint32) -> [..., 32] bits, bit i of the word first."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh[..., :, None] >> shifts) & 1).reshape(*qh.shape[:-1], 32)


def _q8_0(blocks: torch.Tensor):
    codes = (blocks[:, :, 2:34].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    return codes, _half(blocks, 0), None


def _q4_0(blocks: torch.Tensor):
    return _nibbles_half_split(blocks[:, :, 2:18]), _half(blocks, 0), None


def _q4_1(blocks: torch.Tensor):
    return _nibbles_half_split(blocks[:, :, 4:20]), _half(blocks, 0), -_half(blocks, 2)


def _q5_0(blocks: torch.Tensor):
    codes = _nibbles_half_split(blocks[:, :, 6:22]) | (_high_bits(blocks[:, :, 2:6]) << 4)
    return codes, _half(blocks, 0), None


def _q5_1(blocks: torch.Tensor):
    codes = _nibbles_half_split(blocks[:, :, 8:24]) | (_high_bits(blocks[:, :, 4:8]) << 4)
    return codes, _half(blocks, 0), -_half(blocks, 2)


def _k_scales_mins(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins [rows, B, 8] packed in bytes 4..16 of a Q4_K/Q5_K block."""
    packed = blocks[:, :, 4:16]
    low_scales, low_mins, extra = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = torch.cat([low_scales & 63, (extra & 0x0F) | ((low_scales >> 2) & 0x30)], dim=-1)
    mins = torch.cat([low_mins & 63, (extra >> 4) | ((low_mins >> 2) & 0x30)], dim=-1)
    return scales, mins


def _k_group_scale_min(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scales, mins = _k_scales_mins(blocks)
    return _half(blocks, 0)[..., None] * scales.float(), _half(blocks, 2)[..., None] * mins.float()


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[rows, B, 128] bytes -> [rows, B, 256] codes: 32-byte chunk c holds sub-block 2c (low) and 2c+1 (high)."""
    chunks = qs.reshape(*qs.shape[:2], 4, 1, 32)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=3).reshape(*qs.shape[:2], 256)


def _q4_k(blocks: torch.Tensor):
    scale, minimum = _k_group_scale_min(blocks)
    return _k_nibbles(blocks[:, :, 16:144]), scale, minimum


def _q5_k(blocks: torch.Tensor):
    scale, minimum = _k_group_scale_min(blocks)
    qh = blocks[:, :, 16:48]  # byte l: bit j is the fifth bit of weight l of sub-block j
    shifts = torch.arange(8, dtype=torch.uint8)
    high = ((qh[:, :, None, :] >> shifts[:, None]) & 1).reshape(*blocks.shape[:2], 256)  # [rows, B, j * 32 + l]
    return _k_nibbles(blocks[:, :, 48:176]) | (high << 4), scale, minimum


def _q6_k(blocks: torch.Tensor):
    rows, count = blocks.shape[:2]
    ql = blocks[:, :, 0:128].reshape(rows, count, 2, 1, 64)  # per half of 128 weights: 64 bytes of two nibbles
    low = torch.cat([ql & 0x0F, ql >> 4], dim=3).reshape(rows, count, 2, 4, 32)
    qh = blocks[:, :, 128:192].reshape(rows, count, 2, 1, 32)  # per half: byte l holds 2 bits of 4 weights
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]
    high = (qh >> shifts) & 3  # [rows, B, 2, 4, 32]
    codes = (low | (high << 4)).reshape(rows, count, 256)
    scales = blocks[:, :, 192:208].contiguous().view(torch.int8).float()  # [rows, B, 16]
    return codes, _half(blocks, 208)[..., None] * scales, None


_SPLITTERS = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q4_K: _q4_k,
              Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
