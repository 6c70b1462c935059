"""GGUF test inputs: scripts/hf_to_gguf.py as a module, and random Dots1 checkpoints with the embedded tokenizer."""
import importlib.util
import shutil
from pathlib import Path
from typing import Any

from random_dots1 import save_random_dots1

from model.embedded import EMBEDDED_MODEL_DIR

HF_TO_GGUF_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "hf_to_gguf.py"


def import_hf_to_gguf():
    spec = importlib.util.spec_from_file_location("hf_to_gguf", HF_TO_GGUF_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hf_to_gguf = import_hf_to_gguf()


def save_random_dots1_with_tokenizer(model_dir: Path, config: dict[str, Any], seed: int = 0) -> None:
    """A random checkpoint (tests/random_dots1.py) that also carries the embedded model's tokenizer."""
    save_random_dots1(model_dir, config, seed)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_MODEL_DIR / name, model_dir / name)
