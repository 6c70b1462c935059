"""Dots1 mixture of experts: fp32 sigmoid router with group-limited top-k, grouped routed experts, shared experts."""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.fp8 import FP8_DTYPE, dequantize, quantize_rows
from model.fp8_storage import new_weight, quantize_full_rows, read_scale, scale_shapes
from model.kernels.cpu.qmoe import qmoe
from model.linear import PACKED_MIN_ROWS, linear, pack_weight
from model.mlp import GatedMLP
from model.parallel import ParallelState
from model.quant.packed import PackedQuantWeight
from model.quant.parts import bytes_by_type
from model.quantization import Fp8Scheme
from model.weights import FLOAT, FLOAT8, SCALE, CheckpointTensor, WeightTarget


class TopKRouter(nn.Module):
    """Picks experts with ``sigmoid(x W^T) + e_score_correction_bias``, weighs them with the unbiased scores."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32),
                                   requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(self.num_experts, dtype=torch.float32),
                                                    requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (combine weights [T, k] float32, expert ids [T, k] int64)."""
        scores = linear(x.float(), self.weight).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias
        if self.topk_group < self.n_group:
            choice = self._mask_unpicked_groups(choice)
        expert_ids = choice.topk(self.top_k, dim=-1, sorted=False).indices  # [T, k]
        weights = scores.gather(1, expert_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, expert_ids

    def _mask_unpicked_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keeps the topk_group groups whose two best biased scores sum highest; the rest can't be chosen."""
        num_tokens = choice.shape[0]
        grouped = choice.view(num_tokens, self.n_group, -1)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        picked = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, picked, True)  # [T, G]
        return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(num_tokens, -1)

    def pack_weights(self) -> None:
        self.weight = pack_weight(self.weight)

    def weight_loader(self, param: nn.Parameter, source: CheckpointTensor) -> None:
        param.data.copy_(source.read())

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        weight_key, bias_key = f"{prefix}.weight", f"{prefix}.e_score_correction_bias"
        return {
            weight_key: WeightTarget(tuple(self.weight.shape), partial(self.weight_loader, self.weight),
                                     (weight_key,)),
            bias_key: WeightTarget((self.num_experts,), partial(self.weight_loader, self.e_score_correction_bias),
                                   (bias_key,)),
        }


class RoutedExperts(nn.Module):
    """A layer's routed experts.

    Tensor parallel splits each expert's intermediate size; expert parallel gives each rank whole experts (pairs
    routed to other ranks' experts add nothing here). Two backends over the same stacked weights:
    - "torch" (the reference, and the CPU path): token-expert pairs are grouped by expert and only experts that
      received tokens run, one matmul pair each; counting the pairs needs one host read per layer.
    - "triton": ``fused_moe`` (align, two grouped GEMMs, combine), sized from host-known shapes: no host sync.
    On the CPU the weights may instead be packed integer stacks (``use_quantized``: GGUF files, --quantization
    int8/int4), each of gate, up and down in its own format, run by one fused kernel call per layer (``qmoe``).
    """

    def __init__(self, config: ModelConfig, parallel: ParallelState, dtype: torch.dtype,
                 backend: str = "torch") -> None:
        super().__init__()
        if backend not in ("torch", "triton"):
            raise ValueError(f"unknown MoE backend {backend!r}: use torch or triton")
        self.backend = backend
        self.num_experts = config.n_routed_experts
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.moe_intermediate_size
        if parallel.expert_parallel:
            self.expert_start, self.num_local_experts = parallel.shard(self.num_experts, "n_routed_experts")
            self.inter_start, self.local_intermediate = 0, self.intermediate_size
        else:
            self.expert_start, self.num_local_experts = 0, self.num_experts
            self.inter_start, self.local_intermediate = parallel.shard(self.intermediate_size, "moe_intermediate_size")
        inter, hidden = self.local_intermediate, self.hidden_size
        # Stacked gate-and-up [E_local, 2I, H] (gate rows before up rows) and down [E_local, H, I] weights: what the
        # grouped-GEMM kernels read. Loading fills per-expert views; on the CPU, pack_weights replaces each with a
        # list of per-expert oneDNN-packed weights (same indexing: w13[e] is expert e's [2I, H]).
        # With FP8 (``use_fp8``) both are float8 with float32 per-output-row scales w13_scale [E_local, 2I] and
        # w2_scale [E_local, H].
        self.compute_dtype = dtype
        self.w13: nn.Parameter | nn.ParameterList = new_weight((self.num_local_experts, 2 * inter, hidden), dtype)
        self.w2: nn.Parameter | nn.ParameterList = new_weight((self.num_local_experts, hidden, inter), dtype)
        self.w13_scale: nn.Parameter | None = None
        self.w2_scale: nn.Parameter | None = None
        self.fp8: Fp8Scheme | None = None
        self.min_rows = 1  # rows per expert group; raised when packed weights run fewer rows slowly
        # "gate"/"up" [E_local, I, H] and "down" [E_local, H, I] packed stacks, or None
        self.quantized: dict[str, PackedQuantWeight] | None = None
        self.quant_types: list[str] = []

    def use_quantized(self, stacks: dict[str, PackedQuantWeight], types: list[str]) -> None:
        """Serves the experts from packed integer stacks (single rank); the float stacks are dropped."""
        self.quantized, self.quant_types = stacks, types
        self.w13 = new_weight((0, 2 * self.local_intermediate, self.hidden_size), self.compute_dtype, "cpu")
        self.w2 = new_weight((0, self.hidden_size, self.local_intermediate), self.compute_dtype, "cpu")

    def quantized_bytes_by_type(self) -> dict[str, int]:
        if self.quantized is None:
            return {}
        return bytes_by_type([self.quantized[part] for part in ("gate", "up", "down")], self.quant_types)

    def forward_quantized(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/expert_ids [T, k] -> weighted expert sum [T, H], in one kernel call."""
        stacks = self.quantized
        return qmoe(x, expert_ids, weights, stacks["gate"], stacks["up"], stacks["down"],
                    expert_start=self.expert_start).to(x.dtype)

    def forward_fused(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/expert_ids [T, k] -> weighted expert sum [T, H], on the device throughout."""
        from model.kernels.moe.fused_moe import fused_moe

        weight_only = self.fp8 is not None and not self.fp8.dynamic_activations
        return fused_moe(x, self.w13, self.w2, weights, expert_ids, expert_start=self.expert_start,
                         w13_scale=self.w13_scale, w2_scale=self.w2_scale,
                         quantize_activations=False if weight_only else None)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                pair_counts: torch.Tensor) -> torch.Tensor:
        """The torch backend. x [T, H], weights/expert_ids [T, k], pair_counts [E] (pairs per expert) -> weighted
        expert sum [T, H]."""
        num_tokens, top_k = expert_ids.shape
        flat_ids = expert_ids.view(-1)
        order = flat_ids.argsort(stable=True)  # [T * k] pairs grouped by expert
        counts = pair_counts.tolist()
        local = slice(self.expert_start, self.expert_start + self.num_local_experts)
        first = sum(counts[:self.expert_start])
        local_order = order[first:first + sum(counts[local])]  # [P] this rank's pairs
        group_rows = [max(count, self.min_rows) if count else 0 for count in counts[local]]
        row = self._rows_of_pairs(flat_ids[local_order] - self.expert_start, pair_counts[local], group_rows)  # [P]
        # Each expert's pairs fill one group of rows (padding rows repeat token 0; their outputs are never read).
        total_rows = sum(group_rows)
        token_of_row = torch.zeros(total_rows, dtype=torch.int64, device=x.device)
        inputs = x.index_select(0, token_of_row.index_copy_(0, row, local_order // top_k))  # [R, H]
        outputs, start = [], 0
        for local_expert, rows in enumerate(group_rows):
            if rows == 0:
                continue
            gate_up = linear(inputs[start:start + rows], self._weight(self.w13, self.w13_scale, local_expert))
            gate, up = gate_up.split(self.local_intermediate, dim=-1)  # [rows, I] each
            outputs.append(linear(F.silu(gate) * up, self._weight(self.w2, self.w2_scale, local_expert)))
            start += rows
        outputs.append(x.new_zeros(1, x.shape[1]))  # row R: what pairs of other ranks' experts read
        row_of_pair = torch.full((num_tokens * top_k,), total_rows, dtype=torch.int64, device=x.device)
        per_pair = torch.cat(outputs).index_select(0, row_of_pair.index_copy_(0, local_order, row))  # [T * k, H]
        return (per_pair.view(num_tokens, top_k, -1) * weights[:, :, None]).sum(dim=1).to(x.dtype)

    @staticmethod
    def _rows_of_pairs(expert_of_pair: torch.Tensor, pair_counts: torch.Tensor, group_rows: list[int]) -> torch.Tensor:
        """Row of each expert-sorted pair in the buffer where expert e's pairs start at sum(group_rows[:e])."""
        group_rows_t = torch.tensor(group_rows, device=pair_counts.device)
        group_start = group_rows_t.cumsum(0) - group_rows_t  # [E_local]
        pairs_before = pair_counts.cumsum(0) - pair_counts  # [E_local]
        rank_in_group = torch.arange(len(expert_of_pair), device=pair_counts.device) - pairs_before[expert_of_pair]
        return group_start[expert_of_pair] + rank_in_group

    def _weight(self, weights: torch.Tensor, scales: torch.Tensor | None, local_expert: int) -> torch.Tensor:
        """Expert ``local_expert``'s weight for ``linear``: FP8 ones dequantized, one expert at a time."""
        if scales is None:
            return weights[local_expert]
        return dequantize(weights[local_expert], scales[local_expert], self.compute_dtype)

    def allocate_weight(self, device: torch.device | str) -> None:
        """Real storage in the compute dtype for weights created deferred."""
        self.w13 = new_weight(tuple(self.w13.shape), self.compute_dtype, device)
        self.w2 = new_weight(tuple(self.w2.shape), self.compute_dtype, device)

    def use_fp8(self, scheme: Fp8Scheme, device: torch.device | str) -> None:
        experts, two_inter, hidden = self.w13.shape
        self.w13 = new_weight((experts, two_inter, hidden), FP8_DTYPE, device)
        self.w2 = new_weight((experts, hidden, two_inter // 2), FP8_DTYPE, device)
        self.w13_scale = new_weight((experts, two_inter), torch.float32, device)
        self.w2_scale = new_weight((experts, hidden), torch.float32, device)
        self.fp8 = scheme

    def checkpoint_module_names(self, prefix: str) -> list[str]:
        """The checkpoint's Linear module names of these experts (what a quantization_config's ignore names)."""
        return [f"{prefix}.{expert}.{name}" for expert in range(self.num_experts)
                for name in ("gate_proj", "up_proj", "down_proj")]

    def pack_weights(self) -> None:
        if self.backend == "triton" or self.quantized is not None:
            return  # the kernels read the stacked weights
        if self.fp8 is not None:  # oneDNN has no float8 weights: FP8 experts dequantize one expert at a time
            return
        self.min_rows = PACKED_MIN_ROWS
        w13 = nn.ParameterList([pack_weight(weight) for weight in self.w13])
        w2 = nn.ParameterList([pack_weight(weight) for weight in self.w2])
        del self.w13, self.w2  # frees the stacked tensors
        self.w13, self.w2 = w13, w2

    @property
    def _quantize_on_load(self) -> bool:
        return self.fp8 is not None and self.fp8.online

    def _store_gate_up(self, local_expert: int, half: int, part: torch.Tensor) -> None:
        destination = slice(half * self.local_intermediate, (half + 1) * self.local_intermediate)
        if self._quantize_on_load:
            part, scale = quantize_rows(part.to(self.w13.device))
            self.w13_scale.data[local_expert, destination].copy_(scale)
        self.w13.data[local_expert, destination].copy_(part)

    def _store_down(self, local_expert: int, source: CheckpointTensor, *expert: slice) -> None:
        columns = slice(self.inter_start, self.inter_start + self.local_intermediate)
        if self._quantize_on_load:  # a row's scale covers all its columns, on every rank
            part, scale = quantize_full_rows(source, columns, *expert, device=self.w2.device)
            self.w2_scale.data[local_expert].copy_(scale.reshape(-1))
            self.w2.data[local_expert].copy_(part.reshape(self.w2.shape[1:]))
            return
        self.w2.data[local_expert].copy_(source.read(*expert, slice(None), columns).reshape(self.w2.shape[1:]))

    def load_gate_or_up(self, expert: int, half: int, source: CheckpointTensor) -> None:
        rows = slice(self.inter_start, self.inter_start + self.local_intermediate)
        self._store_gate_up(expert - self.expert_start, half, source.read(rows))

    def load_gate_or_up_scale(self, expert: int, half: int, source: CheckpointTensor) -> None:
        rows = slice(self.inter_start, self.inter_start + self.local_intermediate)
        destination = slice(half * self.local_intermediate, (half + 1) * self.local_intermediate)
        scale = read_scale(source, self.fp8.weight_strategy, rows)
        self.w13_scale.data[expert - self.expert_start, destination].copy_(scale)

    def load_down(self, expert: int, source: CheckpointTensor) -> None:
        self._store_down(expert - self.expert_start, source)

    def load_down_scale(self, expert: int, source: CheckpointTensor) -> None:
        scale = read_scale(source, self.fp8.weight_strategy, slice(0, self.hidden_size))
        self.w2_scale.data[expert - self.expert_start].copy_(scale)

    def _local_experts(self) -> list[tuple[int, slice]]:
        """(local expert, its slice of a fused tensor's expert dim)."""
        return [(local, slice(self.expert_start + local, self.expert_start + local + 1))
                for local in range(self.num_local_experts)]

    def load_fused_gate_up(self, source: CheckpointTensor) -> None:
        for local_expert, expert in self._local_experts():
            for half in (0, 1):
                start = half * self.intermediate_size + self.inter_start
                part = source.read(expert, slice(start, start + self.local_intermediate))[0]
                self._store_gate_up(local_expert, half, part)

    def load_fused_gate_up_scale(self, source: CheckpointTensor) -> None:
        for local_expert, expert in self._local_experts():
            for half in (0, 1):
                start = half * self.intermediate_size + self.inter_start
                rows = slice(start, start + self.local_intermediate)
                destination = slice(half * self.local_intermediate, (half + 1) * self.local_intermediate)
                scale = read_scale(source, self.fp8.weight_strategy, rows, expert)[0]
                self.w13_scale.data[local_expert, destination].copy_(scale)

    def load_fused_down(self, source: CheckpointTensor) -> None:
        for local_expert, expert in self._local_experts():
            self._store_down(local_expert, source, expert)

    def load_fused_down_scale(self, source: CheckpointTensor) -> None:
        for local_expert, expert in self._local_experts():
            scale = read_scale(source, self.fp8.weight_strategy, slice(0, self.hidden_size), expert)[0]
            self.w2_scale.data[local_expert].copy_(scale)

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        """Per-expert keys (what checkpoints hold) and the fused layout Transformers 5 keeps in memory.

        From an FP8 checkpoint every weight comes with its scale: ``...experts.E.down_proj.weight_scale`` per expert,
        ``gate_up_proj_scale`` [E, 2I, 1] and ``down_proj_scale`` [E, H, 1] ([E, 1, 1] per tensor) when fused.
        """
        inter, hidden, experts = self.intermediate_size, self.hidden_size, self.num_experts
        prequantized = self.fp8 is not None and not self.fp8.online
        weight_dtypes = FLOAT8 if prequantized else FLOAT
        targets: dict[str, WeightTarget] = {}
        # The fused tensors (and their scales) stand for all of the layer's per-expert weights (and scales).
        per_expert: dict[str, list[str]] = {"gate_up_proj": [], "down_proj": [], "gate_up_proj_scale": [],
                                            "down_proj_scale": []}
        for expert in range(experts):
            local = self.expert_start <= expert < self.expert_start + self.num_local_experts
            for half, name in enumerate(("gate_proj", "up_proj", "down_proj")):
                fused = "down_proj" if name == "down_proj" else "gate_up_proj"
                shape = (hidden, inter) if name == "down_proj" else (inter, hidden)
                load = partial(self.load_down, expert) if name == "down_proj" else partial(
                    self.load_gate_or_up, expert, half)
                key = f"{prefix}.{expert}.{name}.weight"
                targets[key] = WeightTarget(shape, load if local else None, (key,), weight_dtypes)
                per_expert[fused].append(key)
                if prequantized:
                    load_scale = partial(self.load_down_scale, expert) if name == "down_proj" else partial(
                        self.load_gate_or_up_scale, expert, half)
                    first, *others = scale_shapes(self.fp8.weight_strategy, shape[0])
                    targets[f"{key}_scale"] = WeightTarget(first, load_scale if local else None, (f"{key}_scale",),
                                                           SCALE, tuple(others))
                    per_expert[f"{fused}_scale"].append(f"{key}_scale")
        fused_layout = {"gate_up_proj": ((experts, 2 * inter, hidden), self.load_fused_gate_up,
                                         self.load_fused_gate_up_scale),
                        "down_proj": ((experts, hidden, inter), self.load_fused_down, self.load_fused_down_scale)}
        for name, (shape, load, load_scale) in fused_layout.items():
            key = f"{prefix}.{name}"
            targets[key] = WeightTarget(shape, load, tuple(per_expert[name]), weight_dtypes)
            if prequantized:
                first, *others = scale_shapes(self.fp8.weight_strategy, shape[1], experts)
                targets[f"{key}_scale"] = WeightTarget(first, load_scale, tuple(per_expert[f"{name}_scale"]), SCALE,
                                                       tuple(others))
        return targets


class Dots1MoE(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState, dtype: torch.dtype,
                 count_experts: bool = False, backend: str = "torch") -> None:
        super().__init__()
        self.parallel = parallel
        self.gate = TopKRouter(config)
        self.experts = RoutedExperts(config, parallel, dtype, backend)
        self.shared_experts = None
        if config.n_shared_experts > 0:
            self.shared_experts = GatedMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                                           parallel, dtype, reduce_output=False)
        # [E] int64 token-expert pairs since the model last handed them out; None when not counting.
        self.expert_counts = (nn.Buffer(torch.zeros(config.n_routed_experts, dtype=torch.int64), persistent=False)
                              if count_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(x)
        if self.experts.quantized is not None:
            if self.expert_counts is not None:
                self.expert_counts += torch.bincount(expert_ids.view(-1), minlength=self.experts.num_experts)
            out = self.experts.forward_quantized(x, weights, expert_ids)
        elif self.experts.backend == "triton":
            if self.expert_counts is not None:  # scatter_add_: fixed shape, no sync (bincount may sync on CUDA)
                flat_ids = expert_ids.view(-1)
                self.expert_counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
            out = self.experts.forward_fused(x, weights, expert_ids)
        else:
            pair_counts = torch.bincount(expert_ids.view(-1), minlength=self.experts.num_experts)  # [E]
            if self.expert_counts is not None:
                self.expert_counts += pair_counts
            out = self.experts(x, weights, expert_ids, pair_counts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return self.parallel.all_reduce(out)

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        targets = self.gate.weight_targets(f"{prefix}.gate") | self.experts.weight_targets(f"{prefix}.experts")
        if self.shared_experts is not None:
            return targets | self.shared_experts.weight_targets(f"{prefix}.shared_experts")
        # Transformers builds (and saves) zero-width shared experts when n_shared_experts is 0; they add nothing.
        hidden = self.experts.hidden_size
        for name, shape in (("gate_proj", (0, hidden)), ("up_proj", (0, hidden)), ("down_proj", (hidden, 0))):
            targets[f"{prefix}.shared_experts.{name}.weight"] = WeightTarget(shape, None, ())
        return targets
