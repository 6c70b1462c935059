"""Dots1 mixture of experts: fp32 sigmoid router with group-limited top-k, grouped routed experts, shared experts."""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.linear import PACKED_MIN_ROWS, linear, pack_weight
from model.mlp import GatedMLP
from model.parallel import ParallelState
from model.weights import CheckpointTensor, WeightTarget


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
        self.w13: nn.Parameter | nn.ParameterList = nn.Parameter(
            torch.empty(self.num_local_experts, 2 * inter, hidden, dtype=dtype), requires_grad=False)
        self.w2: nn.Parameter | nn.ParameterList = nn.Parameter(
            torch.empty(self.num_local_experts, hidden, inter, dtype=dtype), requires_grad=False)
        # FP8 expert weights (float8_e4m3fn w13/w2) come with per-output-channel fp32 scales [E_local, 2I] and
        # [E_local, H]; None for weights in the compute dtype.
        self.w13_scale: torch.Tensor | None = None
        self.w2_scale: torch.Tensor | None = None
        self.min_rows = 1  # rows per expert group; raised when packed weights run fewer rows slowly

    def forward_fused(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/expert_ids [T, k] -> weighted expert sum [T, H], on the device throughout."""
        from model.kernels.moe.fused_moe import fused_moe

        return fused_moe(x, self.w13, self.w2, weights, expert_ids, expert_start=self.expert_start,
                         w13_scale=self.w13_scale, w2_scale=self.w2_scale)

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
            gate_up = linear(inputs[start:start + rows], self.w13[local_expert])  # [rows, 2 * I]
            gate, up = gate_up.split(self.local_intermediate, dim=-1)
            outputs.append(linear(F.silu(gate) * up, self.w2[local_expert]))
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

    def pack_weights(self) -> None:
        if self.backend == "triton":
            return  # the kernels read the stacked weights
        self.min_rows = PACKED_MIN_ROWS
        w13 = nn.ParameterList([pack_weight(weight) for weight in self.w13])
        w2 = nn.ParameterList([pack_weight(weight) for weight in self.w2])
        del self.w13, self.w2  # frees the stacked tensors
        self.w13, self.w2 = w13, w2

    def load_gate_or_up(self, expert: int, half: int, source: CheckpointTensor) -> None:
        rows = slice(self.inter_start, self.inter_start + self.local_intermediate)
        destination = slice(half * self.local_intermediate, (half + 1) * self.local_intermediate)
        self.w13.data[expert - self.expert_start, destination].copy_(source.read(rows))

    def load_down(self, expert: int, source: CheckpointTensor) -> None:
        columns = slice(self.inter_start, self.inter_start + self.local_intermediate)
        self.w2.data[expert - self.expert_start].copy_(source.read(slice(None), columns))

    def load_fused_gate_up(self, source: CheckpointTensor) -> None:
        for local_expert in range(self.num_local_experts):
            expert = slice(self.expert_start + local_expert, self.expert_start + local_expert + 1)
            for half in (0, 1):
                start = half * self.intermediate_size + self.inter_start
                destination = slice(half * self.local_intermediate, (half + 1) * self.local_intermediate)
                part = source.read(expert, slice(start, start + self.local_intermediate))[0]
                self.w13.data[local_expert, destination].copy_(part)

    def load_fused_down(self, source: CheckpointTensor) -> None:
        columns = slice(self.inter_start, self.inter_start + self.local_intermediate)
        for local_expert in range(self.num_local_experts):
            expert = slice(self.expert_start + local_expert, self.expert_start + local_expert + 1)
            self.w2.data[local_expert].copy_(source.read(expert, slice(None), columns)[0])

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        """Per-expert keys (what checkpoints hold) and the fused layout Transformers 5 keeps in memory."""
        inter, hidden = self.intermediate_size, self.hidden_size
        targets: dict[str, WeightTarget] = {}
        gate_up_keys, down_keys = [], []
        for expert in range(self.num_experts):
            local = self.expert_start <= expert < self.expert_start + self.num_local_experts
            for half, name in enumerate(("gate_proj", "up_proj")):
                key = f"{prefix}.{expert}.{name}.weight"
                gate_up_keys.append(key)
                targets[key] = WeightTarget((inter, hidden), partial(self.load_gate_or_up, expert, half)
                                            if local else None, (key,))
            key = f"{prefix}.{expert}.down_proj.weight"
            down_keys.append(key)
            targets[key] = WeightTarget((hidden, inter), partial(self.load_down, expert) if local else None, (key,))
        targets[f"{prefix}.gate_up_proj"] = WeightTarget((self.num_experts, 2 * inter, hidden),
                                                         self.load_fused_gate_up, tuple(gate_up_keys))
        targets[f"{prefix}.down_proj"] = WeightTarget((self.num_experts, hidden, inter), self.load_fused_down,
                                                      tuple(down_keys))
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
        if self.experts.backend == "triton":
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
