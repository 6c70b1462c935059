"""The whole model with attention_backend="triton" (Triton's interpreter on the CPU, see tests/conftest.py) against
Transformers."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dots1_reference import build_reference, reference_generate
from paged_runner import PagedRunner

import model.attention_self_check as attention_self_check
from model.attention_backend import TritonAttentionBackend
from model.backend_selection import resolve_attention_backend
from model.embedded import EMBEDDED_MODEL_DIR
from model.kv_cache import FP8_KV_DTYPE
from model.loader import load_model
from model.self_check import SelfCheckResult

TOLERANCE = 1e-4
DECODE_STEPS = 4
CHUNK = 7
BLOCK_SIZE = 16
CONFIGS = {
    # GQA with a sliding-window layer (window smaller than the prompts).
    "gqa_sliding": dict(num_hidden_layers=2, num_key_value_heads=2, sliding_window=6,
                        layer_types=["full_attention", "sliding_attention"]),
    # MHA like dots.llm1.
    "mha": dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
}
PROMPTS = [list(range(1, 15)), [33, 34, 35, 36, 37, 38, 39, 40, 41], [90, 4]]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    model_dir: Path = tmp_path_factory.mktemp(request.param)
    reference = build_reference(model_dir, **CONFIGS[request.param])
    expected = [reference_generate(reference, prompt, DECODE_STEPS) for prompt in PROMPTS]
    model = load_model(model_dir, dtype=torch.float32, device="cpu", attention_backend="triton")
    return model, expected, model_dir


def test_triton_backend_passes_its_self_check_and_is_used(case):
    model, _, _ = case
    assert model.attention_backend.name == "triton"


def test_chunked_prefill_and_decode_in_mixed_batches_match_transformers(case):
    """Prompts in chunks of CHUNK tokens while others decode; greedy tokens and every logit row match."""
    model, expected, _ = case
    runner = PagedRunner(model, num_blocks=16, block_size=BLOCK_SIZE, seed=4)
    done = [0] * len(PROMPTS)
    generated: list[list[int]] = [[] for _ in PROMPTS]
    while any(len(g) < DECODE_STEPS for g in generated):
        chunks, offsets = {}, {}
        for seq, prompt in enumerate(PROMPTS):
            if len(generated[seq]) >= DECODE_STEPS:
                continue
            if done[seq] < len(prompt):
                chunks[seq], offsets[seq] = prompt[done[seq]:done[seq] + CHUNK], done[seq]
                done[seq] += len(chunks[seq])
            else:
                chunks[seq], offsets[seq] = [generated[seq][-1]], None
        for seq, logits in zip(chunks, runner.step(chunks, all_logits=True)):
            prompt_logits, ref_tokens, ref_step_logits = expected[seq]
            if offsets[seq] is None:
                reference = ref_step_logits[len(generated[seq]) - 1][None]
            else:
                reference = prompt_logits[offsets[seq]:offsets[seq] + len(chunks[seq])]
                if done[seq] < len(PROMPTS[seq]):
                    continue
            diff = (logits - reference).abs().max().item()
            assert diff <= TOLERANCE, f"sequence {seq}: max abs diff {diff:.3g}"
            generated[seq].append(int(logits[-1].argmax()))
    assert generated == [tokens for _, tokens, _ in expected]


def test_fp8_kv_cache_gives_the_same_logits_in_both_backends(case):
    """With an 8-bit cache (and non-unit scales) the torch and triton backends compute the same thing."""
    model, _, model_dir = case
    reference_model = load_model(model_dir, dtype=torch.float32, device="cpu", attention_backend="torch")
    for layer in [*model.layers, *reference_model.layers]:
        layer.self_attn.k_scale, layer.self_attn.v_scale = 0.25, 0.5
    try:
        logits = {}
        for name, candidate in (("triton", model), ("torch", reference_model)):
            runner = PagedRunner(candidate, num_blocks=16, block_size=BLOCK_SIZE, seed=5, cache_dtype=FP8_KV_DTYPE)
            prefill = runner.step(dict(enumerate(PROMPTS)), all_logits=True)
            decode = runner.step({seq: [int(rows[-1].argmax())] for seq, rows in enumerate(prefill)})
            logits[name] = torch.cat([*prefill, *[row[None] for row in decode]])
        diff = (logits["triton"] - logits["torch"]).abs().max().item()
        assert diff <= TOLERANCE, f"max abs diff {diff:.3g}"
    finally:
        for layer in model.layers:
            layer.self_attn.k_scale, layer.self_attn.v_scale = 1.0, 1.0


def test_explicit_triton_that_cannot_run_refuses_to_load():
    """On a CPU without the interpreter Triton has no driver: the self-check fails and an explicit choice is refused."""
    script = ("import torch; from model.loader import load_model; "
              f"load_model({str(EMBEDDED_MODEL_DIR)!r}, dtype=torch.float32, device='cpu', attention_backend='triton')")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert ("ValueError: --attention-backend triton: the triton attention backend failed its self-check "
            "(check_triton_attention)") in result.stderr


def test_auto_falls_back_to_torch_with_a_warning_when_the_self_check_fails(monkeypatch, caplog):
    def broken(*args, **kwargs):
        return SelfCheckResult("check_triton_attention", False, "RuntimeError: no kernel image for this device")

    monkeypatch.setattr(attention_self_check, "check_triton_attention", broken)
    with caplog.at_level(logging.WARNING, logger="model.backend_selection"):
        backend = resolve_attention_backend("auto", "cuda", torch.bfloat16)  # auto checks on CUDA only
    assert backend.name == "torch"
    assert "no kernel image for this device" in caplog.text and "using the torch attention backend" in caplog.text


def test_self_check_passes_here_and_reports_a_wrong_kernel(monkeypatch):
    passed = attention_self_check.check_triton_attention("cpu", torch.float32, head_dim=32, windows=(None, 6))
    assert passed.passed and passed.check == "check_triton_attention" and 0.0 <= passed.max_abs_diff < 1e-4
    real = TritonAttentionBackend.forward
    monkeypatch.setattr(TritonAttentionBackend, "forward", lambda *args: real(*args) * 1.01)
    failure = attention_self_check.check_triton_attention("cpu", torch.float32, head_dim=32)
    assert not failure.passed and "differs from torch" in failure.detail and failure.max_abs_diff > 1e-4
