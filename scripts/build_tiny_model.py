"""Build the embedded tiny Dots1 checkpoint (Hugging Face format) deterministically.

    python scripts/build_tiny_model.py [--out DIR] [--seed N]

Writes config.json, generation_config.json, model.safetensors (bf16 weights, fp32 router bias), tokenizer.json
and tokenizer_config.json (with the Dots1 chat template) to model/embedded/dots1-tiny/ by default.

Every file is serialised by this script rather than by a library's save_pretrained, so that the bytes depend only
on the seed, the corpus in scripts/data/ and torch's seeded generator, not on which transformers or tokenizers
version happens to be installed: tests/test_embedded_model.py regenerates the checkpoint and compares bytes.
"""
import argparse
import json
import os
from pathlib import Path

# Train on one thread so that the merge order can never depend on thread scheduling.
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "model" / "embedded" / "dots1-tiny"
CORPUS = REPO_ROOT / "scripts" / "data" / "sqlite3.h"

VOCAB_SIZE = 4096
# Same order as in the real vocabulary, where they sit at 151643..151649 after the BPE tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|system|>",
    "<|endofsystem|>",
    "<|userprompt|>",
    "<|endofuserprompt|>",
    "<|response|>",
    "<|endofresponse|>",
]
BPE_VOCAB_SIZE = VOCAB_SIZE - len(SPECIAL_TOKENS)
ENDOFTEXT_ID = BPE_VOCAB_SIZE
ENDOFRESPONSE_ID = BPE_VOCAB_SIZE + SPECIAL_TOKENS.index("<|endofresponse|>")
EOS_TOKEN_IDS = [ENDOFRESPONSE_ID, ENDOFTEXT_ID]

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
BYTE_LEVEL = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}

CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is none -%}"
    "{%- elif content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] != 'text' -%}"
    "{{ raise_exception('Only text content parts are supported, got: ' ~ part['type']) }}"
    "{%- endif -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}{{ part['text'] }}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages | length == 0 -%}{{ raise_exception('At least one message is required') }}{%- endif -%}"
    "{%- if messages[0]['role'] not in ['system', 'developer'] -%}"
    "<|system|>You are a helpful assistant.<|endofsystem|>"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['system', 'developer'] -%}"
    "<|system|>{{ render_content(message['content']) }}<|endofsystem|>"
    "{%- elif message['role'] == 'user' -%}"
    "<|userprompt|>{{ render_content(message['content']) }}<|endofuserprompt|>"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|response|>{{ render_content(message['content']) }}<|endofresponse|>"
    "{%- else -%}"
    "{{ raise_exception('Unsupported message role: ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|response|>{%- endif -%}"
)

MODEL_CONFIG = {
    "architectures": ["Dots1ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "eos_token_id": EOS_TOKEN_IDS,
    "first_k_dense_replace": 1,
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 128,
    "initializer_range": 0.02,
    "intermediate_size": 384,
    "max_position_embeddings": 2048,
    "max_window_layers": 4,
    "model_type": "dots1",
    "moe_intermediate_size": 64,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 16,
    "n_shared_experts": 2,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 4,
    "num_key_value_heads": 4,
    "pad_token_id": ENDOFTEXT_ID,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000000.0,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "sliding_window": None,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": VOCAB_SIZE,
}

GENERATION_CONFIG = {
    "bos_token_id": None,
    "eos_token_id": EOS_TOKEN_IDS,
    "pad_token_id": ENDOFTEXT_ID,
}


def corpus_text() -> str:
    """The English prose of the public-domain SQLite header: its comment lines without the leading '**'."""
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    return "\n".join(line[2:].removeprefix(" ") for line in lines if line.startswith("**"))


def train_bpe() -> tuple[dict[str, int], list[list[str]]]:
    """Byte-level BPE with the Qwen2 pre-tokenizer; returns (vocab, merges) without the special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([corpus_text()], trainer=trainer)
    trained = json.loads(tokenizer.to_str())["model"]
    vocab = dict(sorted(trained["vocab"].items(), key=lambda item: item[1]))
    if len(vocab) != BPE_VOCAB_SIZE:
        raise RuntimeError(f"BPE training produced {len(vocab)} tokens, expected {BPE_VOCAB_SIZE}")
    return vocab, [list(pair) for pair in trained["merges"]]


def special_token_entry(token: str) -> dict:
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {"content": token, **flags}


def tokenizer_json(vocab: dict[str, int], merges: list[list[str]]) -> dict:
    added_tokens = [
        {"id": BPE_VOCAB_SIZE + index, **special_token_entry(token)} for index, token in enumerate(SPECIAL_TOKENS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", **BYTE_LEVEL},
            ],
        },
        "post_processor": {"type": "ByteLevel", **BYTE_LEVEL},
        "decoder": {"type": "ByteLevel", **BYTE_LEVEL},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config() -> dict:
    added_tokens_decoder = {
        str(BPE_VOCAB_SIZE + index): special_token_entry(token) for index, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endofresponse|>",
        "errors": "replace",
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def random_weights(seed: int) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint layout. Weights scaled by fan_in**-0.5 so every layer visibly shapes the logits;
    router weights large enough that sigmoid scores spread out, and a non-zero correction bias that changes
    which experts win (a zero bias hides routing bugs)."""
    cfg = MODEL_CONFIG
    hidden, head_dim = cfg["hidden_size"], cfg["head_dim"]
    q_size = cfg["num_attention_heads"] * head_dim
    kv_size = cfg["num_key_value_heads"] * head_dim
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return normal(out_features, in_features, std=in_features**-0.5)

    def norm_weight(size: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(size, generator=generator)).to(torch.bfloat16)

    def swiglu(prefix: str, intermediate: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.gate_proj.weight": linear(intermediate, hidden),
            f"{prefix}.up_proj.weight": linear(intermediate, hidden),
            f"{prefix}.down_proj.weight": linear(hidden, intermediate),
        }

    weights = {"model.embed_tokens.weight": normal(cfg["vocab_size"], hidden, std=1.0)}
    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        weights[f"{prefix}.input_layernorm.weight"] = norm_weight(hidden)
        weights[f"{prefix}.self_attn.q_proj.weight"] = linear(q_size, hidden)
        weights[f"{prefix}.self_attn.k_proj.weight"] = linear(kv_size, hidden)
        weights[f"{prefix}.self_attn.v_proj.weight"] = linear(kv_size, hidden)
        weights[f"{prefix}.self_attn.o_proj.weight"] = linear(hidden, q_size)
        weights[f"{prefix}.self_attn.q_norm.weight"] = norm_weight(head_dim)
        weights[f"{prefix}.self_attn.k_norm.weight"] = norm_weight(head_dim)
        weights[f"{prefix}.post_attention_layernorm.weight"] = norm_weight(hidden)
        if layer < cfg["first_k_dense_replace"]:
            weights.update(swiglu(f"{prefix}.mlp", cfg["intermediate_size"]))
            continue
        num_experts, moe_intermediate = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        weights[f"{prefix}.mlp.gate.weight"] = normal(num_experts, hidden, std=0.15)
        weights[f"{prefix}.mlp.gate.e_score_correction_bias"] = 0.1 * torch.randn(num_experts, generator=generator)
        for expert in range(num_experts):
            weights.update(swiglu(f"{prefix}.mlp.experts.{expert}", moe_intermediate))
        weights.update(swiglu(f"{prefix}.mlp.shared_experts", moe_intermediate * cfg["n_shared_experts"]))
    weights["model.norm.weight"] = norm_weight(hidden)
    weights["lm_head.weight"] = normal(cfg["vocab_size"], hidden, std=0.25)
    return weights


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build(out_dir: Path, seed: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = train_bpe()
    tokenizer_data = tokenizer_json(vocab, merges)
    Tokenizer.from_str(json.dumps(tokenizer_data))  # fails here, not at serve time, if the file is malformed
    write_json(out_dir / "tokenizer.json", tokenizer_data)
    write_json(out_dir / "tokenizer_config.json", tokenizer_config())
    write_json(out_dir / "config.json", MODEL_CONFIG)
    write_json(out_dir / "generation_config.json", GENERATION_CONFIG)
    save_file(random_weights(seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args()
    build(args.out, args.seed)
    total = sum(path.stat().st_size for path in args.out.iterdir())
    print(f"wrote {args.out} ({total / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
