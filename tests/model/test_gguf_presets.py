"""The CPU presets for dots.llm1.inst in Q4_K_M: their memory plans recomputed from the real architecture's shapes
(meta tensors), llama.cpp's per-tensor type choice and the packed format's bytes per type."""
import re
from pathlib import Path

import pytest
import torch
from gguf_memory_plan import packed_bits_per_weight, q4_k_m_plan, q4_k_m_type
from gguf import GGMLQuantizationType as Q

from model.config import ModelConfig
from model.kv_cache import kv_cache_bytes_per_block
from model.parallel import ParallelState
from server.cli import engine_config, parse_args

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ARCHITECTURE = CONFIGS / "dots.llm1.inst"
PRESETS = ["dots.llm1.inst-Q4_K_M-cpu-128GB.yaml", "dots.llm1.inst-Q4_K_M-cpu-192GB.yaml"]
GIB = 2 ** 30
OS_SHARE = 4 * GIB
# The published file (bartowski's dots.llm1.inst Q4_K_M) is 96.1 GB: the recomputed 94.5 GB is within 3% of it.
PUBLISHED_FILE_BYTES = 96.1e9


def stated(text: str, label: str) -> float:
    match = re.search(rf"^#\s+{label}: ([\d.]+)", text, re.MULTILINE)
    assert match is not None, f"the preset's comment has no '{label}:' line"
    return float(match.group(1))


def test_llama_cpp_q4_k_m_types_for_dots1() -> None:
    """The rules the plan applies, on the tensors that decide it (62 layers, 1408-wide experts)."""
    assert q4_k_m_type("output.weight", (152064, 4096), 62, 0) == Q.Q6_K
    assert q4_k_m_type("blk.3.ffn_gate_exps.weight", (128, 1408, 4096), 62, 0) == Q.Q4_K
    assert q4_k_m_type("blk.3.ffn_down_exps.weight", (128, 4096, 1408), 62, 0) == Q.Q8_0  # Q6_K, 1408 % 256 != 0
    assert q4_k_m_type("blk.10.ffn_down_exps.weight", (128, 4096, 1408), 62, 0) == Q.Q5_0  # Q4_K falls back
    assert q4_k_m_type("blk.10.ffn_down_shexp.weight", (4096, 2816), 62, 0) == Q.Q4_K
    assert q4_k_m_type("blk.10.attn_v.weight", (4096, 4096), 62, 9) == Q.Q6_K
    assert q4_k_m_type("blk.10.ffn_gate_inp.weight", (128, 4096), 62, 0) == Q.F32


def test_packed_bits_per_weight() -> None:
    assert {qtype: packed_bits_per_weight(qtype) for qtype in (Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q8_0)} == {
        Q.Q4_K: 5.0, Q.Q5_0: 5.5, Q.Q6_K: 7.0, Q.Q8_0: 8.5}


@pytest.mark.parametrize("preset", PRESETS)
def test_q4_k_m_cpu_preset_memory_plan_fits_the_box(preset: str) -> None:
    text = (CONFIGS / preset).read_text()
    engine = engine_config(parse_args(["--config", str(CONFIGS / preset)]))
    assert engine.device == "cpu" and engine.dtype == "bfloat16" and engine.model.endswith(".gguf")
    config = ModelConfig.from_pretrained(ARCHITECTURE)
    plan = q4_k_m_plan(config, torch.bfloat16)
    file_bytes = plan.pop("file")
    assert abs(file_bytes - PUBLISHED_FILE_BYTES) / PUBLISHED_FILE_BYTES < 0.03
    weights = sum(plan.values())
    assert round(weights / GIB, 2) == stated(text, "weights")

    kv_per_token = kv_cache_bytes_per_block(config, 1, torch.bfloat16, ParallelState())
    assert kv_per_token == stated(text, "KV bytes per token")
    tokens = engine.kv_cache_memory // (kv_per_token * engine.block_size) * engine.block_size
    assert tokens == stated(text, "KV cache tokens")
    assert tokens >= 2 * engine.max_model_len

    reserve = stated(text, "reserve") * GIB
    decode_gather = engine.max_num_seqs * engine.max_model_len * kv_per_token // config.num_hidden_layers
    prefill = engine.max_num_batched_tokens * config.hidden_size * 4 * 16  # a chunk's float32 activations, 16 live
    assert decode_gather + prefill + 2 * GIB <= reserve  # 2 GiB: the interpreter, torch and the tokenizer
    box = stated(text, "box memory") * GIB
    assert weights + engine.kv_cache_memory + reserve <= box - OS_SHARE
    total = re.search(r"weights \+ KV \+ reserve = ([\d.]+) GiB", text)
    assert total is not None and float(total.group(1)) == round((weights + engine.kv_cache_memory + reserve) / GIB, 2)
