"""A real server on an FP8 (compressed-tensors) checkpoint: the greedy text and logprobs of Transformers running the
dequantized weights; a bad FP8 checkpoint stops start-up with its file and key named."""
import dataclasses
import shutil
from pathlib import Path

import openai
import pytest
import torch
from api_server import ServerProcess
from fp8_checkpoint import write_fp8_checkpoint
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Dots1ForCausalLM

from model.embedded import EMBEDDED_MODEL_DIR
from scheduler.model_runner import ModelExecutor
from server.cli import engine_config, parse_args

NAME = "dots1-tiny-fp8"
PROMPT = "The quick brown fox"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp8_server")
    write_fp8_checkpoint(EMBEDDED_MODEL_DIR, root / "fp8", dequantized=root / "dequantized")
    return root / "fp8", root / "dequantized"


@torch.no_grad()
def reference_greedy(model_dir: Path, prompt: list[int]) -> tuple[list[int], list[float]]:
    model = Dots1ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids, tokens, logprobs = list(prompt), [], []
    for _ in range(MAX_TOKENS):
        step = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        token = int(step.argmax())
        tokens.append(token)
        logprobs.append(float(step[token]))
        ids.append(token)
    return tokens, logprobs


def test_greedy_completion_matches_transformers_on_the_dequantized_weights(checkpoints):
    fp8_dir, dequantized = checkpoints
    tokenizer = AutoTokenizer.from_pretrained(fp8_dir)
    prompt = tokenizer(PROMPT)["input_ids"]
    expected_tokens, expected_logprobs = reference_greedy(dequantized, prompt)
    with ServerProcess("--model", str(fp8_dir), "--served-model-name", NAME) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        completion = client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                               logprobs=1, extra_body={"ignore_eos": True})
        log = server.log_text()
    [choice] = completion.choices
    assert choice.text == tokenizer.decode(expected_tokens, skip_special_tokens=True)  # the server's default
    assert choice.logprobs.token_logprobs == pytest.approx(expected_logprobs, abs=1e-4)
    assert "weights: float8_e4m3fn+float32" in log


def test_a_bad_fp8_checkpoint_stops_start_up_naming_file_and_key(checkpoints, tmp_path):
    fp8_dir, _ = checkpoints
    broken = tmp_path / "broken"
    shutil.copytree(fp8_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    key = "model.layers.2.self_attn.o_proj.weight_scale"
    tensors[key] = tensors[key][:3]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AssertionError, match=rf"(?s)did not become ready.*ValueError: .*broken/model\.safetensors: "
                                             rf"tensor '{key}' has shape \[3, 1\]"):
        ServerProcess("--model", str(broken))


def test_quantization_flag_reaches_the_executor_which_reports_the_weights():
    args = parse_args(["--quantization", "fp8", "--model", str(EMBEDDED_MODEL_DIR), "--device", "cpu",
                       "--dtype", "float32", "--kv-cache-memory", "4MiB"])
    config = engine_config(args)
    assert config.quantization == "fp8"
    executor = ModelExecutor(config)
    try:
        assert executor.weight_dtype == "float8_e4m3fn+float32"
        params = [*executor.model.parameters(), *executor.model.buffers()]
        assert executor.weight_bytes == sum(t.numel() * t.element_size() for t in params)
        fp8_elements = sum(p.numel() for p in executor.model.parameters() if p.dtype == torch.float8_e4m3fn)
        scales = sum(p.numel() for name, p in executor.model.named_parameters() if name.endswith("_scale"))
        plain = ModelExecutor(dataclasses.replace(config, quantization=None))
        assert plain.weight_dtype == "float32"
        assert plain.weight_bytes - executor.weight_bytes == 3 * fp8_elements - 4 * scales  # 4 bytes -> 1 + scales
        plain.shutdown()
    finally:
        executor.shutdown()
    with pytest.raises(SystemExit):
        parse_args(["--quantization", "int3"])
