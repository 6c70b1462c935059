"""What dots.llm1.inst in a llama.cpp Q4_K_M file takes in memory here: llama.cpp's type choice for each tensor
(src/llama-quant.cpp, read for the dots1 architecture) and the bytes of each type in this engine's packed format."""
import re

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from model.config import ModelConfig
from model.dots1 import Dots1ForCausalLM
from model.gguf.blocks import FLOAT_TYPES, split_blocks
from model.gguf.tensor_map import tensor_destinations
from model.quant.packed import nbytes, pack

QK_K = 256
# llama.cpp's type when a 256-weight type does not divide a tensor's input size (tensor_type_fallback).
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def use_more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def q4_k_m_type(name: str, shape: tuple[int, ...], layers: int, attn_v_index: int) -> Q:
    """The type llama-quantize gives a dots1 tensor for Q4_K_M (128 experts, no imatrix)."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return Q.F32  # norms, the router and its bias are never quantized
    if name == "output.weight":
        wanted = Q.Q6_K
    elif name.endswith("attn_v.weight"):
        wanted = Q.Q6_K if use_more_bits(attn_v_index, layers) else Q.Q4_K
    elif re.search(r"ffn_down(_exps|_shexp)?\.weight$", name):
        layer = int(name.split(".")[1])
        wanted = Q.Q6_K if use_more_bits(layer, layers) else Q.Q4_K
    else:
        wanted = Q.Q4_K
    return _FALLBACK[wanted] if shape[-1] % QK_K else wanted


def packed_bits_per_weight(qtype: Q) -> float:
    """Bits per weight of ``qtype`` once packed for the CPU kernels (measured by packing one block row)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = torch.zeros(1, QK_K // block_size * type_size, dtype=torch.uint8)
    fields = split_blocks(raw, qtype)
    packed = pack(fields.codes, fields.scale.half(), None if fields.min is None else fields.min.half(),
                  bits=fields.bits, group_size=fields.group_size, zero=fields.zero)
    return nbytes(packed) * 8 / QK_K


def q4_k_m_plan(config: ModelConfig, dtype: torch.dtype) -> dict[str, float]:
    """Bytes per type of dots.llm1 from a Q4_K_M file in this engine, and the file's own bytes ("file")."""
    with torch.device("meta"):
        model = Dots1ForCausalLM(config, dtype=dtype)
    totals: dict[str, float] = {"file": 0.0}
    attn_v_index = 0
    for name, destination in tensor_destinations(model).items():
        qtype = q4_k_m_type(name, destination.shape, config.num_hidden_layers, attn_v_index)
        attn_v_index += name.endswith("attn_v.weight")
        elements = torch.Size(destination.shape).numel()
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        totals["file"] += elements // block_size * type_size
        if qtype in FLOAT_TYPES:  # kept float: the router in float32, the rest in the model dtype
            size = 4 if name.endswith("ffn_gate_inp.weight") or name.endswith("exp_probs_b.bias") else dtype.itemsize
            totals["float"] = totals.get("float", 0.0) + elements * size
        else:
            totals[qtype.name] = totals.get(qtype.name, 0.0) + elements * packed_bits_per_weight(qtype) / 8
    return totals
