"""The packed integer weight format of the CPU quantized kernels.

value[..., n, k] = float(scale[..., n, k // G]) * (code[..., n, k] - zero) - float(min[..., n, k // G])

Codes are stored per 32-weight chunk so a kernel expands one chunk into 32 bytes with a few instructions:
- ``lo`` uint8: bits 4/5/6: [..., N, K // 2], each chunk 16 bytes, byte j = code j (low nibble) and code j + 16
  (high nibble), low 4 bits of each code; bits 8: [..., N, K], the codes themselves.
- ``hi`` uint8, bits 5/6 only: [..., N, K // 32 * 4 * (bits - 4)], per chunk (bits - 4) little-endian uint32 bit
  planes: bit j of plane p is bit 4 + p of code j.
- ``scale`` / ``min`` float16 [..., N, K // G]; ``min`` None means 0. ``zero`` is one integer for the whole tensor.
The leading ``...`` is empty for a linear layer and [E] for a stack of experts.
"""
from dataclasses import dataclass, replace

import torch

BITS = (4, 5, 6, 8)
GROUP_SIZES = (16, 32)
CHUNK = 32
_PACK_CODES_PER_STEP = 1 << 24  # codes handled per step of pack/unpack, bounding their temporary memory
_BYTE_BITS = 1 << torch.arange(8, dtype=torch.uint8)  # [8] weight of bit b in a byte


@dataclass
class PackedQuantWeight:
    bits: int
    group_size: int
    zero: int
    lo: torch.Tensor  # uint8 [..., N, K // 2] (bits 8: [..., N, K])
    hi: torch.Tensor | None  # uint8 [..., N, K // 32 * 4 * (bits - 4)], bits 5 and 6 only
    scale: torch.Tensor  # float16 [..., N, K // group_size]
    min: torch.Tensor | None  # float16 [..., N, K // group_size] or None

    @property
    def shape(self) -> tuple[int, ...]:
        """[..., N, K], the shape of the dequantized weight."""
        return (*self.scale.shape[:-1], self.scale.shape[-1] * self.group_size)

    def to(self, device: torch.device | str) -> "PackedQuantWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, lo=move(self.lo), hi=move(self.hi), scale=move(self.scale), min=move(self.min))

    def __getitem__(self, index) -> "PackedQuantWeight":
        """Indexes the leading dims (experts of a stack, rows of a matrix) of every field alike."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return replace(self, lo=pick(self.lo), hi=pick(self.hi), scale=pick(self.scale), min=pick(self.min))


def _check_format(bits: int, group_size: int, k: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if k % CHUNK:
        raise ValueError(f"the input dimension K ({k}) must be a multiple of {CHUNK}")


def _row_slices(rows: int, k: int) -> list[slice]:
    step = max(1, _PACK_CODES_PER_STEP // k)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _pack_rows(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """codes uint8 [R, K] -> (lo [R, K // 2], hi [R, K // 32 * 4 * (bits - 4)] or None)."""
    rows, k = codes.shape
    chunks = codes.view(rows, k // CHUNK, 2, 16)
    lo = (chunks[:, :, 0] & 15) | ((chunks[:, :, 1] & 15) << 4)  # [R, C, 16]
    if bits == 4:
        return lo.reshape(rows, k // 2), None
    planes = [((chunks.reshape(rows, k // CHUNK, 4, 8) >> (4 + p)) & 1) for p in range(bits - 4)]
    hi = torch.stack([(plane * _BYTE_BITS).sum(-1, dtype=torch.uint8) for plane in planes], dim=2)  # [R, C, P, 4]
    return lo.reshape(rows, k // 2), hi.reshape(rows, -1)


def _unpack_rows(lo: torch.Tensor, hi: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Inverse of ``_pack_rows``: uint8 codes [R, K]."""
    rows, k = lo.shape[0], lo.shape[1] * 2
    nibbles = lo.view(rows, k // CHUNK, 1, 16)
    codes = torch.cat([nibbles & 15, nibbles >> 4], dim=2).reshape(rows, k // CHUNK, 4, 8)
    if hi is not None:
        planes = hi.view(rows, k // CHUNK, bits - 4, 4, 1)
        for p in range(bits - 4):
            codes |= ((planes[:, :, p] & _BYTE_BITS) != 0).to(torch.uint8) << (4 + p)
    return codes.reshape(rows, k)


def pack(codes: torch.Tensor, scale: torch.Tensor, min: torch.Tensor | None = None, *, bits: int, group_size: int,
         zero: int) -> PackedQuantWeight:
    """codes uint8 [..., N, K] (each < 2**bits), scale/min [..., N, K // group_size] -> the packed weight."""
    k = codes.shape[-1]
    _check_format(bits, group_size, k)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if scale.shape != (*codes.shape[:-1], k // group_size):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match codes {tuple(codes.shape)} / {group_size}")
    scale = scale.to(torch.float16).contiguous()
    min = None if min is None else min.to(torch.float16).contiguous().view(scale.shape)
    if bits == 8:
        return PackedQuantWeight(bits, group_size, zero, codes.contiguous(), None, scale, min)
    flat = codes.reshape(-1, k)
    lo = torch.empty(flat.shape[0], k // 2, dtype=torch.uint8)
    hi = torch.empty(flat.shape[0], k // CHUNK * 4 * (bits - 4), dtype=torch.uint8) if bits > 4 else None
    for rows in _row_slices(flat.shape[0], k):
        lo[rows], part_hi = _pack_rows(flat[rows].contiguous(), bits)
        if hi is not None:
            hi[rows] = part_hi
    lead = codes.shape[:-1]
    return PackedQuantWeight(bits, group_size, zero, lo.view(*lead, k // 2),
                             None if hi is None else hi.view(*lead, -1), scale, min)


def unpack_codes(w: PackedQuantWeight) -> torch.Tensor:
    """uint8 codes [..., N, K]."""
    if w.bits == 8:
        return w.lo.clone()
    *lead, half = w.lo.shape
    lo = w.lo.reshape(-1, half)
    hi = None if w.hi is None else w.hi.reshape(lo.shape[0], -1)
    codes = torch.empty(lo.shape[0], half * 2, dtype=torch.uint8)
    for rows in _row_slices(lo.shape[0], half * 2):
        codes[rows] = _unpack_rows(lo[rows], None if hi is None else hi[rows], w.bits)
    return codes.view(*lead, half * 2)


def dequantize(w: PackedQuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: [..., N, K] = scale * (code - zero) - min, computed in float32."""
    codes = unpack_codes(w).float() - w.zero
    value = codes * w.scale.float().repeat_interleave(w.group_size, dim=-1)
    if w.min is not None:
        value -= w.min.float().repeat_interleave(w.group_size, dim=-1)
    return value.to(dtype)


def dequantize_rows(w: PackedQuantWeight, rows: torch.Tensor) -> torch.Tensor:
    """Rows of a 2-D weight (an embedding lookup): float32 [*rows.shape, K]."""
    flat = rows.reshape(-1)
    return dequantize(w[flat]).view(*rows.shape, -1)


def nbytes(w: PackedQuantWeight) -> int:
    return sum(t.numel() * t.element_size() for t in (w.lo, w.hi, w.scale, w.min) if t is not None)


def describe(w: PackedQuantWeight) -> str:
    """e.g. "4-bit g32 +min", "8-bit g32 zero 128"."""
    offset = " +min" if w.min is not None else (f" zero {w.zero}" if w.zero else "")
    return f"{w.bits}-bit g{w.group_size}{offset}"
