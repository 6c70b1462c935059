"""How checkpoint tensors reach parameters: lazily read tensors and the parameter each checkpoint key fills."""
from collections.abc import Callable
from dataclasses import dataclass

import torch


class CheckpointTensor:
    """One named checkpoint tensor, read only in the parts this rank needs (safetensors slices are lazy)."""

    def __init__(self, name: str, origin: str, shape: tuple[int, ...],
                 reader: Callable[[tuple[slice, ...]], torch.Tensor]) -> None:
        self.name = name
        self.origin = origin  # the file it lives in, for error messages
        self.shape = shape
        self._reader = reader

    @classmethod
    def from_safetensors_slice(cls, name: str, origin: str, tensor_slice) -> "CheckpointTensor":
        return cls(name, origin, tuple(tensor_slice.get_shape()), lambda index: tensor_slice[index])

    @classmethod
    def from_tensor(cls, name: str, tensor: torch.Tensor, origin: str = "memory") -> "CheckpointTensor":
        return cls(name, origin, tuple(tensor.shape), lambda index: tensor[index])

    def read(self, *index: slice) -> torch.Tensor:
        """The tensor, or the part selected by slices over its leading dimensions."""
        full = tuple(slice(None) for _ in self.shape)
        return self._reader(tuple(index) + full[len(index):])


WeightLoader = Callable[[CheckpointTensor], None]

# What a checkpoint tensor must hold (safetensors dtype names): high-precision values, float8 e4m3 weights, scales.
FLOAT = frozenset({"F32", "BF16", "F16", "F64"})
FLOAT8 = frozenset({"F8_E4M3"})
SCALE = frozenset({"F32", "BF16", "F16"})


@dataclass(frozen=True)
class WeightTarget:
    """Where a checkpoint key goes: its expected full (unsharded) shape, and the loader that copies this rank's part.

    ``covers`` names the canonical keys it satisfies: a fused expert tensor covers every per-expert key of its layer.
    A target with ``load=None`` is accepted and skipped (a tied lm_head, experts owned by other ranks).
    ``dtypes`` are the safetensors dtypes the tensor may have; ``other_shapes`` further shapes it may have (the
    layouts of per-tensor scales).
    """

    shape: tuple[int, ...]
    load: WeightLoader | None
    covers: tuple[str, ...]
    dtypes: frozenset[str] = FLOAT
    other_shapes: tuple[tuple[int, ...], ...] = ()

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        return shape == self.shape or shape in self.other_shapes

