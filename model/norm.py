"""RMSNorm as Dots1 computes it: normalise in float32, cast back, then scale by the weight."""
import torch
import torch.nn.functional as F
from torch import nn

from model.weights import CheckpointTensor, WeightTarget


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def weight_loader(self, source: CheckpointTensor) -> None:
        self.weight.data.copy_(source.read())

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        key = f"{prefix}.weight"
        return {key: WeightTarget(tuple(self.weight.shape), self.weight_loader, (key,))}
