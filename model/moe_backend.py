"""The MoE seam: a backend, chosen once at load (``model.backend_selection``), that runs a layer's routed experts.

- ``torch`` (the reference, and the CPU path): token-expert pairs are grouped by expert and only experts that
  received tokens run, one matmul pair each; counting the pairs needs one host read per layer. Packed integer
  stacks (GGUF, --quantization int8/int4) run one fused CPU kernel call per layer instead (``qmoe``).
- ``triton``: ``fused_moe`` (align, two grouped GEMMs, combine), sized from host-known shapes: no host sync, so a
  decode forward can be captured in a CUDA graph.
"""
from typing import Protocol

import torch
import torch.nn.functional as F

from model.kernels.cpu.qmoe import qmoe
from model.linear import linear
from model.routed_experts import RoutedExperts


class MoEBackend(Protocol):
    name: str
    graph_safe: bool  # its compute reads no device value back, so a CUDA graph can capture it

    def compute(self, experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor,
                expert_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], combine weights / expert ids [T, k] -> this rank's weighted expert sum [T, H] in x's dtype."""
        ...

    def prepare_weights(self, experts: RoutedExperts) -> None:
        """Once after loading, on the CPU: lays the weights out the way this backend reads them fastest."""
        ...


class TorchMoEBackend:
    name = "torch"
    graph_safe = False

    def compute(self, experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor,
                expert_ids: torch.Tensor) -> torch.Tensor:
        if experts.quantized is not None:
            stacks = experts.quantized
            return qmoe(x, expert_ids, weights, stacks["gate"], stacks["up"], stacks["down"],
                        expert_start=experts.expert_start).to(x.dtype)
        return grouped_expert_sum(experts, x, weights, expert_ids)

    def prepare_weights(self, experts: RoutedExperts) -> None:
        experts.pack_for_cpu()


class TritonMoEBackend:
    name = "triton"
    graph_safe = True

    def compute(self, experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor,
                expert_ids: torch.Tensor) -> torch.Tensor:
        from model.kernels.moe.fused_moe import fused_moe  # Triton loads only when this backend runs

        weight_only = experts.fp8 is not None and not experts.fp8.dynamic_activations
        return fused_moe(x, experts.w13, experts.w2, weights, expert_ids, expert_start=experts.expert_start,
                         w13_scale=experts.w13_scale, w2_scale=experts.w2_scale,
                         quantize_activations=False if weight_only else None)

    def prepare_weights(self, experts: RoutedExperts) -> None:
        pass  # the kernels read the stacked weights as loaded


def grouped_expert_sum(experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor,
                       expert_ids: torch.Tensor) -> torch.Tensor:
    """The reference: each local expert that received pairs runs once over its group of rows."""
    num_tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.view(-1)
    pair_counts = torch.bincount(flat_ids, minlength=experts.num_experts)  # [E]
    order = flat_ids.argsort(stable=True)  # [T * k] pairs grouped by expert
    counts = pair_counts.tolist()
    local = experts.local_experts
    first = sum(counts[:experts.expert_start])
    local_order = order[first:first + sum(counts[local])]  # [P] this rank's pairs
    group_rows = [max(count, experts.min_rows) if count else 0 for count in counts[local]]
    row = _rows_of_pairs(flat_ids[local_order] - experts.expert_start, pair_counts[local], group_rows)  # [P]
    # Each expert's pairs fill one group of rows (padding rows repeat token 0; their outputs are never read).
    total_rows = sum(group_rows)
    token_of_row = torch.zeros(total_rows, dtype=torch.int64, device=x.device)
    inputs = x.index_select(0, token_of_row.index_copy_(0, row, local_order // top_k))  # [R, H]
    outputs, start = [], 0
    for local_expert, rows in enumerate(group_rows):
        if rows == 0:
            continue
        gate_up_weight, down_weight = experts.expert_weights(local_expert)
        gate, up = linear(inputs[start:start + rows], gate_up_weight).split(experts.local_intermediate, dim=-1)
        outputs.append(linear(F.silu(gate) * up, down_weight))  # [rows, H]
        start += rows
    outputs.append(x.new_zeros(1, x.shape[1]))  # row R: what pairs of other ranks' experts read
    row_of_pair = torch.full((num_tokens * top_k,), total_rows, dtype=torch.int64, device=x.device)
    per_pair = torch.cat(outputs).index_select(0, row_of_pair.index_copy_(0, local_order, row))  # [T * k, H]
    return (per_pair.view(num_tokens, top_k, -1) * weights[:, :, None]).sum(dim=1).to(x.dtype)


def _rows_of_pairs(expert_of_pair: torch.Tensor, pair_counts: torch.Tensor, group_rows: list[int]) -> torch.Tensor:
    """Row of each expert-sorted pair in the buffer where expert e's pairs start at sum(group_rows[:e])."""
    group_rows_t = torch.tensor(group_rows, device=pair_counts.device)
    group_start = group_rows_t.cumsum(0) - group_rows_t  # [E_local]
    pairs_before = pair_counts.cumsum(0) - pair_counts  # [E_local]
    rank_in_group = torch.arange(len(expert_of_pair), device=pair_counts.device) - pairs_before[expert_of_pair]
    return group_start[expert_of_pair] + rank_in_group
