"""compressed-tensors quantization_config: the FP8 schemes this engine runs, and a named refusal for the rest."""
import copy

import pytest

from model.quantization import parse_quantization_config
from test_config_revisions import FP8_BLOCK


def changed(path: str, value) -> dict:
    """FP8_BLOCK with the value at ``path`` ("a.b.c") replaced."""
    block = copy.deepcopy(FP8_BLOCK)
    *parents, last = path.split(".")
    node = block
    for key in parents:
        node = node[key]
    node[last] = value
    return block


GROUP = "config_groups.group_0"


def test_fp8_dynamic_and_weight_only_and_per_tensor():
    dynamic = parse_quantization_config(FP8_BLOCK)
    assert (dynamic.weight_strategy, dynamic.dynamic_activations) == ("channel", True)
    weight_only = parse_quantization_config(changed(f"{GROUP}.input_activations", None))
    assert not weight_only.dynamic_activations
    per_tensor = parse_quantization_config(changed(f"{GROUP}.weights.strategy", "tensor"))
    assert per_tensor.weight_strategy == "tensor"


def test_ignore_names_and_patterns_and_regex_targets():
    scheme = parse_quantization_config(changed("ignore", ["lm_head", "model.layers.0.self_attn.o_proj",
                                                          "re:.*shared_experts.*"]))
    assert not scheme.quantizes("model.layers.0.self_attn.o_proj")
    assert scheme.quantizes("model.layers.1.self_attn.o_proj")
    assert not scheme.quantizes("model.layers.4.mlp.shared_experts.up_proj")
    assert scheme.quantizes("model.layers.4.mlp.experts.0.up_proj")
    only_experts = parse_quantization_config(changed(f"{GROUP}.targets", ["re:.*mlp.experts.*"]))
    assert only_experts.quantizes("model.layers.4.mlp.experts.0.up_proj")
    assert not only_experts.quantizes("model.layers.4.self_attn.q_proj")


REFUSED = {
    "unknown_method": ({**FP8_BLOCK, "quant_method": "awq"}, "quant_method 'awq' is not supported"),
    "fp8_method": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "quant_method 'fp8' is not supported"),
    "int4_packing": ({**FP8_BLOCK, "format": "pack-quantized"}, r"format 'pack-quantized' \(int4/int8 weights packed"),
    "int4_weights": (changed(f"{GROUP}.weights", {**FP8_BLOCK["config_groups"]["group_0"]["weights"],
                                                  "num_bits": 4, "type": "int"}), "4-bit 'int' is not supported"),
    "static_activations": (changed(f"{GROUP}.input_activations.dynamic", False),
                           "static activation scales are not supported"),
    "tensor_activations": (changed(f"{GROUP}.input_activations.strategy", "tensor"),
                           "input_activations strategy 'tensor' is not supported"),
    "sparsity": (changed("sparsity_config", {"format": "sparse-24-bitmask"}), "sparsity_config is not supported"),
    "block_scales": (changed(f"{GROUP}.weights.block_structure", [128, 128]), "block-wise scales are not supported"),
    "group_scales": (changed(f"{GROUP}.weights.strategy", "group"), "group-wise scales are not supported"),
    "kv_cache_scheme": (changed("kv_cache_scheme", {"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    "asymmetric": (changed(f"{GROUP}.weights.symmetric", False), "asymmetric quantization"),
    "output_activations": (changed(f"{GROUP}.output_activations", {"num_bits": 8}), "output_activations"),
    "unknown_key": ({**FP8_BLOCK, "mystery": 1}, r"unknown key\(s\) \['mystery'\]"),
    "class_target": (changed(f"{GROUP}.targets", ["Attention"]), "target 'Attention' is not supported"),
    "uncompressed": (changed("quantization_status", "frozen"), "quantization_status 'frozen'"),
    "mixed_groups": (changed("config_groups.group_1", {
        "targets": ["re:.*experts.*"],
        "weights": {**FP8_BLOCK["config_groups"]["group_0"]["weights"], "strategy": "tensor"}}),
        "mix schemes"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_quantization_is_refused_by_name(case):
    block, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        parse_quantization_config(block)
