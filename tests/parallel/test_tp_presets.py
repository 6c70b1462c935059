"""The tensor-parallel presets' memory plans, recomputed from the real architecture's shapes on the meta device (no
memory) with the engine's own plan arithmetic: --gpu-memory-utilization of the card, less weights per rank, the
profiling step's activations, memory outside PyTorch, decode graphs and sampling state, leaves the KV cache."""
import re
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.dots1 import Dots1ForCausalLM
from model.kv_cache import kv_cache_bytes_per_block
from model.parallel import ParallelState
from scheduler.memory_plan import GIB, MemoryPlan, graph_memory_estimate
from scheduler.sampling_batch import sampling_batch_bytes
from server.cli import engine_config, parse_args

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REAL_ARCHITECTURE = CONFIGS / "dots.llm1.inst"
# The CUDA context (0.68 GiB measured on an H200 with bench/tp_memory_plan.py), NCCL's buffers and kernel modules.
OUTSIDE_PYTORCH = int(1.5 * GIB)
# Every preset's KV cache holds max_num_seqs sequences of this many tokens at once.
TOKENS_PER_SEQUENCE = 1024
PRESETS = ["dots.llm1.inst-8xH100.yaml", "dots.llm1.inst-4xH200.yaml"]


def stated(text: str, label: str) -> float:
    match = re.search(rf"^#\s+{label}: ([\d.]+)", text, re.MULTILINE)
    assert match is not None, f"the preset's comment has no '{label}:' line"
    return float(match.group(1))


def weight_bytes_per_rank(config: ModelConfig, world_size: int, dtype: torch.dtype) -> list[int]:
    sizes = []
    for rank in range(world_size):
        with torch.device("meta"):
            model = Dots1ForCausalLM(config, ParallelState(rank, world_size), dtype=dtype)
        tensors = [*model.parameters(), *model.buffers()]
        sizes.append(sum(tensor.numel() * tensor.element_size() for tensor in tensors))
    return sizes


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_memory_plan_matches_the_architecture_and_fits_the_card(preset):
    path = CONFIGS / preset
    text = path.read_text()
    engine = engine_config(parse_args(["--config", str(path)]))  # the preset is valid dots-serve input
    assert engine.dtype == "bfloat16" and engine.tensor_parallel_size > 1
    config = ModelConfig.from_pretrained(REAL_ARCHITECTURE)
    world_size = engine.tensor_parallel_size

    weights = weight_bytes_per_rank(config, world_size, torch.bfloat16)
    assert max(weights) - min(weights) < GIB // 100  # every rank holds an equal share
    assert round(max(weights) / GIB, 2) == stated(text, "weights per rank")
    whole_model = weight_bytes_per_rank(config, 1, torch.bfloat16)[0]
    assert max(weights) < 1.01 * whole_model / world_size  # only norms and the router are replicated

    check_memory_plan(text, config, engine, max(weights), min_full_contexts=7)


def prefill_activation_estimate(config: ModelConfig, tokens: int, world_size: int) -> int:
    """The profiling step's peak on the Triton path, where attention reads the paged cache in place (nothing is
    [tokens, context]): 16 hidden-size float32 rows per token live at once, plus the larger of the routed experts'
    bf16 rows for every token-expert pair and the dense first layer's MLP rows: about the 2.5 GiB once measured on
    an H200 for an 8192-token prefill chunk of these presets."""
    hidden = tokens * config.hidden_size * 4 * 16
    experts = tokens * config.num_experts_per_tok * (3 * config.moe_intermediate_size // world_size
                                                     + config.hidden_size) * 2
    dense = tokens * 3 * config.intermediate_size // world_size * 2
    return hidden + max(experts, dense)


def check_memory_plan(text: str, config: ModelConfig, engine, weights_per_rank: int, min_full_contexts: int) -> None:
    """The preset's plan per rank, recomputed from the architecture and its engine flags: every term it states, and
    that its KV cache holds ``min_full_contexts`` full contexts and max_num_seqs sequences of 1024 tokens."""
    assert engine.kv_cache_memory is None  # the plan sizes the KV cache from the card
    assert engine.attention_backend == "triton"  # the plan holds no decode gather: refuse the PyTorch fallback
    world_size = engine.tensor_parallel_size
    card = stated(text, "card memory") * GIB
    plan = MemoryPlan(
        total_bytes=int(card), utilization=engine.gpu_memory_utilization, weight_bytes=weights_per_rank,
        activation_peak_bytes=prefill_activation_estimate(config, engine.max_num_batched_tokens, world_size),
        non_torch_bytes=OUTSIDE_PYTORCH, graph_bytes=graph_memory_estimate(config, engine.max_num_seqs, torch.bfloat16),
        sampling_state_bytes=sampling_batch_bytes(engine.max_num_seqs, config.vocab_size),
    )
    assert round(plan.budget_bytes / GIB, 2) == stated(text, "budget")
    assert round(plan.activation_peak_bytes / GIB, 2) == stated(text, "activation peak")
    assert round(plan.non_torch_bytes / GIB, 2) == stated(text, "outside PyTorch")
    assert round(plan.graph_bytes / GIB, 2) == stated(text, "CUDA graphs")
    assert round(plan.sampling_state_bytes / GIB, 2) == stated(text, "sampling state")
    assert round(plan.kv_cache_bytes / GIB, 2) == stated(text, "KV cache per rank")
    plan.check()

    kv_per_token = kv_cache_bytes_per_block(config, 1, torch.bfloat16, ParallelState(0, world_size))
    assert kv_per_token == stated(text, "KV bytes per token per rank")
    tokens = plan.kv_cache_bytes // (kv_per_token * engine.block_size) * engine.block_size
    assert tokens == stated(text, "KV cache tokens per rank")
    assert tokens >= min_full_contexts * engine.max_model_len
    assert tokens >= engine.max_num_seqs * TOKENS_PER_SEQUENCE
    full_contexts = re.search(r"(\d+) sequences at the full (\d+) context, or (\d+) tokens for each of max_num_seqs "
                              r"(\d+)", re.sub(r"\n#\s+", " ", text))
    assert full_contexts is not None
    assert [int(group) for group in full_contexts.groups()] == [
        tokens // engine.max_model_len, engine.max_model_len, tokens // engine.max_num_seqs, engine.max_num_seqs]
