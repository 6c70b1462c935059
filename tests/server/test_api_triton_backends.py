"""Serving with the Triton attention and MoE backends (Triton's interpreter on the CPU): Transformers' greedy tokens."""
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from api_server import FAST_ENGINE_FLAGS, REPO, ServerProcess, free_port
from transformers import Dots1ForCausalLM

from model.embedded import EMBEDDED_MODEL_DIR

MODEL = "dots1-tiny"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [300, 17, 17, 2]]
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def triton_server() -> Iterator[ServerProcess]:
    with ServerProcess("--attention-backend", "triton", "--moe-backend", "triton",
                       env={"TRITON_INTERPRET": "1"}) as process:
        yield process


@torch.no_grad()
def transformers_greedy(prompts: list[list[int]]) -> list[list[int]]:
    reference = Dots1ForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32, local_files_only=True)
    completions = []
    for prompt in prompts:
        tokens = list(prompt)
        for _ in range(MAX_TOKENS):
            tokens.append(int(reference.eval()(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
        completions.append(tokens[len(prompt):])
    return completions


def test_greedy_completions_match_transformers(triton_server: ServerProcess) -> None:
    assert "attention backend triton" in triton_server.log_text()
    metrics = httpx.get(f"{triton_server.url}/metrics", timeout=30).text
    assert 'attention_backend="triton"' in metrics and 'moe_backend="triton"' in metrics
    client = openai.OpenAI(base_url=f"{triton_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    response = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0.0,
                                         extra_body={"return_token_ids": True, "ignore_eos": True})
    served = [choice.model_extra["token_ids"] for choice in sorted(response.choices, key=lambda c: c.index)]
    assert served == transformers_greedy(PROMPTS)


@pytest.mark.parametrize("flag, check", [("--attention-backend", "check_triton_attention"),
                                         ("--moe-backend", "check_fused_moe")])
def test_an_explicit_triton_backend_that_fails_its_self_check_refuses_to_start(flag: str, check: str) -> None:
    """Without Triton's interpreter a CPU has no Triton driver, so the self-check fails."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "server", "--port", str(free_port()), *FAST_ENGINE_FLAGS, flag, "triton"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert f"{flag} triton: " in result.stderr and check in result.stderr
