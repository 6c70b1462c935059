"""Loads a checkpoint's own tokenizer from its local directory (never from the network)."""
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{model_dir}: cannot load the tokenizer ({error})") from error
