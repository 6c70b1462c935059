"""A checkpoint's generation defaults: which tokens end a turn, and its recommended sampling values."""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


@dataclass
class GenerationDefaults:
    eos_token_ids: list[int] = field(default_factory=list)
    sampling: dict[str, float | int] = field(default_factory=dict)  # only the values the checkpoint sets


def load_generation_defaults(model_dir: str | Path) -> GenerationDefaults:
    """Reads generation_config.json; EOS ids fall back to config.json's eos_token_id when it has none. A GGUF file
    gives its metadata's EOS (see ``model.gguf.tokenizer.gguf_eos_token_ids``) and no sampling defaults."""
    if str(model_dir).endswith(".gguf"):
        from model.gguf.reader import read_metadata
        from model.gguf.tokenizer import gguf_eos_token_ids

        return GenerationDefaults(eos_token_ids=gguf_eos_token_ids(read_metadata(model_dir)))
    model_dir = Path(model_dir)
    generation = _read_json(model_dir / "generation_config.json")
    eos = _token_ids(generation.get("eos_token_id"), model_dir / "generation_config.json")
    if not eos:
        eos = _token_ids(_read_json(model_dir / "config.json").get("eos_token_id"), model_dir / "config.json")
    sampling = {key: generation[key] for key in _SAMPLING_KEYS if generation.get(key) is not None}
    return GenerationDefaults(eos_token_ids=eos, sampling=sampling)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_ids(value: Any, path: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{path}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return list(dict.fromkeys(values))
