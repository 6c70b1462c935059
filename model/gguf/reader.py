"""Opening a dots1 GGUF file (or a split set) with the `gguf` package, refusing what this engine cannot run.

The tensors stay memory-mapped: a tensor's bytes are read when the loader converts it, one tensor at a time.
"""
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderField, ReaderTensor

ARCHITECTURE = "dots1"
_SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
# The tensor types this engine converts (model.gguf.blocks); anything else is refused at start-up.
SUPPORTED_TYPES = frozenset({
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
})


def is_gguf_path(path: str | Path) -> bool:
    return str(path).endswith(".gguf")


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order (slowest first): [out, in], or [experts, out, in]
    data: np.ndarray  # memory-mapped: F32/F16 typed, everything else uint8 bytes with the last dim in bytes
    file: Path

    @property
    def type_name(self) -> str:
        return self.qtype.name

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class _CheckedReader(GGUFReader):
    """GGUFReader that names the file and tensor when a tensor's type is unknown or its bytes run past the end."""

    def __init__(self, path: Path) -> None:
        self._path = path
        super().__init__(path, "r")

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        size = len(self.data)
        for field in fields:
            _name_len, name_data, _n_dims, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                qtype = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise ValueError(f"{self._path}: tensor {name!r} has tensor type id {int(raw_dtype[0])}, unknown to "
                                 "this engine's GGUF reader") from None
            if qtype not in SUPPORTED_TYPES:
                raise ValueError(f"{self._path}: tensor {name!r} is {qtype.name}, which this engine does not run "
                                 f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            elements = int(np.prod(dims.astype(np.int64)))
            end = start_offs + int(offset[0]) + elements * type_size // block_size
            if end > size:
                raise ValueError(f"{self._path}: tensor {name!r} ends at byte {end}, past the end of the file "
                                 f"({size} bytes): the file is truncated")
        super()._build_tensors(start_offs, fields)


class GGUFCheckpoint:
    """A dots1 GGUF checkpoint: the metadata of its first file and the tensors of all its split files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        files = split_files(self.path)
        self.readers = [_open(file) for file in files]
        self.metadata = self.readers[0]
        field = self.metadata.get_field("general.architecture")
        architecture = None if field is None else field.contents()
        if architecture != ARCHITECTURE:
            raise ValueError(f"{self.path}: general.architecture is {architecture!r}; this engine runs "
                             f"{ARCHITECTURE!r} (dots.llm1) GGUF files only")
        self.tensors: dict[str, GGUFTensor] = {}
        for file, reader in zip(files, self.readers):
            for tensor in reader.tensors:
                if tensor.name in self.tensors:
                    raise ValueError(f"{file}: tensor {tensor.name!r} is also in {self.tensors[tensor.name].file}")
                self.tensors[tensor.name] = _tensor(tensor, file)

    def type_counts(self) -> dict[str, int]:
        """Tensors per type name, for the start-up log."""
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
        return counts


@dataclass(frozen=True)
class GGUFMetadata:
    """A GGUF file's metadata values and tensor shapes as plain Python: no mapping of the file stays open."""

    path: Path
    values: dict[str, Any]
    tensor_shapes: dict[str, tuple[int, ...]]  # torch order

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def read_metadata(path: str | Path) -> GGUFMetadata:
    """The metadata of a dots1 GGUF file (or split set), validated as ``GGUFCheckpoint`` validates it. Parsing the
    header takes seconds for a 152k-token vocabulary, and the config, the tokenizer and the stop tokens all need it:
    it is parsed once per process and file version."""
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    return _read_metadata(path, stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)


@lru_cache(maxsize=4)
def _read_metadata(path: Path, mtime_ns: int, size: int) -> GGUFMetadata:
    checkpoint = GGUFCheckpoint(path)
    values = {key: field.contents() for key, field in checkpoint.metadata.fields.items()
              if not key.startswith("GGUF.")}
    return GGUFMetadata(checkpoint.path, values, {name: t.shape for name, t in checkpoint.tensors.items()})


def split_files(path: Path) -> list[Path]:
    """The files of a split set given its first file (``*-00001-of-0000N.gguf``), else just ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    match = _SPLIT_NAME.match(path.name)
    if match is None:
        return [path]
    if int(match["index"]) != 1:
        raise ValueError(f"{path}: give the first file of a split GGUF set "
                         f"({match['stem']}-00001-of-{match['count']}.gguf)")
    count = int(match["count"])
    files = [path.with_name(f"{match['stem']}-{index:05d}-of-{count:05d}.gguf") for index in range(1, count + 1)]
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: split GGUF set of {count} files is missing {', '.join(missing)}")
    return files


def _open(path: Path) -> GGUFReader:
    try:
        return _CheckedReader(path)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: not a readable GGUF file "
                         f"({message})") from None
    except (IndexError, OSError, UnicodeDecodeError) as e:  # a header cut short reads past the end of the map
        raise ValueError(f"{path}: not a readable GGUF file, or truncated ({type(e).__name__}: {e})") from None


def _tensor(tensor: ReaderTensor, file: Path) -> GGUFTensor:
    shape = tuple(int(dim) for dim in reversed(tensor.shape.tolist()))
    return GGUFTensor(tensor.name, GGMLQuantizationType(tensor.tensor_type), shape, tensor.data, file)
