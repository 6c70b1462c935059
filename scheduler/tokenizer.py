"""Loads a checkpoint's own tokenizer from its local directory, or from a GGUF file's metadata (never from the
network)."""
import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    if str(model_dir).endswith(".gguf"):
        return _load_gguf_tokenizer(Path(model_dir))
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{model_dir}: cannot load the tokenizer ({error})") from error


def _load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from model.gguf.reader import read_metadata
    from model.gguf.tokenizer import ignored_bos_token_id, tokenizer_from_gguf

    metadata = read_metadata(path)
    ignored = ignored_bos_token_id(metadata)
    if ignored is not None:
        logger.info("%s: not prepending the declared BOS token id %d (published dots1 GGUFs carry a wrong one; "
                    "dots.llm1 has none, as llama.cpp users set with --override-kv tokenizer.ggml.bos_token_id=int:-1)",
                    path.name, ignored)
    return tokenizer_from_gguf(metadata)
