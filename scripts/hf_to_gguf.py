"""Writes a Hugging Face Dots1 checkpoint as a llama.cpp GGUF file of the ``dots1`` architecture.

It writes what llama.cpp's converter (``convert_hf_to_gguf.py``, ``Dots1Model(Qwen2MoeModel)``) writes: the same
``dots1.*`` keys, tensor names, shapes and types, and a GPT-2-style BPE vocabulary. Q/K are not permuted (dots1 uses
NEOX rope); norms, the router and the score-correction bias stay F32; 2-D/3-D weights take ``tensor_type`` (F16 where
a row does not fill whole quantization blocks, as the converter falls back). The K-quants come from llama.cpp's own
``llama-quantize``. Tensors are streamed: one tensor (one layer's expert stack) is in memory at a time.

    python scripts/hf_to_gguf.py MODEL_DIR OUT.gguf --type Q8_0
"""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

FILE_TYPES = {
    "F32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "F16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "BF16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "Q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "Q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0),
    "Q4_1": (gguf.LlamaFileType.MOSTLY_Q4_1, gguf.GGMLQuantizationType.Q4_1),
    "Q5_0": (gguf.LlamaFileType.MOSTLY_Q5_0, gguf.GGMLQuantizationType.Q5_0),
    "Q5_1": (gguf.LlamaFileType.MOSTLY_Q5_1, gguf.GGMLQuantizationType.Q5_1),
}
# llama.cpp's pre-tokenizer name for the Qwen2 split regex that dots1 uses; llama.cpp has no "dots1" name.
TOKENIZER_PRE = "qwen2"

ATTENTION_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
}
PROJECTIONS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class HFCheckpoint:
    """A Hugging Face model directory: config.json and its safetensors files, read one tensor at a time."""

    def __init__(self, model_dir: Path):
        self.config = json.loads((model_dir / "config.json").read_text())
        index = model_dir / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
            "model.safetensors"]
        self.files = {}
        for file in files:
            handle = safe_open(model_dir / file, framework="pt")
            self.files.update({name: handle for name in handle.keys()})

    def has(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> list[int]:
        return list(self.files[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self.files[name].get_tensor(name)


@dataclass
class TensorPlan:
    name: str
    shape: list[int]  # torch order
    load: Callable[[], torch.Tensor]


def tensor_plans(ckpt: HFCheckpoint) -> list[TensorPlan]:
    """Every GGUF tensor of the model, in order, with how to build it from the checkpoint."""
    config = ckpt.config
    num_experts = config["n_routed_experts"]

    def plain(hf_name: str, name: str) -> TensorPlan:
        return TensorPlan(name, ckpt.shape(hf_name), lambda: ckpt.get(hf_name))

    def stacked(hf_names: list[str], name: str) -> TensorPlan:
        return TensorPlan(name, [len(hf_names), *ckpt.shape(hf_names[0])],
                          lambda: torch.stack([ckpt.get(n) for n in hf_names]))

    def half_of_fused(hf_name: str, name: str, index: int) -> TensorPlan:
        experts, rows, cols = ckpt.shape(hf_name)
        return TensorPlan(name, [experts, rows // 2, cols], lambda: ckpt.get(hf_name).chunk(2, dim=1)[index])

    plans = [plain("model.embed_tokens.weight", "token_embd.weight")]
    for layer in range(config["num_hidden_layers"]):
        hf, blk = f"model.layers.{layer}", f"blk.{layer}"
        plans += [plain(f"{hf}.{part}.weight", f"{blk}.{name}.weight") for name, part in ATTENTION_TENSORS.items()]
        if not ckpt.has(f"{hf}.mlp.gate.weight"):
            plans += [plain(f"{hf}.mlp.{proj}.weight", f"{blk}.ffn_{p}.weight") for p, proj in PROJECTIONS.items()]
            continue
        plans += [plain(f"{hf}.mlp.gate.weight", f"{blk}.ffn_gate_inp.weight"),
                  plain(f"{hf}.mlp.gate.e_score_correction_bias", f"{blk}.exp_probs_b.bias")]
        if ckpt.has(f"{hf}.mlp.experts.gate_up_proj"):
            plans += [half_of_fused(f"{hf}.mlp.experts.gate_up_proj", f"{blk}.ffn_gate_exps.weight", 0),
                      half_of_fused(f"{hf}.mlp.experts.gate_up_proj", f"{blk}.ffn_up_exps.weight", 1),
                      plain(f"{hf}.mlp.experts.down_proj", f"{blk}.ffn_down_exps.weight")]
        else:
            plans += [stacked([f"{hf}.mlp.experts.{e}.{proj}.weight" for e in range(num_experts)],
                              f"{blk}.ffn_{p}_exps.weight") for p, proj in PROJECTIONS.items()]
        plans += [plain(f"{hf}.mlp.shared_experts.{proj}.weight", f"{blk}.ffn_{p}_shexp.weight")
                  for p, proj in PROJECTIONS.items()]
    plans.append(plain("model.norm.weight", "output_norm.weight"))
    # llama.cpp requires `output`; a tied checkpoint has no lm_head, so the embedding stands in for it.
    plans.append(plain("lm_head.weight" if ckpt.has("lm_head.weight") else "model.embed_tokens.weight",
                       "output.weight"))
    return plans


def tensor_qtype(name: str, shape: list[int], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The converter's choice: F32 for 1-D tensors, norms, the router and biases; F16 where rows do not fill blocks."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F16


def tensor_nbytes(shape: list[int], qtype: gguf.GGMLQuantizationType) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block_size * type_size


def encode_tensor(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if tensor.dtype not in (torch.float16, torch.float32):
        tensor = tensor.to(torch.float32)
    return gguf.quants.quantize(tensor.contiguous().numpy(), qtype)


def add_general_metadata(writer: gguf.GGUFWriter, model_dir: Path) -> None:
    """Name, size label and model-card fields, derived the converter's way (``gguf.Metadata``)."""
    total, shared, experts, expert_count = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, model_dir, None, total)
    metadata.name = metadata.name or model_dir.name
    metadata.size_label = metadata.size_label or gguf.size_label(total, shared, experts, expert_count)
    metadata.set_gguf_meta_model(writer)


def add_hyperparameters(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta")))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_expert_count(config["n_routed_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if config.get("n_group") is not None:
        writer.add_expert_group_count(config["n_group"])
    if config.get("topk_group") is not None:
        writer.add_expert_group_used_count(config["topk_group"])
    if config.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"dots1 routes with sigmoid scores, not {config['scoring_func']!r}")
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_leading_dense_block_count(config["first_k_dense_replace"])
    writer.add_expert_shared_count(config["n_shared_experts"])
    writer.add_expert_weights_scale(config["routed_scaling_factor"])
    writer.add_expert_weights_norm(config["norm_topk_prob"])


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """The converter's ``_set_vocab_gpt2``: tokens padded to vocab_size, token types, merges, special ids, template."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            if not added[token_id].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = added[token_id].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)


def value_type(value: Any) -> gguf.GGUFValueType:
    """GGUF's usual type for a new key's value: ids and counts are UINT32 (llama.cpp reads them so), floats FLOAT32."""
    if isinstance(value, int) and not isinstance(value, bool):
        return gguf.GGUFValueType.UINT32 if value >= 0 else gguf.GGUFValueType.INT32
    return gguf.GGUFValueType.get_type(value)


def apply_overrides(writer: gguf.GGUFWriter, overrides: dict[str, Any]) -> None:
    """Replaces (keeping the written type), adds (see value_type) or, for None, drops metadata keys."""
    kv = writer.kv_data[0]
    for key, value in overrides.items():
        if value is None:
            kv.pop(key, None)
        elif key in kv:
            kv[key] = gguf.GGUFValue(value, kv[key].type, kv[key].sub_type)
        else:
            kv[key] = gguf.GGUFValue(value, value_type(value))


def write_dots1_gguf(model_dir: Path, out: Path, tensor_type: str = "F32",
                     overrides: dict[str, Any] | None = None, split_max_tensors: int = 0) -> None:
    """Writes ``model_dir`` (a Dots1 checkpoint with its tokenizer) to ``out``; ``overrides`` edits metadata.
    ``split_max_tensors`` > 0 writes a split set (``out`` stem + ``-0000i-of-0000n.gguf``) as llama.cpp's gguf-split
    does."""
    if tensor_type not in FILE_TYPES:
        raise ValueError(f"tensor type {tensor_type!r} is not one of {', '.join(FILE_TYPES)}")
    file_type, wanted = FILE_TYPES[tensor_type]
    ckpt = HFCheckpoint(Path(model_dir))
    if ckpt.config.get("model_type") != "dots1":
        raise ValueError(f"{model_dir}: model_type {ckpt.config.get('model_type')!r} is not dots1")
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DOTS1], split_max_tensors=split_max_tensors)
    plans = tensor_plans(ckpt)
    qtypes = [tensor_qtype(plan.name, plan.shape, wanted) for plan in plans]
    for plan, qtype in zip(plans, qtypes):
        writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), tensor_nbytes(plan.shape, qtype), qtype)

    writer.add_type(gguf.GGUFType.MODEL)
    add_general_metadata(writer, Path(model_dir))
    add_hyperparameters(writer, ckpt.config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, Path(model_dir), ckpt.config["vocab_size"])
    apply_overrides(writer, overrides or {})
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for plan, qtype in zip(plans, qtypes):
        writer.write_tensor_data(encode_tensor(plan.load(), qtype))
    writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="Hugging Face Dots1 checkpoint directory")
    parser.add_argument("out", type=Path, help="GGUF file to write")
    parser.add_argument("--type", default="F32", choices=list(FILE_TYPES), help="type of the 2-D/3-D weights")
    args = parser.parse_args(argv)
    write_dots1_gguf(args.model_dir, args.out, args.type)


if __name__ == "__main__":
    main()
