"""The FP8 presets' memory arithmetic, recomputed on the meta device from the real architecture with the published
FP8-dynamic quantization_config: float8 weights per rank, KV per token per rank, tokens that fit, the reserve."""
from pathlib import Path

import pytest
import torch
from test_tp_presets import GIB, check_memory_plan, stated

from model.config import ModelConfig
from model.loader import build_model
from model.parallel import ParallelState
from server.cli import engine_config, parse_args

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FP8_ARCHITECTURE = CONFIGS / "dots.llm1.inst-FP8-dynamic"
PRESETS = ["dots.llm1.inst-FP8-dynamic-2xH200.yaml", "dots.llm1.inst-FP8-dynamic-4x80GB.yaml"]


def weight_bytes_per_rank(config: ModelConfig, world_size: int) -> list[int]:
    sizes = []
    for rank in range(world_size):
        model = build_model(config, config.quantization, dtype=torch.bfloat16, device="meta",
                            parallel=ParallelState(rank, world_size))
        sizes.append(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]))
    return sizes


def test_the_fp8_architecture_is_the_bf16_one_with_fp8_linear_weights():
    config = ModelConfig.from_pretrained(FP8_ARCHITECTURE)
    model = build_model(config, config.quantization, dtype=torch.bfloat16, device="meta")
    assert model.layers[0].mlp.gate_up_proj.weight.dtype == model.layers[5].mlp.experts.w13.dtype == torch.float8_e4m3fn
    assert model.lm_head.weight.dtype == model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[5].mlp.gate.weight.dtype == torch.float32
    total = weight_bytes_per_rank(config, 1)[0]
    assert 143e9 < total < 146e9  # about 144 GB, half of the 285 GB in bf16


@pytest.mark.parametrize("preset", PRESETS)
def test_fp8_preset_memory_plan_matches_the_architecture_and_fits_the_card(preset):
    text = (CONFIGS / preset).read_text()
    engine = engine_config(parse_args(["--config", str(CONFIGS / preset)]))
    assert engine.dtype == "bfloat16" and engine.tensor_parallel_size > 1
    config = ModelConfig.from_pretrained(FP8_ARCHITECTURE)
    world_size = engine.tensor_parallel_size

    weights = weight_bytes_per_rank(config, world_size)
    assert max(weights) - min(weights) < GIB // 100
    assert round(max(weights) / GIB, 2) == stated(text, "weights per rank")

    check_memory_plan(text, config, engine, max(weights), min_full_contexts=3)
