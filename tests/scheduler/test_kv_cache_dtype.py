"""--kv-cache-dtype and --attention-backend from the command line to the engine's KV pool and its log line."""
import logging

import pytest
import torch

from model.forward_batch import ForwardBatch
from model.kv_cache import quantize_kv
from scheduler.config import EngineConfig
from scheduler.model_runner import ModelExecutor
from server.cli import engine_config, parse_args

BUDGET = 4 * 2**20


def test_flags_reach_the_engine_config() -> None:
    engine = engine_config(parse_args(["--kv-cache-dtype", "fp8", "--attention-backend", "torch"]))
    assert (engine.kv_cache_dtype, engine.attention_backend) == ("fp8", "torch")
    defaults = engine_config(parse_args([]))
    assert (defaults.kv_cache_dtype, defaults.attention_backend) == ("auto", "auto")
    for flag, value in (("--kv-cache-dtype", "int4"), ("--attention-backend", "flash")):
        with pytest.raises(SystemExit):
            parse_args([flag, value])


def test_fp8_pool_holds_four_times_the_float32_blocks_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="scheduler.model_runner"):
        fp8 = ModelExecutor(EngineConfig(dtype="float32", kv_cache_dtype="fp8", kv_cache_memory=BUDGET))
    full = ModelExecutor(EngineConfig(dtype="float32", kv_cache_memory=BUDGET))
    try:
        assert fp8.kv_cache_dtype == torch.float8_e4m3fn and full.kv_cache_dtype == torch.float32
        assert fp8.attention_backend == full.attention_backend == "torch"  # auto on the CPU
        assert fp8.num_kv_blocks == 4 * full.num_kv_blocks
        assert all(key.dtype == torch.float8_e4m3fn for key, _ in fp8.kv_caches)
        assert any("float8_e4m3fn" in r.message and "attention backend torch" in r.message for r in caplog.records)
        # A prompt, then a decode step that reads it back from the cache.
        prompt = ForwardBatch.build([[5, 6, 7, 8, 9, 10, 11, 12, 13]], [0], [[3, 1]], 16)
        step = ForwardBatch.build([[14]], [9], [[3, 1]], 16)
        logits = {name: torch.cat([executor.execute(prompt), executor.execute(step)])
                  for name, executor in (("fp8", fp8), ("full", full))}
        # The first layer's keys and values are computed before any attention: the pool holds exactly their bytes.
        for fp8_cache, full_cache in zip(fp8.kv_caches[0], full.kv_caches[0]):
            expected = quantize_kv(full_cache[[3, 1]], 1.0)
            assert torch.equal(fp8_cache[[3, 1]].view(torch.uint8), expected.view(torch.uint8))
        assert fp8.kv_caches[0][0][3].float().abs().max() > 0
        relative = (logits["fp8"] - logits["full"]).norm(dim=-1) / logits["full"].norm(dim=-1)
        assert torch.isfinite(logits["fp8"]).all() and (relative < 0.5).all()
    finally:
        fp8.shutdown()
        full.shutdown()
