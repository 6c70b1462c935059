"""Where a safetensors checkpoint's routed-expert tensors go in a layer's ``RoutedExperts`` stacks.

Three layouts, each of which a checkpoint may use: per-expert Linear weights (``experts.E.gate_proj.weight``, what
Hugging Face checkpoints hold), the fused stacks Transformers 5 keeps in memory (``experts.gate_up_proj``
[E, 2I, H] and ``experts.down_proj`` [E, H, I]), and either of them in FP8 with a scale beside every weight
(``..._scale``: per expert, ``gate_up_proj_scale`` [E, 2I, 1] and ``down_proj_scale`` [E, H, 1], or [E, 1, 1] per
tensor, when fused). High-precision weights may be quantized to FP8 as they stream in (an online FP8 scheme).
Each rank reads only its shard: its experts (expert parallel) or its slice of every expert's intermediate size.
"""
from functools import partial

import torch

from model.fp8 import quantize_rows
from model.fp8_storage import quantize_full_rows, read_scale, scale_shapes
from model.routed_experts import RoutedExperts
from model.weights import FLOAT, FLOAT8, SCALE, CheckpointTensor, WeightTarget


class ExpertWeightLoader:
    """Loads checkpoint tensors of every layout into one layer's experts."""

    def __init__(self, experts: RoutedExperts) -> None:
        self.experts = experts

    @property
    def _quantize_on_load(self) -> bool:
        return self.experts.fp8 is not None and self.experts.fp8.online

    def _rows(self, start: int = 0) -> slice:
        """This rank's rows of one gate or up projection that begins at row ``start`` of its tensor."""
        start += self.experts.inter_start
        return slice(start, start + self.experts.local_intermediate)

    def _half(self, half: int) -> slice:
        """Rows of the gate (0) or up (1) half in a local ``w13`` stack."""
        inter = self.experts.local_intermediate
        return slice(half * inter, (half + 1) * inter)

    def _local_experts(self) -> list[tuple[int, slice]]:
        """(local expert, its slice of a fused tensor's expert dim)."""
        start = self.experts.expert_start
        return [(local, slice(start + local, start + local + 1)) for local in range(self.experts.num_local_experts)]

    def _store_gate_up(self, local_expert: int, half: int, part: torch.Tensor) -> None:
        experts = self.experts
        if self._quantize_on_load:
            part, scale = quantize_rows(part.to(experts.w13.device))
            experts.w13_scale.data[local_expert, self._half(half)].copy_(scale)
        experts.w13.data[local_expert, self._half(half)].copy_(part)

    def _store_down(self, local_expert: int, source: CheckpointTensor, *expert: slice) -> None:
        experts = self.experts
        if self._quantize_on_load:  # a row's scale covers all its columns, on every rank
            part, scale = quantize_full_rows(source, self._rows(), *expert, device=experts.w2.device)
            experts.w2_scale.data[local_expert].copy_(scale.reshape(-1))
            experts.w2.data[local_expert].copy_(part.reshape(experts.w2.shape[1:]))
            return
        part = source.read(*expert, slice(None), self._rows())
        experts.w2.data[local_expert].copy_(part.reshape(experts.w2.shape[1:]))

    def _scale(self, source: CheckpointTensor, rows: slice, *expert: slice) -> torch.Tensor:
        return read_scale(source, self.experts.fp8.weight_strategy, rows, *expert)

    def load_gate_or_up(self, expert: int, half: int, source: CheckpointTensor) -> None:
        self._store_gate_up(expert - self.experts.expert_start, half, source.read(self._rows()))

    def load_gate_or_up_scale(self, expert: int, half: int, source: CheckpointTensor) -> None:
        local_expert = expert - self.experts.expert_start
        self.experts.w13_scale.data[local_expert, self._half(half)].copy_(self._scale(source, self._rows()))

    def load_down(self, expert: int, source: CheckpointTensor) -> None:
        self._store_down(expert - self.experts.expert_start, source)

    def load_down_scale(self, expert: int, source: CheckpointTensor) -> None:
        scale = self._scale(source, slice(0, self.experts.hidden_size))
        self.experts.w2_scale.data[expert - self.experts.expert_start].copy_(scale)

    def load_fused_gate_up(self, source: CheckpointTensor) -> None:
        for local_expert, expert in self._local_experts():
            for half in (0, 1):
                part = source.read(expert, self._rows(half * self.experts.intermediate_size))[0]
                self._store_gate_up(local_expert, half, part)

    def load_fused_gate_up_scale(self, source: CheckpointTensor) -> None:
        for local_expert, expert in self._local_experts():
            for half in (0, 1):
                scale = self._scale(source, self._rows(half * self.experts.intermediate_size), expert)[0]
                self.experts.w13_scale.data[local_expert, self._half(half)].copy_(scale)

    def load_fused_down(self, source: CheckpointTensor) -> None:
        for local_expert, expert in self._local_experts():
            self._store_down(local_expert, source, expert)

    def load_fused_down_scale(self, source: CheckpointTensor) -> None:
        for local_expert, expert in self._local_experts():
            scale = self._scale(source, slice(0, self.experts.hidden_size), expert)[0]
            self.experts.w2_scale.data[local_expert].copy_(scale)

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        """Per-expert keys and the fused ones, which stand for all of the layer's per-expert weights (and scales)."""
        experts = self.experts
        inter, hidden, count = experts.intermediate_size, experts.hidden_size, experts.num_experts
        fp8 = experts.fp8
        prequantized = fp8 is not None and not fp8.online
        weight_dtypes = FLOAT8 if prequantized else FLOAT
        targets: dict[str, WeightTarget] = {}
        per_expert: dict[str, list[str]] = {"gate_up_proj": [], "down_proj": [], "gate_up_proj_scale": [],
                                            "down_proj_scale": []}
        for expert in range(count):
            local = experts.expert_start <= expert < experts.expert_start + experts.num_local_experts
            for half, name in enumerate(("gate_proj", "up_proj", "down_proj")):
                is_down = name == "down_proj"
                fused = "down_proj" if is_down else "gate_up_proj"
                shape = (hidden, inter) if is_down else (inter, hidden)
                load = partial(self.load_down, expert) if is_down else partial(self.load_gate_or_up, expert, half)
                key = f"{prefix}.{expert}.{name}.weight"
                targets[key] = WeightTarget(shape, load if local else None, (key,), weight_dtypes)
                per_expert[fused].append(key)
                if prequantized:
                    load_scale = (partial(self.load_down_scale, expert) if is_down
                                  else partial(self.load_gate_or_up_scale, expert, half))
                    first, *others = scale_shapes(fp8.weight_strategy, shape[0])
                    targets[f"{key}_scale"] = WeightTarget(first, load_scale if local else None, (f"{key}_scale",),
                                                           SCALE, tuple(others))
                    per_expert[f"{fused}_scale"].append(f"{key}_scale")
        fused_layout = {"gate_up_proj": ((count, 2 * inter, hidden), self.load_fused_gate_up,
                                         self.load_fused_gate_up_scale),
                        "down_proj": ((count, hidden, inter), self.load_fused_down, self.load_fused_down_scale)}
        for name, (shape, load, load_scale) in fused_layout.items():
            key = f"{prefix}.{name}"
            targets[key] = WeightTarget(shape, load, tuple(per_expert[name]), weight_dtypes)
            if prequantized:
                first, *others = scale_shapes(fp8.weight_strategy, shape[1], count)
                targets[f"{key}_scale"] = WeightTarget(first, load_scale, tuple(per_expert[f"{name}_scale"]), SCALE,
                                                       tuple(others))
        return targets
