"""The tensor-parallel presets' memory arithmetic, recomputed from the real architecture's shapes on the meta device
(no memory): weights per rank, KV bytes per token per rank, tokens that fit, and all of it within the card."""
import re
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.dots1 import Dots1ForCausalLM
from model.kv_cache import kv_cache_bytes_per_block
from model.parallel import ParallelState
from server.cli import engine_config, parse_args

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REAL_ARCHITECTURE = CONFIGS / "dots.llm1.inst"
GIB = 2**30
# Outside the weights, the KV cache and the decode gather: the CUDA context (0.68 GiB measured on an H200), NCCL's
# buffers and the other activations (a prefill chunk's peak measured 2.5 GiB at once, not on top of the gather).
RUNTIME_OVERHEAD = 2 * GIB
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

    check_kv_cache_and_reserve(text, config, engine, max(weights), min_full_contexts=1)


def check_kv_cache_and_reserve(text: str, config: ModelConfig, engine, weights_per_rank: int,
                               min_full_contexts: int) -> None:
    """The preset's KV tokens, reserve and total per rank, recomputed from the architecture and its engine flags."""
    world_size = engine.tensor_parallel_size
    kv_per_token = kv_cache_bytes_per_block(config, 1, torch.bfloat16, ParallelState(0, world_size))
    assert kv_per_token == stated(text, "KV bytes per token per rank")
    num_blocks = engine.kv_cache_memory // (kv_per_token * engine.block_size)
    tokens = num_blocks * engine.block_size
    assert tokens == stated(text, "KV cache tokens per rank")
    assert tokens >= min_full_contexts * engine.max_model_len  # that many sequences of the full context fit

    reserve = stated(text, "reserve") * GIB
    # The largest transient: a decode step gathering K and V of one layer for max_num_seqs sequences padded to
    # the longest context.
    decode_gather = engine.max_num_seqs * engine.max_model_len * kv_per_token // config.num_hidden_layers
    assert decode_gather + RUNTIME_OVERHEAD <= reserve
    card = stated(text, "card memory") * GIB
    assert weights_per_rank + engine.kv_cache_memory + reserve <= card
    total = re.search(r"weights \+ KV \+ reserve = ([\d.]+) GiB", text)
    assert total is not None
    assert float(total.group(1)) == round((weights_per_rank + engine.kv_cache_memory + reserve) / GIB, 2)
