"""The embedded tiny Dots1 checkpoint, its generator script, and the presets in configs/."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jinja2.exceptions import TemplateError
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoTokenizer, Dots1Config, Dots1ForCausalLM

from model.embedded import EMBEDDED_MODEL_DIR
from scheduler.config import EngineConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train_embedded_model.py"
CONFIGS_DIR = REPO_ROOT / "configs"
SPECIAL_TOKEN_IDS = {
    "<|endoftext|>": 4089,
    "<|system|>": 4090,
    "<|endofsystem|>": 4091,
    "<|userprompt|>": 4092,
    "<|endofuserprompt|>": 4093,
    "<|response|>": 4094,
    "<|endofresponse|>": 4095,
}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def reference_model() -> Dots1ForCausalLM:
    model, loading_info = Dots1ForCausalLM.from_pretrained(
        EMBEDDED_MODEL_DIR, dtype=torch.float32, local_files_only=True, output_loading_info=True
    )
    assert not loading_info["missing_keys"]
    assert not loading_info["unexpected_keys"]
    assert not loading_info["mismatched_keys"]
    return model.eval()


def run_train_script(out_dir: Path, steps: int) -> None:
    subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--out", str(out_dir), "--steps", str(steps)], check=True,
                   capture_output=True)


def test_tokenizer_and_configs_regenerate_bit_identically_from_the_script(tmp_path: Path):
    run_train_script(tmp_path, steps=0)
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    for name in written:
        assert (tmp_path / name).read_bytes() == (EMBEDDED_MODEL_DIR / name).read_bytes(), name


def test_training_is_seeded(tmp_path: Path):
    """The committed weights come from the script's full run; two short runs show that a run is reproducible."""
    run_train_script(tmp_path / "first", steps=2)
    run_train_script(tmp_path / "second", steps=2)
    first = (tmp_path / "first" / "model.safetensors").read_bytes()
    assert first == (tmp_path / "second" / "model.safetensors").read_bytes()
    assert first != (EMBEDDED_MODEL_DIR / "model.safetensors").read_bytes()  # 2 steps are not the full run


def test_checkpoint_is_at_most_sixteen_megabytes():
    total_bytes = sum(path.stat().st_size for path in EMBEDDED_MODEL_DIR.iterdir())
    assert total_bytes <= 16_000_000


def test_config_has_the_real_dots1_structure():
    config = read_json(EMBEDDED_MODEL_DIR / "config.json")
    assert config["model_type"] == "dots1"
    assert config["architectures"] == ["Dots1ForCausalLM"]
    assert config["first_k_dense_replace"] == 1
    assert config["num_hidden_layers"] > config["first_k_dense_replace"]
    assert config["n_routed_experts"] >= 8
    assert config["num_experts_per_tok"] == 2
    assert config["n_shared_experts"] >= 1
    assert config["routed_scaling_factor"] == 2.5
    assert config["norm_topk_prob"] is True
    assert config["n_group"] == 1 and config["topk_group"] == 1
    assert config["num_key_value_heads"] == config["num_attention_heads"]
    assert config["scoring_func"] == "sigmoid"
    assert config["topk_method"] == "noaux_tc"
    assert config["sliding_window"] is None
    assert config["tie_word_embeddings"] is False
    assert config["bos_token_id"] is None
    eos_ids = [SPECIAL_TOKEN_IDS["<|endofresponse|>"], SPECIAL_TOKEN_IDS["<|endoftext|>"]]
    assert config["eos_token_id"] == eos_ids
    generation_config = read_json(EMBEDDED_MODEL_DIR / "generation_config.json")
    assert generation_config["eos_token_id"] == eos_ids
    assert generation_config["bos_token_id"] is None


def test_weights_are_bf16_with_fp32_nonzero_correction_bias_and_qk_norms():
    config = read_json(EMBEDDED_MODEL_DIR / "config.json")
    with safe_open(EMBEDDED_MODEL_DIR / "model.safetensors", framework="pt") as checkpoint:
        keys = set(checkpoint.keys())
        for layer in range(config["num_hidden_layers"]):
            assert f"model.layers.{layer}.self_attn.q_norm.weight" in keys
            assert f"model.layers.{layer}.self_attn.k_norm.weight" in keys
            bias_key = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
            if layer < config["first_k_dense_replace"]:
                assert f"model.layers.{layer}.mlp.gate_proj.weight" in keys
                assert bias_key not in keys
                continue
            bias = checkpoint.get_tensor(bias_key)
            assert bias.dtype == torch.float32
            assert torch.all(bias != 0)
            last_expert = config["n_routed_experts"] - 1
            assert f"model.layers.{layer}.mlp.experts.{last_expert}.down_proj.weight" in keys
            assert f"model.layers.{layer}.mlp.shared_experts.up_proj.weight" in keys
        other_dtypes = {checkpoint.get_tensor(key).dtype for key in keys if not key.endswith("correction_bias")}
    assert other_dtypes == {torch.bfloat16}


def test_tokenizer_has_the_dots1_special_tokens(tokenizer):
    assert len(tokenizer) == read_json(EMBEDDED_MODEL_DIR / "config.json")["vocab_size"]
    for token, token_id in SPECIAL_TOKEN_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer.encode(token, add_special_tokens=True) == [token_id]
    assert tokenizer.bos_token is None
    assert tokenizer.eos_token == "<|endofresponse|>"


def test_tokenizer_round_trips_bytes_and_matches_the_raw_tokenizer_json(tokenizer):
    text = "In the beginning was the Word.\n\tZürich, 東京, naïve café 🤖🎉 \u200b end  "
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned, not just bytes
    raw = Tokenizer.from_file(str(EMBEDDED_MODEL_DIR / "tokenizer.json"))
    assert raw.encode(text).ids == ids


def test_skip_special_tokens_drops_the_chat_tokens(tokenizer):
    ids = tokenizer.encode("<|userprompt|>hi<|endofuserprompt|><|response|>hello<|endofresponse|><|endoftext|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hihello"


def test_chat_template_renders_a_full_conversation(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    expected = (
        "<|system|>Be brief.<|endofsystem|><|userprompt|>Hi!<|endofuserprompt|>"
        "<|response|>Hello.<|endofresponse|>"
    )
    assert rendered == expected


def test_chat_template_injects_the_default_system_prompt_and_generation_prompt(tokenizer):
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is wisdom?"}], tokenize=False, add_generation_prompt=True
    )
    expected = (
        "<|system|>You are a helpful assistant.<|endofsystem|>"
        "<|userprompt|>What is wisdom?<|endofuserprompt|><|response|>"
    )
    assert rendered == expected


def test_chat_template_joins_text_parts_and_treats_developer_as_system(tokenizer):
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Rule one."}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|system|>Rule one.<|endofsystem|><|userprompt|>a\nb<|endofuserprompt|><|response|>"


def test_chat_template_rejects_an_unknown_role(tokenizer):
    with pytest.raises(TemplateError, match="Unsupported message role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


def test_transformers_loads_the_checkpoint_and_runs_a_forward(tokenizer, reference_model):
    config = read_json(EMBEDDED_MODEL_DIR / "config.json")
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, return_tensors="pt"
    )
    input_ids = encoded["input_ids"]  # [1, T]
    with torch.no_grad():
        logits = reference_model(input_ids).logits  # [1, T, V]
    assert logits.shape == (1, input_ids.shape[1], config["vocab_size"])
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 1.0  # peaked enough that greedy decoding is not a coin toss
    with safe_open(EMBEDDED_MODEL_DIR / "model.safetensors", framework="pt") as checkpoint:
        bias_on_disk = checkpoint.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert torch.equal(reference_model.model.layers[1].mlp.gate.e_score_correction_bias, bias_on_disk)


@pytest.mark.parametrize("preset", ["dots1-tiny.yaml", "cpu-dev.yaml"])
def test_preset_fills_engine_config_and_points_at_the_embedded_model(preset: str):
    values = yaml.safe_load((CONFIGS_DIR / preset).read_text(encoding="utf-8"))
    engine_fields = {field.name for field in dataclasses.fields(EngineConfig)}
    assert set(values) <= engine_fields
    engine_config = EngineConfig(**values)
    assert (REPO_ROOT / engine_config.model).resolve() == EMBEDDED_MODEL_DIR


def test_real_dots_llm1_inst_config_sizes_to_142_8b_parameters():
    config_dir = CONFIGS_DIR / "dots.llm1.inst"
    config = Dots1Config.from_pretrained(config_dir, local_files_only=True)
    assert config.scoring_func == "sigmoid" and config.topk_method == "noaux_tc"
    assert read_json(config_dir / "generation_config.json")["eos_token_id"] == [151649, 151643]
    with torch.device("meta"):
        model = Dots1ForCausalLM(config)
    parameter_count = sum(parameter.numel() for parameter in model.parameters())
    assert 142.5e9 < parameter_count < 143.0e9


def test_transformers_greedy_reply_is_words_that_end_the_turn(tokenizer, reference_model):
    """The trained model, run by Transformers itself: a chat reply that ends with <|endofresponse|>."""
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the sea."}], add_generation_prompt=True, return_tensors="pt"
    )
    prompt_length = encoded["input_ids"].shape[1]
    with torch.no_grad():
        generated = reference_model.generate(**encoded, max_new_tokens=96, do_sample=False)
    reply = generated[0, prompt_length:].tolist()  # [N]
    assert reply[-1] == SPECIAL_TOKEN_IDS["<|endofresponse|>"]
    text = tokenizer.decode(reply, skip_special_tokens=True)
    assert len(text.split()) >= 3 and all(character.isascii() for character in text)
