"""Where each of llama.cpp's dots1 tensor names goes in the engine's Dots1ForCausalLM, with its expected shape."""
from dataclasses import dataclass

from torch import nn

from model.dots1 import Dots1ForCausalLM
from model.linear import QuantizableProjection
from model.moe import Dots1MoE
from model.routed_experts import RoutedExperts


@dataclass(frozen=True)
class Destination:
    """``kind`` says how the tensor is stored:
    - "float": a high-precision parameter (norms, the router, its bias), dequantized if the file quantized it;
    - "projection": part ``part`` of a projection's stacked output rows (q/k/v, gate/up), kept quantized on the CPU;
    - "bias": part ``part`` of a projection's bias;
    - "experts": the ``part`` ("gate", "up" or "down") stack of a layer's routed experts;
    - "embedding": the token embedding or the LM head (``module``), rows looked up or multiplied.
    """

    kind: str
    shape: tuple[int, ...]
    module: nn.Module
    part: int | str = 0
    parameter: str = "weight"


def tensor_destinations(model: Dots1ForCausalLM) -> dict[str, Destination]:
    config = model.config
    hidden, vocab, head_dim = config.hidden_size, config.vocab_size, config.head_dim
    q_rows, kv_rows = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    places = {"token_embd.weight": Destination("embedding", (vocab, hidden), model.embed_tokens),
              "output_norm.weight": Destination("float", (hidden,), model.norm)}
    if not model.lm_head.tied:
        places["output.weight"] = Destination("embedding", (vocab, hidden), model.lm_head)
    for index, layer in enumerate(model.layers):
        attention = layer.self_attn
        block = f"blk.{index}"
        places |= {
            f"{block}.attn_norm.weight": Destination("float", (hidden,), layer.input_layernorm),
            f"{block}.ffn_norm.weight": Destination("float", (hidden,), layer.post_attention_layernorm),
            f"{block}.attn_q_norm.weight": Destination("float", (head_dim,), attention.q_norm),
            f"{block}.attn_k_norm.weight": Destination("float", (head_dim,), attention.k_norm),
            f"{block}.attn_output.weight": Destination("projection", (hidden, q_rows), attention.o_proj),
        }
        for part, (name, rows) in enumerate((("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows))):
            places[f"{block}.{name}.weight"] = Destination("projection", (rows, hidden), attention.qkv_proj, part)
            if config.attention_bias:
                places[f"{block}.{name}.bias"] = Destination("bias", (rows,), attention.qkv_proj, part)
        if config.attention_bias:
            places[f"{block}.attn_output.bias"] = Destination("bias", (hidden,), attention.o_proj)
        if isinstance(layer.mlp, Dots1MoE):
            places |= _moe_destinations(block, layer.mlp, hidden)
        else:
            places |= _mlp_destinations(block, "", layer.mlp.gate_up_proj, layer.mlp.down_proj,
                                        config.intermediate_size, hidden)
    return places


def _moe_destinations(block: str, moe: Dots1MoE, hidden: int) -> dict[str, Destination]:
    experts: RoutedExperts = moe.experts
    count, inter = experts.num_experts, experts.intermediate_size
    places = {
        f"{block}.ffn_gate_inp.weight": Destination("float", (count, hidden), moe.gate),
        f"{block}.exp_probs_b.bias": Destination("float", (count,), moe.gate, parameter="e_score_correction_bias"),
        f"{block}.ffn_gate_exps.weight": Destination("experts", (count, inter, hidden), experts, "gate"),
        f"{block}.ffn_up_exps.weight": Destination("experts", (count, inter, hidden), experts, "up"),
        f"{block}.ffn_down_exps.weight": Destination("experts", (count, hidden, inter), experts, "down"),
    }
    if moe.shared_experts is not None:
        shared = moe.shared_experts
        places |= _mlp_destinations(block, "_shexp", shared.gate_up_proj, shared.down_proj,
                                    shared.gate_up_proj.output_sizes[0], hidden)
    return places


def _mlp_destinations(block: str, suffix: str, gate_up: QuantizableProjection, down: QuantizableProjection,
                      inter: int, hidden: int) -> dict[str, Destination]:
    return {f"{block}.ffn_gate{suffix}.weight": Destination("projection", (inter, hidden), gate_up, 0),
            f"{block}.ffn_up{suffix}.weight": Destination("projection", (inter, hidden), gate_up, 1),
            f"{block}.ffn_down{suffix}.weight": Destination("projection", (hidden, inter), down, 0)}
