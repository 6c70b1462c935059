"""Every published dots.llm1 config revision loads as the same model; what would change the model is refused."""
import json
import logging
from pathlib import Path

import pytest

import model.config
from model.config import ModelConfig

REPO = Path(__file__).resolve().parents[2]

CURRENT = json.loads((REPO / "configs" / "dots.llm1.inst" / "config.json").read_text())
# dots.llm1.base as first uploaded (Transformers 4.46.3 era): the router spelled as a scoring function, no group
# keys, and keys Transformers' Dots1 ignores.
FIRST_UPLOAD = {key: value for key, value in CURRENT.items() if key not in ("topk_method", "n_group", "topk_group")}
FIRST_UPLOAD |= {"scoring_func": "noaux_tc", "pretraining_tp": 1, "use_sliding_window": False, "moe_layer_freq": 1,
                 "transformers_version": "4.46.3"}
# The "scoring_func->topk_method" edit: the same key renamed.
TOPK_METHOD_EDIT = {key: value for key, value in FIRST_UPLOAD.items() if key != "scoring_func"}
TOPK_METHOD_EDIT["topk_method"] = "noaux_tc"
FP8_BLOCK = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "ignore": ["lm_head", "re:.*mlp.gate$"], "kv_cache_scheme": None, "sparsity_config": {},
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
                    "group_size": None, "block_structure": None, "observer": "minmax"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True, "observer": None},
        "output_activations": None}},
}
# A quantized checkpoint derived from the first upload, from the days the block was named compression_config.
OLD_FP8 = {**FIRST_UPLOAD, "compression_config": FP8_BLOCK}
CURRENT_FP8 = {**CURRENT, "quantization_config": FP8_BLOCK}

REVISIONS = {"first_upload": FIRST_UPLOAD, "topk_method_edit": TOPK_METHOD_EDIT, "current": CURRENT,
             "compression_config": OLD_FP8, "current_fp8": CURRENT_FP8}


def architecture(config: ModelConfig) -> ModelConfig:
    return ModelConfig(**{**config.__dict__, "quantization": None})


@pytest.mark.parametrize("revision", sorted(REVISIONS))
def test_every_revision_is_the_same_model(revision, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REVISIONS[revision]))
    config = ModelConfig.from_pretrained(tmp_path)
    assert architecture(config) == ModelConfig.from_pretrained(REPO / "configs" / "dots.llm1.inst")
    assert (config.quantization is not None) == ("compression_config" in REVISIONS[revision] or
                                                 "quantization_config" in REVISIONS[revision])


def test_the_fp8_block_in_either_name_means_the_same_scheme():
    old, new = ModelConfig.from_dict(OLD_FP8).quantization, ModelConfig.from_dict(CURRENT_FP8).quantization
    assert old == new
    assert (new.weight_strategy, new.dynamic_activations) == ("channel", True)
    assert new.quantizes("model.layers.3.mlp.experts.7.down_proj")
    assert not new.quantizes("lm_head") and not new.quantizes("model.layers.3.mlp.gate")


def test_legacy_keys_are_named_in_one_info_line_each(caplog, monkeypatch):
    monkeypatch.setattr(model.config, "_LOGGED", set())
    caplog.set_level(logging.INFO, logger="model.config")
    ModelConfig.from_dict(OLD_FP8)
    ModelConfig.from_dict(OLD_FP8)  # the executor and the loader both read config.json
    lines = [record.getMessage() for record in caplog.records]
    for needle in ("scoring_func 'noaux_tc'", "compression_config", "pretraining_tp=1", "use_sliding_window False",
                   "moe_layer_freq 1"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    assert len(lines) == 5


REFUSED = {
    "noaux_tc_against_topk_method": ({"scoring_func": "noaux_tc", "topk_method": "greedy"},
                                     "scoring_func 'noaux_tc'.*contradicts topk_method 'greedy'"),
    "softmax_scores": ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported"),
    "use_sliding_window_against_layers": ({"use_sliding_window": True},
                                          "use_sliding_window True contradicts"),
    "no_window_but_sliding_layers": ({"use_sliding_window": False, "sliding_window": 8, "max_window_layers": 2},
                                     "use_sliding_window False contradicts"),
    "moe_layer_freq": ({"moe_layer_freq": 2}, "moe_layer_freq 2 is not supported"),
    "two_names_differ": ({"compression_config": FP8_BLOCK, "quantization_config": {**FP8_BLOCK, "ignore": []}},
                         "both compression_config and quantization_config"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_would_change_the_model_is_refused(case):
    change, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**CURRENT, **change})
