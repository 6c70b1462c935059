"""The tokenizer a GGUF file carries in its metadata (``tokenizer.ggml.*``), as a Hugging Face fast tokenizer.

Only GPT-2-style byte-level BPE (``tokenizer.ggml.model = "gpt2"``) with the Qwen2 split regex, which dots1 uses, is
understood; other models or pre-tokenizers are refused rather than guessed. BOS is never used: published dots1 GGUFs
declare BOS = "," (id 11), a converter fallback that derails the model when prepended.
"""
import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from model.gguf.reader import GGUFMetadata

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizer names (src/llama-vocab.cpp) whose split is QWEN2_SPLIT.
SPLIT_REGEX = {name: QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2")}
STOP_TOKENS = ("<|endofresponse|>", "<|endoftext|>")


def tokenizer_from_gguf(metadata: GGUFMetadata) -> PreTrainedTokenizerFast:
    """The file's tokenizer: BPE over its tokens and merges, its added tokens, EOS, padding and chat template."""
    model = metadata.get(gguf.Keys.Tokenizer.MODEL)
    if model != "gpt2":
        raise ValueError(f"{metadata.path}: tokenizer.ggml.model {model!r} is not supported (only 'gpt2', "
                         "byte-level BPE)")
    pre = metadata.get(gguf.Keys.Tokenizer.PRE)
    if pre not in SPLIT_REGEX:
        raise ValueError(f"{metadata.path}: tokenizer.ggml.pre {pre!r} is not a known pre-tokenizer "
                         f"(known: {', '.join(SPLIT_REGEX)})")
    tokens = metadata.get(gguf.Keys.Tokenizer.LIST)
    types = metadata.get(gguf.Keys.Tokenizer.TOKEN_TYPE)
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get(gguf.Keys.Tokenizer.MERGES, [])]
    vocab = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind != gguf.TokenType.UNUSED}

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                                   fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()  # as Qwen2/dots1's tokenizer.json; llama.cpp itself does not normalize
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    added = [AddedToken(tokens[i], special=kind == gguf.TokenType.CONTROL, normalized=False)
             for i, kind in enumerate(types) if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    backend.add_tokens(added)

    def token(key: str) -> str | None:
        token_id = metadata.get(key)
        return None if token_id is None else tokens[token_id]

    eos, pad = token(gguf.Keys.Tokenizer.EOS_ID), token(gguf.Keys.Tokenizer.PAD_ID)
    context_length = metadata.get(f"{metadata.get(gguf.Keys.General.ARCHITECTURE)}.context_length")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=[t.content for t in added if t.special and t.content not in (eos, pad)],
        chat_template=metadata.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE),
        clean_up_tokenization_spaces=False,
        model_max_length=context_length or int(1e30),
    )


def ignored_bos_token_id(metadata: GGUFMetadata) -> int | None:
    """The BOS id the file declares, which the tokenizer never uses (for the loader to log); None if none."""
    token_id = metadata.get(gguf.Keys.Tokenizer.BOS_ID)
    vocab_size = len(metadata.get(gguf.Keys.Tokenizer.LIST))
    return token_id if token_id is not None and 0 <= token_id < vocab_size else None


def gguf_eos_token_ids(metadata: GGUFMetadata) -> list[int]:
    """Ids that end generation: the file's EOS (and EOT), then <|endofresponse|> and <|endoftext|> where present.

    llama.cpp users stop on <|endofresponse|> whatever the EOS key says (ggml-org/llama.cpp#14044); the checkpoint's
    generation_config lists both.
    """
    tokens = metadata.get(gguf.Keys.Tokenizer.LIST)
    declared = [metadata.get(key) for key in (gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.EOT_ID)]
    by_text = [tokens.index(text) for text in STOP_TOKENS if text in tokens]
    return list(dict.fromkeys(token_id for token_id in declared + by_text if token_id is not None))
