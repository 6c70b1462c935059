"""The engine on the embedded tiny Dots1 checkpoint: batching, preemption, seeds, stops, n, logprobs, limits."""
import pytest
import torch
from transformers import Dots1ForCausalLM

from conftest import assert_pool_free, make_llm, random_prompts
from model.embedded import EMBEDDED_MODEL_DIR
from scheduler.core_messages import EngineCoreRequest, FinishChoice
from scheduler.llm import LLM, Completion
from scheduler.outputs import RequestRejected
from scheduler.request_check import check_request
from scheduler.sampling_params import InvalidParameterError, SamplingParams

EOS = 4095  # <|endofresponse|>, in the embedded generation_config.json


def greedy(max_tokens: int, **params: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2, **params)


def assert_same_greedy(batched: Completion, alone: Completion) -> None:
    """Equal tokens; a divergence is only accepted at a near tie of the two best tokens (float summation order)."""
    for position, (got, expected) in enumerate(zip(batched.token_ids, alone.token_ids)):
        if got != expected:
            (best, best_lp), (second, second_lp) = alone.logprobs[position].top
            assert {got, expected} == {best, second} and best_lp - second_lp < 1e-4, (
                f"diverged at token {position}: {got} vs {expected} without a near tie"
            )
            return
    assert batched.token_ids == alone.token_ids
    assert batched.text == alone.text


def test_32_concurrent_greedy_requests_equal_each_run_alone(llm: LLM, reference_llm: LLM) -> None:
    prompts = random_prompts(32, 3, 200, seed=1)
    params = [greedy(max_tokens=4 + i % 13) for i in range(32)]
    batched = llm.generate(prompts, params)
    for prompt, p, result in zip(prompts, params, batched):
        alone = reference_llm.generate([prompt], p)[0]
        assert result.outputs[0].finish_reason == "length"
        assert len(result.outputs[0].token_ids) == p.max_tokens
        assert_same_greedy(result.outputs[0], alone.outputs[0])
    steps = llm.stats_listener.steps
    assert max(s.num_seqs for s in steps) > 16
    assert all(s.num_tokens <= 256 for s in steps)


def test_a_pool_too_small_for_the_batch_preempts_and_still_matches(reference_llm: LLM) -> None:
    small = make_llm(kv_cache_memory=24 * 16 * 2 * 4 * 4 * 32 * 4, max_num_batched_tokens=128)  # 24 blocks of 16
    assert small.engine.num_kv_blocks == 24
    prompts = random_prompts(10, 20, 120, seed=2)
    params = [greedy(max_tokens=20) for _ in prompts]
    results = small.generate(prompts, params)
    assert sum(r.num_preemptions for r in small.stats_listener.requests) > 0
    for prompt, p, result in zip(prompts, params, results):
        assert_same_greedy(result.outputs[0], reference_llm.generate([prompt], p)[0].outputs[0])
    assert_pool_free(small)
    small.shutdown()


def test_seeded_sampling_does_not_depend_on_the_batch(llm: LLM) -> None:
    prompt = random_prompts(1, 30, 30, seed=3)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].outputs[0].token_ids
    others = random_prompts(7, 5, 90, seed=4)
    mixed_params = [SamplingParams(temperature=0.9, max_tokens=12, seed=i if i % 2 else None) for i in range(7)]
    mixed = llm.generate(others[:3] + [prompt] + others[3:], mixed_params[:3] + [seeded] + mixed_params[3:])
    assert mixed[3].outputs[0].token_ids == alone
    different_seed = llm.generate([prompt], SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=99, ignore_eos=True))
    assert different_seed[0].outputs[0].token_ids != alone


def test_stop_strings_split_across_tokens_end_the_output(llm: LLM) -> None:
    prompt = random_prompts(1, 12, 12, seed=5)[0]
    full = llm.generate([prompt], greedy(max_tokens=24))[0].outputs[0]
    pieces = [llm.tokenizer.decode([t]) for t in full.token_ids]
    # A boundary between tokens k and k + 1 whose four surrounding characters are in the text as decoded whole (the
    # detokenizer cleans up spaces before punctuation, which token-by-token decoding does not).
    k = next(i for i in range(3, len(pieces) - 1)
             if pieces[i].isascii() and pieces[i + 1].isascii() and pieces[i].strip() and pieces[i + 1].strip()
             and pieces[i][-2:] + pieces[i + 1][:2] in full.text)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    cut = full.text.index(stop)
    stopped = llm.generate([prompt], greedy(max_tokens=24, stop=[stop]))[0].outputs[0]
    assert (stopped.text, stopped.finish_reason, stopped.stop_reason) == (full.text[:cut], "stop", stop)
    included = llm.generate([prompt], greedy(max_tokens=24, stop=[stop], include_stop_str_in_output=True))[0].outputs[0]
    assert included.text == full.text[: cut + len(stop)]


def test_n_choices_share_the_prompt_and_each_equals_a_single_run(llm: LLM) -> None:
    prompt = random_prompts(1, 70, 70, seed=6)[0]
    single = llm.generate([prompt], greedy(max_tokens=10))[0].outputs[0]
    three = llm.generate([prompt], greedy(max_tokens=10, n=3))[0]
    assert [c.index for c in three.outputs] == [0, 1, 2]
    for choice in three.outputs:
        assert_same_greedy(choice, single)
    sampled = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=5, ignore_eos=True))[0]
    assert len({tuple(c.token_ids) for c in sampled.outputs}) == 3
    again = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=5, ignore_eos=True))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in sampled.outputs]


def test_prompt_and_output_logprobs_match_a_full_transformers_forward() -> None:
    chunked = make_llm(max_num_batched_tokens=16, kv_cache_memory=4 << 20)  # the prompt spans several chunks
    prompt = random_prompts(1, 45, 45, seed=7)[0]
    result = chunked.generate([prompt], greedy(max_tokens=1, prompt_logprobs=3))[0]
    reference = Dots1ForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([prompt])).logits[0].float(), dim=-1)  # [P, V]
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
    for position, logprob in enumerate(result.prompt_logprobs[1:], start=1):
        assert logprob.token_id == prompt[position]
        assert logprob.logprob == pytest.approx(expected[position - 1, prompt[position]].item(), abs=1e-4)
        assert [t for t, _ in logprob.top] == expected[position - 1].topk(3).indices.tolist()
    first = result.outputs[0].logprobs[0]
    assert first.token_id == expected[-1].argmax().item()
    assert first.logprob == pytest.approx(expected[-1].max().item(), abs=1e-4)
    assert_pool_free(chunked)
    chunked.shutdown()


def test_a_cached_prefix_is_reported_and_gives_the_same_output(llm: LLM) -> None:
    shared = random_prompts(1, 64, 64, seed=8)[0]
    first = llm.generate([shared + [11, 12]], greedy(max_tokens=6))[0]
    second = llm.generate([shared + [11, 12]], greedy(max_tokens=6))[0]
    assert first.num_cached_tokens == 0 or first.num_cached_tokens % 16 == 0
    assert second.num_cached_tokens == 64
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_eos_min_tokens_ignore_eos_and_stop_token_ids(llm: LLM) -> None:
    prompt = [5, 6, 7]
    forced_eos = {EOS: 100.0}
    assert_choice(llm, prompt, SamplingParams(temperature=0.0, max_tokens=5, logit_bias=forced_eos), [EOS], "stop", None)
    delayed = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5, logit_bias=forced_eos, min_tokens=3))[0].outputs[0]
    assert len(delayed.token_ids) == 4 and delayed.token_ids[-1] == EOS and EOS not in delayed.token_ids[:3]
    assert_choice(llm, prompt, SamplingParams(temperature=0.0, max_tokens=3, logit_bias=forced_eos, ignore_eos=True), [EOS] * 3, "length", None)
    assert_choice(llm, prompt, SamplingParams(temperature=0.0, max_tokens=5, logit_bias={42: 100.0}, stop_token_ids=[42]), [42], "stop", 42)


def assert_choice(llm: LLM, prompt: list[int], params: SamplingParams, tokens: list[int], reason: str, stop_reason: object) -> None:
    choice = llm.generate([prompt], params)[0].outputs[0]
    assert (choice.token_ids, choice.finish_reason, choice.stop_reason) == (tokens, reason, stop_reason)


def test_requests_that_can_never_fit_are_rejected_up_front(llm: LLM) -> None:
    limit = llm.engine.max_model_len
    with pytest.raises(RequestRejected) as rejected:
        llm.generate([[1] * (limit - 10)], SamplingParams(max_tokens=20))
    assert rejected.value.code == "context_length_exceeded"
    assert all(str(n) in rejected.value.message for n in (limit, limit - 10, 20))
    with pytest.raises(RequestRejected):
        llm.generate([[1] * limit], SamplingParams())
    with pytest.raises(InvalidParameterError) as invalid:
        llm.generate([[1, 2]], SamplingParams(top_p=0.0))
    assert invalid.value.param == "top_p"
    with pytest.raises(InvalidParameterError) as outside:
        llm.generate([[1, 99999]], SamplingParams())
    assert outside.value.param == "prompt"


def test_abort_frees_blocks_and_unknown_ids_are_ignored(llm: LLM) -> None:
    engine = llm.engine
    prompt = random_prompts(1, 100, 100, seed=9)[0]
    info = engine.info
    resolved = check_request(prompt, greedy(max_tokens=50), info.vocab_size, info.max_model_len, info.sampling_defaults)
    engine.add_request(EngineCoreRequest("a", prompt, resolved, 0.0))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.usage() > 0
    engine.finish_choices([FinishChoice("a", None, "abort"), FinishChoice("never-seen", None, "abort")])
    [output] = engine.step().outputs
    assert output.finished and output.choices[0].finish_reason == "abort"
    engine.finish_choices([FinishChoice("a", None, "abort")])
    assert engine.step().outputs == []
    assert_pool_free(llm)


def test_request_and_step_statistics_are_recorded(llm: LLM) -> None:
    listener = llm.stats_listener
    listener.requests.clear()
    listener.steps.clear()
    prompts = random_prompts(2, 20, 40, seed=10)
    llm.generate(prompts, greedy(max_tokens=5))
    assert sorted(stats.prompt_tokens for stats in listener.requests) == sorted(len(prompt) for prompt in prompts)
    for stats in listener.requests:
        assert stats.arrival_time <= stats.first_scheduled_time <= stats.first_token_time <= stats.finished_time
        assert stats.generation_tokens == len(stats.token_times) == 5
        assert stats.finish_reason == "length" and stats.num_preemptions == 0
    steps = listener.steps
    # Every prompt token not served from the prefix cache is computed once; then 4 decode steps per request (the
    # first token comes with the prompt's last chunk, the fifth is sampled, never computed).
    computed_prompt_tokens = sum(stats.prompt_tokens - stats.num_cached_tokens for stats in listener.requests)
    assert sum(step.num_prefill_tokens for step in steps) == computed_prompt_tokens
    assert sum(step.num_decode_tokens for step in steps) == 2 * 4
    assert all(step.duration_s > 0 and step.num_seqs > 0 for step in steps)
    assert all(0.0 < step.kv_cache_usage <= 1.0 for step in steps[:-1])  # the running requests hold blocks
    assert steps[0].num_running > 0
