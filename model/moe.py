"""Dots1 mixture of experts: fp32 sigmoid router with group-limited top-k, routed experts run by the model's MoE
backend, shared experts."""
from functools import partial

import torch
from torch import nn

from model.config import ModelConfig
from model.expert_loading import ExpertWeightLoader
from model.linear import linear, pack_weight
from model.mlp import GatedMLP
from model.moe_backend import MoEBackend, TorchMoEBackend
from model.parallel import ParallelState
from model.routed_experts import RoutedExperts
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


class Dots1MoE(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState, dtype: torch.dtype,
                 count_experts: bool = False, backend: MoEBackend | None = None) -> None:
        super().__init__()
        self.parallel = parallel
        self.backend: MoEBackend = backend or TorchMoEBackend()
        self.gate = TopKRouter(config)
        self.experts = RoutedExperts(config, parallel, dtype)
        self.shared_experts = None
        if config.n_shared_experts > 0:
            self.shared_experts = GatedMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                                           parallel, dtype, reduce_output=False)
        # [E] int64 token-expert pairs since the model last handed them out; None when not counting.
        self.expert_counts = (nn.Buffer(torch.zeros(config.n_routed_experts, dtype=torch.int64), persistent=False)
                              if count_experts else None)

    def forward(self, x: torch.Tensor, real_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] -> [T, H]. ``real_tokens`` ([1] int64 on x's device): only the first that many rows are tokens,
        the rest pad a captured graph's batch and are left out of the expert counts (None: every row is a token)."""
        weights, expert_ids = self.gate(x)
        if self.expert_counts is not None:
            self._count(expert_ids, real_tokens)
        out = self.backend.compute(self.experts, x, weights, expert_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return self.parallel.all_reduce(out)

    def _count(self, expert_ids: torch.Tensor, real_tokens: torch.Tensor | None) -> None:
        """Adds the real tokens' pairs to ``expert_counts`` with fixed-shape ops (no host sync, graph-safe)."""
        num_tokens, top_k = expert_ids.shape
        if real_tokens is None:
            pair_is_real = torch.ones(num_tokens * top_k, dtype=torch.int64, device=expert_ids.device)
        else:
            token_is_real = torch.arange(num_tokens, device=expert_ids.device) < real_tokens  # [T]
            pair_is_real = token_is_real[:, None].expand(num_tokens, top_k).reshape(-1).long()  # [T * k]
        self.expert_counts.scatter_add_(0, expert_ids.reshape(-1), pair_is_real)

    def pack_weights(self) -> None:
        self.backend.prepare_weights(self.experts)

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        targets = self.gate.weight_targets(f"{prefix}.gate")
        targets |= ExpertWeightLoader(self.experts).weight_targets(f"{prefix}.experts")
        if self.shared_experts is not None:
            return targets | self.shared_experts.weight_targets(f"{prefix}.shared_experts")
        # Transformers builds (and saves) zero-width shared experts when n_shared_experts is 0; they add nothing.
        hidden = self.experts.hidden_size
        for name, shape in (("gate_proj", (0, hidden)), ("up_proj", (0, hidden)), ("down_proj", (hidden, 0))):
            targets[f"{prefix}.shared_experts.{name}.weight"] = WeightTarget(shape, None, ())
        return targets
