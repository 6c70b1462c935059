"""scripts/hf_to_gguf.py: names, types, shapes and metadata as llama.cpp's converter writes them for dots1."""
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_checkpoints import hf_to_gguf, save_random_dots1_with_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from model.embedded import EMBEDDED_MODEL_DIR
from model.gguf.reader import read_metadata
from model.gguf.tokenizer import tokenizer_from_gguf

Q = gguf.GGMLQuantizationType
CONFIG = dict(vocab_size=4100, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=2, num_key_value_heads=1, head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
              n_shared_experts=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
              max_position_embeddings=512, rms_norm_eps=1e-5,
              rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
EXPECTED_METADATA = {
    "general.architecture": "dots1", "general.file_type": 0, "dots1.block_count": 3, "dots1.context_length": 512,
    "dots1.embedding_length": 64, "dots1.feed_forward_length": 96, "dots1.attention.head_count": 2,
    "dots1.attention.head_count_kv": 1, "dots1.attention.key_length": 32, "dots1.attention.value_length": 32,
    "dots1.attention.layer_norm_rms_epsilon": np.float32(1e-5), "dots1.rope.freq_base": 5e5, "dots1.expert_count": 4,
    "dots1.expert_used_count": 2, "dots1.expert_feed_forward_length": 32, "dots1.expert_shared_count": 2,
    "dots1.leading_dense_block_count": 1, "dots1.expert_weights_scale": 2.5, "dots1.expert_weights_norm": True,
    "dots1.expert_gating_func": 2, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
    "tokenizer.ggml.eos_token_id": 4095, "tokenizer.ggml.padding_token_id": 4089,
    "tokenizer.ggml.add_bos_token": False,
}
PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
ATTENTION = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
             "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("dots1")
    save_random_dots1_with_tokenizer(model_dir, CONFIG)
    return model_dir


@pytest.fixture(scope="module")
def hf_weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


@pytest.fixture(scope="module")
def f32_file(checkpoint, tmp_path_factory) -> gguf.GGUFReader:
    path = tmp_path_factory.mktemp("gguf") / "f32.gguf"
    hf_to_gguf.write_dots1_gguf(checkpoint, path)
    return gguf.GGUFReader(path)


def expected_tensors(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """GGUF name -> torch-order float32 array, written out by hand from llama.cpp's dots1 tensor list."""
    out = {"token_embd.weight": weights["model.embed_tokens.weight"],
           "output_norm.weight": weights["model.norm.weight"],
           "output.weight": weights["lm_head.weight"]}
    for i in range(CONFIG["num_hidden_layers"]):
        hf = f"model.layers.{i}"
        out |= {f"blk.{i}.{name}.weight": weights[f"{hf}.{part}.weight"] for name, part in ATTENTION.items()}
        if i < CONFIG["first_k_dense_replace"]:
            out |= {f"blk.{i}.ffn_{p}.weight": weights[f"{hf}.mlp.{proj}.weight"] for p, proj in PROJ.items()}
            continue
        out[f"blk.{i}.ffn_gate_inp.weight"] = weights[f"{hf}.mlp.gate.weight"]
        out[f"blk.{i}.exp_probs_b.bias"] = weights[f"{hf}.mlp.gate.e_score_correction_bias"]
        for p, proj in PROJ.items():
            out[f"blk.{i}.ffn_{p}_exps.weight"] = torch.stack(
                [weights[f"{hf}.mlp.experts.{e}.{proj}.weight"] for e in range(CONFIG["n_routed_experts"])])
            out[f"blk.{i}.ffn_{p}_shexp.weight"] = weights[f"{hf}.mlp.shared_experts.{proj}.weight"]
    return {name: tensor.float().numpy() for name, tensor in out.items()}


def is_kept_f32(name: str) -> bool:
    return name.endswith(("_norm.weight", ".bias", "ffn_gate_inp.weight"))


def fields(reader: gguf.GGUFReader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items()}


def test_f32_file_has_llama_cpp_names_shapes_and_exact_weights(f32_file, hf_weights):
    expected = expected_tensors(hf_weights)
    tensors = {t.name: t for t in f32_file.tensors}
    assert set(tensors) == set(expected)
    dots1_names = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.DOTS1]
                   for i in range(CONFIG["num_hidden_layers"])}
    assert {name.rsplit(".", 1)[0] for name in tensors} <= dots1_names
    for name, want in expected.items():
        tensor = tensors[name]
        assert tensor.tensor_type == Q.F32, name
        assert list(tensor.shape) == list(reversed(want.shape)), name
        np.testing.assert_array_equal(tensor.data, want, err_msg=name)
    assert list(tensors["blk.1.ffn_gate_exps.weight"].shape) == [64, 32, 4]
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [32, 64, 4]
    assert list(tensors["blk.1.ffn_gate_shexp.weight"].shape) == [64, 32 * 2]


def test_metadata_as_the_converter_writes_it(f32_file, checkpoint):
    meta = fields(f32_file)
    assert {key: meta.get(key) for key in EXPECTED_METADATA} == EXPECTED_METADATA
    assert not any("sliding_window" in key for key in meta)
    assert "tokenizer.ggml.bos_token_id" not in meta  # the checkpoint has none, so the converter writes none
    tokenizer_json = json.loads((checkpoint / "tokenizer.json").read_text())
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == CONFIG["vocab_size"]
    assert tokens[4096:] == [f"[PAD{i}]" for i in range(4096, 4100)]
    assert types[4096:] == [gguf.TokenType.UNUSED] * 4
    assert types[4089:4096] == [gguf.TokenType.CONTROL] * 7 and set(types[:4089]) == {gguf.TokenType.NORMAL}
    assert tokens[:4089] == sorted(tokenizer_json["model"]["vocab"], key=tokenizer_json["model"]["vocab"].get)
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in tokenizer_json["model"]["merges"]]
    template = json.loads((checkpoint / "tokenizer_config.json").read_text())["chat_template"]
    assert meta["tokenizer.chat_template"] == template


def test_padded_vocab_tokenizer_still_matches(f32_file):
    tokenizer = tokenizer_from_gguf(read_metadata(f32_file.data.filename))
    hf_tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True)
    text = "And God said, Let there be light 我想 🦙<|endofresponse|>"
    assert len(tokenizer) == 4096
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)


def test_q8_0_through_the_cli(checkpoint, hf_weights, tmp_path):
    path = tmp_path / "q8.gguf"
    hf_to_gguf.main([str(checkpoint), str(path), "--type", "Q8_0"])
    reader = gguf.GGUFReader(path)
    assert fields(reader)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    for tensor in reader.tensors:
        want = expected_tensors(hf_weights)[tensor.name]
        assert list(tensor.shape) == list(reversed(want.shape)), tensor.name
        if is_kept_f32(tensor.name):
            assert tensor.tensor_type == Q.F32, tensor.name
            np.testing.assert_array_equal(tensor.data, want)
        else:
            assert tensor.tensor_type == Q.Q8_0, tensor.name
            np.testing.assert_array_equal(gguf.quants.dequantize(tensor.data, Q.Q8_0),
                                          gguf.quants.dequantize(gguf.quants.quantize(want, Q.Q8_0), Q.Q8_0))


@pytest.mark.parametrize(("tensor_type", "file_type"), [("F16", 1), ("BF16", 32), ("Q4_0", 2), ("Q5_1", 9)])
def test_other_tensor_types(checkpoint, hf_weights, tmp_path, tensor_type, file_type):
    path = tmp_path / "model.gguf"
    hf_to_gguf.write_dots1_gguf(checkpoint, path, tensor_type)
    reader = gguf.GGUFReader(path)
    assert fields(reader)["general.file_type"] == file_type
    qtype = Q[tensor_type]
    expected = expected_tensors(hf_weights)
    for tensor in reader.tensors:
        assert tensor.tensor_type == (Q.F32 if is_kept_f32(tensor.name) else qtype), tensor.name
        want = gguf.quants.quantize(expected[tensor.name], tensor.tensor_type)
        np.testing.assert_array_equal(tensor.data.view(want.dtype).reshape(want.shape), want, err_msg=tensor.name)


def test_rows_that_do_not_fill_blocks_fall_back_to_f16(tmp_path):
    assert hf_to_gguf.tensor_qtype("blk.0.attn_q.weight", [64, 48], Q.Q8_0) == Q.F16
    assert hf_to_gguf.tensor_qtype("blk.0.attn_q.weight", [64, 64], Q.Q8_0) == Q.Q8_0
    with pytest.raises(ValueError, match="Q4_K"):
        hf_to_gguf.write_dots1_gguf(EMBEDDED_MODEL_DIR, tmp_path / "x.gguf", "Q4_K")


def test_overrides_replace_add_and_drop_metadata(tmp_path):
    path = tmp_path / "edited.gguf"
    hf_to_gguf.write_dots1_gguf(EMBEDDED_MODEL_DIR, path, overrides={
        "general.name": "edited", "tokenizer.ggml.bos_token_id": 11, "tokenizer.chat_template": None})
    reader = gguf.GGUFReader(path)
    meta = fields(reader)
    assert meta["general.name"] == "edited" and meta["tokenizer.ggml.bos_token_id"] == 11
    assert reader.get_field("tokenizer.ggml.bos_token_id").types == [gguf.GGUFValueType.UINT32]
    assert "tokenizer.chat_template" not in meta


def test_llama_cpp_runs_the_file_as_transformers_runs_the_checkpoint(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    path = tmp_path / "dots1-tiny.gguf"
    hf_to_gguf.write_dots1_gguf(EMBEDDED_MODEL_DIR, path)
    ids = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True).encode(
        "In the beginning God created the heaven and the earth. And the earth was")
    llama = llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    assert llama.tokenize(b"In the beginning", add_bos=False) == ids[:3]
    llama.eval(ids)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()  # [T, V]
    np.testing.assert_allclose(np.asarray(llama.scores[:len(ids)]), expected, atol=1e-2, rtol=0)


def test_fused_experts_in_sharded_files_write_the_same_tensors(checkpoint, hf_weights, f32_file, tmp_path):
    """Transformers' in-memory expert layout (gate_up_proj [E, 2F, H], down_proj [E, H, F]), two shards, no lm_head."""
    weights = {name: w for name, w in hf_weights.items() if ".experts." not in name and name != "lm_head.weight"}
    for i in range(CONFIG["first_k_dense_replace"], CONFIG["num_hidden_layers"]):
        hf = f"model.layers.{i}.mlp.experts"
        experts = range(CONFIG["n_routed_experts"])
        weights[f"{hf}.gate_up_proj"] = torch.stack([torch.cat(
            [hf_weights[f"{hf}.{e}.gate_proj.weight"], hf_weights[f"{hf}.{e}.up_proj.weight"]]) for e in experts])
        weights[f"{hf}.down_proj"] = torch.stack([hf_weights[f"{hf}.{e}.down_proj.weight"] for e in experts])
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    model_dir = tmp_path / "fused"
    model_dir.mkdir()
    for file, shard_names in shards.items():
        save_file({name: weights[name].contiguous() for name in shard_names}, model_dir / file)
    weight_map = {name: file for file, shard_names in shards.items() for name in shard_names}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((checkpoint / name).read_bytes())

    hf_to_gguf.write_dots1_gguf(model_dir, tmp_path / "fused.gguf")
    tensors = {t.name: t.data for t in gguf.GGUFReader(tmp_path / "fused.gguf").tensors}
    reference = {t.name: t.data for t in f32_file.tensors}
    reference["output.weight"] = reference["token_embd.weight"]
    assert tensors.keys() == reference.keys()
    for name, data in reference.items():
        np.testing.assert_array_equal(tensors[name], data, err_msg=name)
