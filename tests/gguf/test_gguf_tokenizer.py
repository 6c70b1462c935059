"""The tokenizer built from a GGUF's metadata against the Hugging Face tokenizer the file was written from."""
import random
from pathlib import Path

import pytest
from gguf_checkpoints import hf_to_gguf
from transformers import AutoTokenizer

from model.embedded import EMBEDDED_MODEL_DIR
from model.gguf.reader import read_metadata
from model.gguf.tokenizer import gguf_eos_token_ids, ignored_bos_token_id, tokenizer_from_gguf

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|endofsystem|>", "<|userprompt|>", "<|endofuserprompt|>",
                  "<|response|>", "<|endofresponse|>"]
KJV = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
       "darkness was upon the face of the deep. And God said, Let there be light: and there was light. "
       "Thou shalt not kill. Blessed are the meek: for they shall inherit the earth. LORD, I've sinn'd; "
       "he's there, they'll come, we'd go, THEY'RE HERE, I'M sure, you'VE seen").split(" ")
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
        "\tif x != None:\r\n\t\tpass",
        "SELECT * FROM t WHERE id = 42;", "<div class=\"a\">&amp;</div>", "x = {'k': [1, 2.5e-3, -7]}  # note"]
UNICODE = ["我想在apple工作1314151天～", "東京都は日本の首都です。", "нещо на Български", "مرحبا بالعالم",
           "กรุงเทพมหานคร", "🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙", "👨‍👩‍👧‍👦 family", "café", "cafe\u0301", "Å Å Å",
           "ﬁ ligature", "½ ² ⅷ", "\u00a0non-breaking\u2003em space", "zero\u200bwidth", "한국어 텍스트"]
WHITESPACE = [" ", "  ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t \n", "     ", "\n \n\n \n\n\n \t \t\t \t\n"]


def varied_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = [
        lambda: " ".join(rng.choices(KJV, k=rng.randint(1, 30))),
        lambda: rng.choice(CODE),
        lambda: rng.choice(UNICODE),
        lambda: rng.choice(WHITESPACE) * rng.randint(1, 4),
        lambda: str(rng.randint(0, 10 ** rng.randint(1, 12))) + rng.choice(["", ".", "..", "3.3", ",000", " 33"]),
        lambda: "".join(chr(rng.randint(32, 126)) for _ in range(rng.randint(1, 40))),
        lambda: rng.randbytes(rng.randint(1, 24)).decode("utf-8", errors="replace"),
        lambda: rng.randbytes(rng.randint(1, 24)).decode("latin-1"),
        lambda: "".join(chr(rng.randint(0x80, 0x2FFF)) for _ in range(rng.randint(1, 10))),
        lambda: rng.choice(SPECIAL_TOKENS),
        lambda: rng.choice(["<|endof", "<|response|", "|>", "<|", "<|endoftext|><|endoftext|>", "< |system|>"]),
    ]
    return ["".join(rng.choice(pieces)() for _ in range(rng.randint(1, 6))) for _ in range(count)]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "dots1-tiny.gguf"
    hf_to_gguf.write_dots1_gguf(EMBEDDED_MODEL_DIR, path)
    return path


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def tokenizer(gguf_file):
    return tokenizer_from_gguf(read_metadata(gguf_file))


def written_with(tmp_path: Path, overrides: dict) -> Path:
    path = tmp_path / "edited.gguf"
    hf_to_gguf.write_dots1_gguf(EMBEDDED_MODEL_DIR, path, overrides=overrides)
    return path


def test_encode_and_decode_equal_the_hf_tokenizer(tokenizer, hf_tokenizer):
    strings = varied_strings(3000)
    expected = hf_tokenizer(strings, add_special_tokens=False)["input_ids"]
    assert tokenizer(strings, add_special_tokens=False)["input_ids"] == expected
    for skip in (False, True):
        assert tokenizer.batch_decode(expected, skip_special_tokens=skip) == hf_tokenizer.batch_decode(
            expected, skip_special_tokens=skip)
    rng = random.Random(1)
    random_ids = [[rng.randrange(len(hf_tokenizer)) for _ in range(rng.randint(1, 20))] for _ in range(500)]
    assert tokenizer.batch_decode(random_ids) == hf_tokenizer.batch_decode(random_ids)


def test_special_tokens_and_no_bos(tokenizer, hf_tokenizer):
    assert len(tokenizer) == len(hf_tokenizer) == 4096
    assert tokenizer.added_tokens_decoder == hf_tokenizer.added_tokens_decoder
    assert tokenizer.all_special_ids == hf_tokenizer.all_special_ids
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|endofresponse|>", "<|endoftext|>")
    assert tokenizer.bos_token is None
    assert tokenizer.add_bos_token is False
    assert tokenizer("And God said").input_ids == hf_tokenizer("And God said").input_ids
    assert tokenizer.model_max_length == hf_tokenizer.model_max_length == 2048


CONVERSATIONS = [
    [{"role": "user", "content": "Who begat Enos?"}],
    [{"role": "system", "content": "Answer in the words of the King James Bible."},
     {"role": "user", "content": "What was in the beginning?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋\n"},
     {"role": "assistant", "content": "And there was light."},
     {"role": "user", "content": [{"type": "text", "text": "More"}, {"type": "text", "text": "世界"}]}],
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_gives_the_same_ids(tokenizer, hf_tokenizer, add_generation_prompt):
    for messages in CONVERSATIONS:
        expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                    tokenize=True, return_dict=False)
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             tokenize=True, return_dict=False) == expected


def test_declared_bos_is_ignored_and_reported(tmp_path):
    path = written_with(tmp_path, {"tokenizer.ggml.bos_token_id": 11})
    metadata = read_metadata(path)
    tokenizer = tokenizer_from_gguf(metadata)
    assert ignored_bos_token_id(metadata) == 11
    assert tokenizer.bos_token is None
    assert tokenizer("In the beginning").input_ids[0] != 11
    assert ignored_bos_token_id(read_metadata(written_with(tmp_path, {"tokenizer.ggml.bos_token_id": -1}))) is None


def test_eos_token_ids(gguf_file, tmp_path):
    assert ignored_bos_token_id(read_metadata(gguf_file)) is None
    assert gguf_eos_token_ids(read_metadata(gguf_file)) == [4095, 4089]
    assert gguf_eos_token_ids(read_metadata(written_with(tmp_path, {"tokenizer.ggml.eos_token_id": 4089}))) == [
        4089, 4095]


@pytest.mark.parametrize(("key", "value"), [("tokenizer.ggml.pre", "llama-bpe"), ("tokenizer.ggml.pre", None),
                                            ("tokenizer.ggml.model", "llama")])
def test_unknown_tokenizer_is_refused(tmp_path, key, value):
    path = written_with(tmp_path, {key: value})
    with pytest.raises(ValueError, match=rf"edited\.gguf: {key.replace('.', '[.]')} {value!r}"):
        tokenizer_from_gguf(read_metadata(path))
