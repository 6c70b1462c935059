"""The embedded model's byte-level BPE tokenizer (Qwen2 pre-tokenizer, Dots1 special tokens and chat template).

Files are written as plain JSON by this module rather than by a library's save_pretrained, so that their bytes
depend only on the training text, not on which transformers version is installed.
"""
import json
import os

# Train on one thread so that the merge order can never depend on thread scheduling.
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers  # noqa: E402

MODEL_MAX_LENGTH = 2048

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

def train_bpe(texts: list[str]) -> tuple[dict[str, int], list[list[str]]]:
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
    tokenizer.train_from_iterator(texts, trainer=trainer)
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
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_tokenizer(texts: list[str]) -> tuple[Tokenizer, dict, dict]:
    """Trains the BPE on ``texts``; returns the tokenizer and the contents of tokenizer.json and
    tokenizer_config.json."""
    vocab, merges = train_bpe(texts)
    tokenizer_data = tokenizer_json(vocab, merges)
    tokenizer = Tokenizer.from_str(json.dumps(tokenizer_data))  # fails here, not at serve time, if malformed
    return tokenizer, tokenizer_data, tokenizer_config()
