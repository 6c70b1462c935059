"""Our Dots1 against Transformers' Dots1ForCausalLM (eager attention, DynamicCache) on random tiny checkpoints."""
from pathlib import Path

import pytest
import torch

from model.checkpoint import read_checkpoint_headers
from model.config import ModelConfig
from model.dots1 import Dots1ForCausalLM
from model.loader import load_checkpoint, load_model
from paged_runner import PagedRunner
from dots1_reference import build_reference, reference_generate

TOLERANCE = 1e-4
DECODE_STEPS = 16

CONFIGS = {
    # MHA, two dense layers first, tied embeddings, attention biases, legacy rope_theta spelling.
    "mha_dense2_tied_bias": dict(
        overrides=dict(num_hidden_layers=4, first_k_dense_replace=2, tie_word_embeddings=True, attention_bias=True),
        legacy_rope=True, prompts=[[5, 17, 3, 88, 41, 9, 60], [7] * 3 + list(range(20, 33)), [2, 95, 14, 14]],
    ),
    # GQA, group-limited routing (4 groups, best 2), unnormalised top-k, every layer MoE, head_dim != hidden/heads.
    "gqa_groups_yarn": dict(
        overrides=dict(hidden_size=48, num_key_value_heads=2, head_dim=16, n_group=4, topk_group=2,
                       num_experts_per_tok=3, norm_topk_prob=False, first_k_dense_replace=0,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                                        "original_max_position_embeddings": 32}),
        legacy_rope=False, prompts=[list(range(40, 52)), [9], [70, 71, 3, 3, 5, 80]],
    ),
    # Sliding-window layers (window smaller than the prompts), one kv head, llama3 rope, two shared experts.
    "sliding_mqa_llama3": dict(
        overrides=dict(num_key_value_heads=1, sliding_window=6,
                       layer_types=["full_attention", "sliding_attention", "sliding_attention"], n_shared_experts=2,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 16}),
        legacy_rope=False, prompts=[list(range(1, 15)), [33, 34, 35, 36, 37, 38, 39, 40, 41], [90, 4]],
    ),
    # Linear rope in the legacy rope_scaling spelling, no shared experts, no routed scaling.
    "linear_rope_no_shared": dict(
        overrides=dict(n_shared_experts=0, routed_scaling_factor=1.0, norm_topk_prob=False,
                       rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        legacy_rope=True, prompts=[[11, 12, 13, 14, 15], list(range(60, 71)), [1, 2, 3, 4, 5, 6, 7, 8]],
    ),
    # Dynamic NTK rope: decoding runs past max_position_embeddings, where the frequencies rescale every step.
    "dynamic_rope_past_max": dict(
        overrides=dict(max_position_embeddings=20,
                       rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
        legacy_rope=False, prompts=[list(range(30, 43)), [5, 6, 7, 8, 9, 10], [77, 78, 79, 80, 81, 82, 83, 84, 85]],
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    spec = CONFIGS[request.param]
    model_dir: Path = tmp_path_factory.mktemp(request.param)
    reference = build_reference(model_dir, legacy_rope=spec["legacy_rope"], **spec["overrides"])
    expected = [reference_generate(reference, prompt, DECODE_STEPS) for prompt in spec["prompts"]]
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    return model, spec["prompts"], expected, model_dir


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    diff = (actual - expected).abs().max().item()
    assert diff <= TOLERANCE, f"{what}: max abs diff {diff:.3g} > {TOLERANCE}"


def test_reference_logits_are_not_trivial(case):
    """The oracle's logits vary widely, so agreement within the tolerance means something."""
    _, _, expected, _ = case
    for prompt_logits, _, _ in expected:
        assert prompt_logits.std().item() > 0.5


def test_one_prefill_of_ragged_batch_matches_every_position(case):
    model, prompts, expected, _ = case
    runner = PagedRunner(model, seed=1)
    logits = runner.step(dict(enumerate(prompts)), all_logits=True)
    for seq, (actual, (prompt_logits, _, _)) in enumerate(zip(logits, expected)):
        assert actual.shape == prompt_logits.shape
        assert_close(actual, prompt_logits, f"sequence {seq} prompt logits")


def test_chunked_prefill_then_decode_matches_and_continues_greedily(case):
    """Prompts arrive in chunks of different sizes while other sequences already decode, all in mixed batches."""
    model, prompts, expected, _ = case
    runner = PagedRunner(model, seed=2)
    chunk_sizes = [3, 5, 2]
    start_steps = [0, 1, 0]
    done = [0] * len(prompts)  # prompt tokens already run
    generated: list[list[int]] = [[] for _ in prompts]
    step = 0
    while any(len(g) < DECODE_STEPS + 1 for g in generated):
        chunks, kinds = {}, {}
        for seq, prompt in enumerate(prompts):
            if step < start_steps[seq] or len(generated[seq]) > DECODE_STEPS:
                continue
            if done[seq] < len(prompt):
                chunks[seq] = prompt[done[seq]:done[seq] + chunk_sizes[seq]]
                kinds[seq] = ("prompt", done[seq])
                done[seq] += len(chunks[seq])
            else:
                chunks[seq] = [generated[seq][-1]]
                kinds[seq] = ("decode", len(generated[seq]) - 1)
        outputs = runner.step(chunks, all_logits=True)
        for seq, logits in zip(chunks, outputs):
            prompt_logits, ref_tokens, ref_step_logits = expected[seq]
            kind, offset = kinds[seq]
            if kind == "prompt":
                assert_close(logits, prompt_logits[offset:offset + len(chunks[seq])],
                             f"sequence {seq} prompt chunk at {offset}")
                if done[seq] < len(prompts[seq]):
                    continue
            else:
                assert_close(logits[0], ref_step_logits[offset], f"sequence {seq} decode step {offset}")
            if len(generated[seq]) < DECODE_STEPS:
                token = int(logits[-1].argmax())
                position = len(generated[seq])
                assert token == ref_tokens[position], f"sequence {seq} diverged at generated token {position}"
                generated[seq].append(token)
            else:
                generated[seq].append(-1)  # the last decode step's logits were checked; nothing more to feed
        step += 1
    assert [g[:DECODE_STEPS] for g in generated] == [tokens for _, tokens, _ in expected]


def test_plain_weights_path_matches(case):
    """The un-packed weights path (what non-CPU devices run) against the reference, prefill and a decode step."""
    _, prompts, expected, model_dir = case
    model = Dots1ForCausalLM(ModelConfig.from_pretrained(model_dir))
    load_checkpoint(model, read_checkpoint_headers(model_dir))
    runner = PagedRunner(model.eval(), seed=3)
    logits = runner.step(dict(enumerate(prompts)), all_logits=True)
    for seq, (actual, (prompt_logits, _, _)) in enumerate(zip(logits, expected)):
        assert_close(actual, prompt_logits, f"sequence {seq} prompt logits")
    decoded = runner.step({seq: [tokens[0]] for seq, (_, tokens, _) in enumerate(expected)})
    for seq, (actual, (_, _, step_logits)) in enumerate(zip(decoded, expected)):
        assert_close(actual, step_logits[0], f"sequence {seq} first decode step")
