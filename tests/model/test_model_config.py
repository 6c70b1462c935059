"""config.json parsing: Dots1Config's defaults and spellings, and refusal of options this engine cannot honour."""
import json
from pathlib import Path

import pytest
import torch
from transformers import Dots1Config

from model.config import ModelConfig
from model.device import resolve_device, resolve_dtype
from model.generation_config import load_generation_defaults
from model.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block
from model.parallel import ParallelState

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(model_type="dots1", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1)


def test_published_dots_llm1_inst_config():
    config = ModelConfig.from_pretrained(REPO / "configs" / "dots.llm1.inst")
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (4096, 62, 128)
    assert config.rope.rope_type == "default" and config.rope.theta == 1e7
    assert config.moe_layer_ids == list(range(1, 62))
    assert not any(config.is_sliding_layer(i) for i in range(62))
    assert (config.n_group, config.topk_group, config.routed_scaling_factor) == (1, 1, 2.5)


def test_defaults_follow_transformers_dots1_config():
    """Options left out of config.json take Dots1Config's defaults, layer_types included."""
    raw = {**SMALL, "sliding_window": 16, "max_window_layers": 2}
    ours = ModelConfig.from_dict(raw)
    theirs = Dots1Config(**{k: v for k, v in raw.items() if k != "model_type"})
    assert list(ours.layer_types) == theirs.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert ours.window_of_layer(3) == 16 and ours.window_of_layer(1) is None
    assert ours.head_dim == 8
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.rope.theta == theirs.rope_parameters["rope_theta"]
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert (ours.n_group, ours.topk_group, ours.norm_topk_prob) == (1, 1, False)


def test_legacy_and_v5_rope_spellings_agree():
    legacy = ModelConfig.from_dict({**SMALL, "rope_theta": 5e5,
                                    "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 512}})
    v5 = ModelConfig.from_dict({**SMALL, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                                              "original_max_position_embeddings": 512}})
    assert legacy.rope == v5.rope
    assert legacy.rope.rope_type == "yarn" and legacy.rope.original_max_position_embeddings == 512


REFUSED = {
    "scoring_func": ({"scoring_func": "softmax"}, "scoring_func 'softmax'"),
    "topk_method": ({"topk_method": "greedy"}, "topk_method 'greedy'"),
    "moe_layer_freq": ({"moe_layer_freq": 2}, "moe_layer_freq 2"),
    "hidden_act": ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    "rope_type": ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope type 'longrope'"),
    "rope_missing_factor": ({"rope_scaling": {"type": "linear"}}, r"needs rope parameter\(s\) \['factor'\]"),
    "partial_rotary": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    "quantization": ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    "unknown_option": ({"num_nextn_predict_layers": 1}, r"unknown option\(s\) \['num_nextn_predict_layers'\]"),
    "model_type": ({"model_type": "deepseek_v3"}, "unsupported model_type 'deepseek_v3'"),
    "groups": ({"n_group": 3}, r"n_routed_experts \(8\) must be divisible by n_group \(3\)"),
    "sliding_without_window": ({"sliding_window": None, "layer_types": ["sliding_attention"] * 4},
                               "sliding_window must be a positive integer"),
    "kv_heads": ({"num_key_value_heads": 3}, r"multiple of num_key_value_heads \(3\)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_options_it_cannot_honour_are_refused_by_name(case, tmp_path):
    change, message = REFUSED[case]
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, **change}))
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_pretrained(tmp_path)


def test_kv_cache_shape_and_bytes_per_rank():
    config = ModelConfig.from_dict(SMALL)
    caches = allocate_kv_cache(config, num_blocks=5, block_size=4, dtype=torch.bfloat16, device="cpu")
    assert len(caches) == 4
    assert caches[0][0].shape == caches[0][1].shape == (5, 4, 2, 8)
    assert kv_cache_bytes_per_block(config, 4, torch.bfloat16) == 2 * 4 * 4 * 2 * 8 * 2
    half = kv_cache_bytes_per_block(config, 4, torch.bfloat16, ParallelState(rank=1, world_size=2))
    assert half == kv_cache_bytes_per_block(config, 4, torch.bfloat16) // 2


def test_device_and_dtype_resolution():
    cpu = resolve_device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 is not supported on the CPU"):
        resolve_dtype("float16", cpu)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", cpu)
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_generation_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "eos_token_id": 7}))
    assert load_generation_defaults(tmp_path).eos_token_ids == [7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 7, 9], "temperature": 0.7,
                                                                  "top_p": 0.9, "do_sample": True}))
    defaults = load_generation_defaults(tmp_path)
    assert defaults.eos_token_ids == [9, 7]
    assert defaults.sampling == {"temperature": 0.7, "top_p": 0.9}
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json: not valid JSON"):
        load_generation_defaults(tmp_path)
