"""float8_e4m3fn weights read as raw bytes and widened with integer ops, on any GPU (and the interpreter).

Native fp8 conversions need CUDA compute capability 8.9; the weight-only path also serves older cards. The bits of an
e4m3 value (sign, 4 exponent bits with bias 7, 3 mantissa bits), moved into the same places of an fp16 (bias 15),
give the value times 2**-8 exactly, subnormals included; the kernels fold the 2**8 into the per-channel scale.
"""
import triton
import triton.language as tl

E4M3_AS_FP16_FACTOR = tl.constexpr(256.0)  # the fp16 reading of e4m3 bits is value / 256


@triton.jit
def e4m3_bits_to_scaled(bits, dtype: tl.constexpr):
    """uint8 e4m3 bits -> value / 256 in ``dtype`` (exact for fp16, bf16 and fp32)."""
    wide = bits.to(tl.uint16)
    fp16_bits = ((wide & 0x80) << 8) | ((wide & 0x7F) << 7)
    return fp16_bits.to(tl.float16, bitcast=True).to(dtype)
