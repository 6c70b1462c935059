"""--quantization fp8 through the tensor-parallel executor (the flag reaches the worker process): the logits and
greedy tokens of one process, and every rank's weights reported in FP8."""
from tp_checkpoint import PagedDriver, build_checkpoint, chunked_greedy_run

from scheduler.config import EngineConfig
from scheduler.executor_factory import create_executor
from scheduler.model_runner import ModelExecutor

PROMPTS = {0: [5, 9, 2, 77, 31, 8, 60, 11, 3], 1: [40, 41, 42], 2: [3, 1, 4, 1, 5, 9, 2]}


def run(executor):
    driver = PagedDriver(executor.execute, executor.num_kv_blocks, 4)
    return chunked_greedy_run(driver, PROMPTS, 5, 4)


def test_online_fp8_at_tensor_parallel_2_matches_one_process(tmp_path):
    model_dir = build_checkpoint(tmp_path / "tp", num_key_value_heads=2)
    options = dict(model=str(model_dir), dtype="float32", device="cpu", block_size=4, kv_cache_memory=256 << 10,
                   expert_metrics=False, quantization="fp8")
    one = ModelExecutor(EngineConfig(**options))
    try:
        expected_logits, expected_tokens = run(one)
        assert one.weight_dtype == "float8_e4m3fn+float32"
    finally:
        one.shutdown()
    two = create_executor(EngineConfig(**options, tensor_parallel_size=2))
    try:
        logits, tokens = run(two)
        assert two.weight_dtype == "float8_e4m3fn+float32"
        assert two.weight_bytes < one.weight_bytes
    finally:
        two.shutdown()
    assert tokens == expected_tokens
    assert (logits - expected_logits).abs().max().item() < 1e-4
