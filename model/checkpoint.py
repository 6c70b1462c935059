"""Finding a checkpoint's safetensors files and reading their headers (names and shapes, no data)."""
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    shape: tuple[int, ...]
    dtype: str = "F32"  # the safetensors dtype name: F32, BF16, F16, F8_E4M3, ...


def read_checkpoint_headers(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint with its file and shape, validated against the index when sharded."""
    single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
    if single.is_file():
        return _read_header(single)
    if not index.is_file():
        found = sorted(p.name for p in model_dir.glob("*.bin")) if model_dir.is_dir() else []
        hint = f" (found {found}: only safetensors checkpoints are supported)" if found else ""
        raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    weight_map = _read_weight_map(index)
    entries: dict[str, TensorEntry] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = model_dir / shard_name
        if not shard.is_file():
            key = next(k for k, v in weight_map.items() if v == shard_name)
            raise FileNotFoundError(f"{index}: points at missing shard {shard_name!r} (for tensor {key!r} and others)")
        for key, entry in _read_header(shard).items():
            if key in entries:
                raise ValueError(f"{shard}: tensor {key!r} also appears in {entries[key].file}")
            entries[key] = entry
    for key, shard_name in weight_map.items():
        if key not in entries or entries[key].file != model_dir / shard_name:
            raise ValueError(f"{index}: lists tensor {key!r} in {shard_name!r}, but that shard does not contain it")
    return entries


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: expected a 'weight_map' object mapping tensor names to shard files")
    return weight_map


def _read_header(path: Path) -> dict[str, TensorEntry]:
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            return {key: TensorEntry(path, tuple(part.get_shape()), part.get_dtype()) for key, part in slices.items()}
    except Exception as e:  # safetensors raises its own error types (and OSError) for unreadable headers
        raise ValueError(f"{path}: corrupt or unreadable safetensors file ({e})") from e
