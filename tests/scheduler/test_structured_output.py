"""Grammar-constrained decoding in the engine (llguidance on the embedded tokenizer): masks, cache, n, seeds,
logprobs after the mask, stop strings, preemption, prefix cache, and unconstrained neighbours left unchanged."""
import json
import re

import jsonschema
import llguidance
import pytest
import torch
from conftest import assert_pool_free, make_llm, random_prompts

from scheduler.llm import LLM, Completion
from scheduler.sampling_params import InvalidParameterError, SamplingParams
from scheduler.structured_output.backend import apply_bitmask, bitmask_words
from scheduler.structured_output.llguidance_backend import PARALLEL_MIN_ROWS, LLGuidanceBackend
from scheduler.structured_output.spec import InvalidConstraintError, StructuredOutputSpec

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}


def assert_same_greedy(batched: Completion, alone: Completion) -> None:
    """Equal tokens; a divergence is only accepted at a near tie of the two best tokens (float summation order)."""
    for position, (got, expected) in enumerate(zip(batched.token_ids, alone.token_ids)):
        if got != expected:
            (_, best_logprob), (_, second_logprob) = alone.logprobs[position].top
            assert best_logprob - second_logprob < 1e-4, f"diverged at token {position} without a near tie"
            return
    assert batched.token_ids == alone.token_ids


def schema_spec(schema: dict) -> StructuredOutputSpec:
    return StructuredOutputSpec("json_schema", json.dumps(schema))


def sampled(spec: StructuredOutputSpec | None, seed: int, **params: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": seed, "max_tokens": 120, "structured_output": spec, **params})


def test_apply_bitmask_keeps_exactly_the_allowed_tokens() -> None:
    vocab = 70  # not a multiple of 32: the last word is partly past the vocabulary
    allowed = torch.rand(3, vocab) < 0.3
    words = torch.zeros(3, 3, dtype=torch.int64)
    for row, token in allowed.nonzero().tolist():
        words[row, token // 32] |= 1 << (token % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # bit 31 is the sign bit
    logits = torch.randn(3, vocab)
    expected = torch.where(allowed, logits, torch.tensor(float("-inf")))
    apply_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)


def test_parallel_and_one_by_one_mask_filling_agree(llm: LLM) -> None:
    backend = LLGuidanceBackend(llm.tokenizer, llm.engine.model_config.vocab_size, [4095, 4089])
    grammar = backend.compile(schema_spec(PERSON))
    matchers = [grammar.new_matcher() for _ in range(PARALLEL_MIN_ROWS)]
    for index, matcher in enumerate(matchers):  # each at a different point of the grammar
        for token in llm.tokenizer.encode('{"name":"ab' + "c" * (index % 3) + '","age":1' + "2" * (index % 2)):
            assert matcher.consume(token)
    masks = {}
    for executor in (None, llguidance.LLExecutor(num_threads=2)):
        backend.executor = executor
        masks[executor is None] = torch.zeros(len(matchers), bitmask_words(backend.vocab_size), dtype=torch.int32)
        backend.fill_masks(matchers, masks[executor is None])
    assert torch.equal(masks[True], masks[False]) and masks[True].any()


def test_the_compile_cache_returns_one_grammar_per_constraint_and_caches_failures(llm: LLM) -> None:
    compiler = llm.engine.structured_output.compiler
    spec = schema_spec({"type": "object", "properties": {"cache_probe": {"type": "boolean"}}})
    first = compiler.compile(spec)
    hits = compiler.hits
    assert compiler.compile(StructuredOutputSpec(spec.kind, spec.value)) is first
    assert compiler.hits == hits + 1
    bad = schema_spec({"type": "object", "properties": {"x": {"type": "string", "format": "no-such-format"}}})
    for _ in range(2):
        with pytest.raises(InvalidConstraintError, match="no-such-format"):
            compiler.compile(bad)
    assert compiler.hits == hits + 2


@pytest.mark.parametrize("spec, message", [
    (StructuredOutputSpec("json_schema", '{"type": "objectt"}'), "objectt"),
    (StructuredOutputSpec("json_schema", "{not json"), "not valid JSON"),
    (StructuredOutputSpec("regex", "[a-"), "regex"),
    (StructuredOutputSpec("lark", "start: undefined_rule"), "undefined_rule"),
    (StructuredOutputSpec("tool_calls", "{}"), "unknown constraint kind"),  # tool formats are the server's
])
def test_an_invalid_constraint_is_rejected_before_it_runs(llm: LLM, spec: StructuredOutputSpec, message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message) as error:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, structured_output=spec))
    assert error.value.param == "response_format"


def test_json_schema_outputs_validate_for_every_seed_and_choice(llm: LLM) -> None:
    prompts = random_prompts(3, 5, 40, seed=11)
    results = llm.generate(prompts, [sampled(schema_spec(PERSON), seed, n=2, logprobs=1) for seed in range(3)])
    for result in results:
        for output in result.outputs:
            assert output.finish_reason == "stop", output
            jsonschema.validate(json.loads(output.text), PERSON)
            assert all(entry.logprob > float("-inf") for entry in output.logprobs)
    assert llm.engine.structured_output.num_active == 0  # every matcher released


def test_seeded_constrained_output_does_not_depend_on_the_batch(llm: LLM) -> None:
    prompt = random_prompts(1, 20, 20, seed=12)[0]
    alone = llm.generate([prompt], sampled(schema_spec(PERSON), seed=5))[0].outputs[0]
    others = random_prompts(5, 5, 60, seed=13)
    batch = llm.generate([prompt, *others], [sampled(schema_spec(PERSON), seed=5)] + [sampled(None, seed=1)] * 5)
    assert batch[0].outputs[0].token_ids == alone.token_ids


def test_logprobs_are_reported_after_the_mask(llm: LLM) -> None:
    """With one allowed token, it has all the probability: logprob 0, every alternative -inf."""
    params = SamplingParams(temperature=1.0, max_tokens=5, logprobs=3,
                            structured_output=StructuredOutputSpec("choice", json.dumps(["7"])))
    [output] = llm.generate([[5, 6, 7]], params)[0].outputs
    assert output.text == "7" and output.finish_reason == "stop"
    [entry] = output.logprobs
    assert entry.logprob == 0.0
    assert entry.top[0] == (entry.token_id, 0.0)
    assert all(logprob == float("-inf") for _, logprob in entry.top[1:])


def test_unconstrained_neighbours_are_unchanged(llm: LLM, reference_llm: LLM) -> None:
    prompts = random_prompts(6, 5, 80, seed=14)
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    constrained = [sampled(schema_spec(PERSON), seed) for seed in range(3)]
    batch = llm.generate(prompts, [plain, constrained[0], plain, constrained[1], plain, constrained[2]])
    for index in (0, 2, 4):
        alone = reference_llm.generate([prompts[index]], plain)[0].outputs[0]
        assert_same_greedy(batch[index].outputs[0], alone)


def test_regex_choice_and_lark_constraints(llm: LLM) -> None:
    specs = {
        "regex": (StructuredOutputSpec("regex", r"(yes|no), [0-9]{3}"), r"(yes|no), [0-9]{3}"),
        "choice": (StructuredOutputSpec("choice", json.dumps(["left", "right"])), r"left|right"),
        "lark": (StructuredOutputSpec("lark", 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9]/'), r"\([1-9](\+[1-9])*\)"),
    }
    params = [sampled(spec, seed) for spec, _ in specs.values() for seed in range(3)]
    results = llm.generate([[9, 8, 7]] * len(params), params)
    patterns = [pattern for _, pattern in specs.values() for _ in range(3)]
    for result, pattern in zip(results, patterns):
        output = result.outputs[0]
        assert output.finish_reason == "stop" and re.fullmatch(pattern, output.text), output


def test_a_stop_string_still_ends_a_constrained_output(llm: LLM) -> None:
    spec = StructuredOutputSpec("regex", "abc[0-9]def")
    [output] = llm.generate([[1, 2]], sampled(spec, seed=0, stop=["c"]))[0].outputs
    assert output.text == "ab" and output.finish_reason == "stop" and output.stop_reason == "c"


def test_the_prefix_cache_serves_a_repeated_constrained_request(llm: LLM) -> None:
    prompt = random_prompts(1, 70, 70, seed=15)[0]
    first = llm.generate([prompt], sampled(schema_spec(PERSON), seed=3))[0]
    again = llm.generate([prompt], sampled(schema_spec(PERSON), seed=3))[0]
    assert again.num_cached_tokens >= 64
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_preempted_constrained_sequences_resume_their_grammar(reference_llm: LLM) -> None:
    small = make_llm(kv_cache_memory=8 * 16 * 2 * 4 * 4 * 32 * 4, max_num_batched_tokens=128)  # 8 blocks of 16
    prompts = random_prompts(4, 20, 40, seed=16)
    params = [sampled(schema_spec(PERSON), seed, max_tokens=80) for seed in range(4)]  # fits the 128-token pool
    results = small.generate(prompts, params)
    assert sum(r.num_preemptions for r in small.stats_listener.requests) > 0
    for prompt, p, result in zip(prompts, params, results):
        output = result.outputs[0]
        jsonschema.validate(json.loads(output.text), PERSON)
        assert output.token_ids == reference_llm.generate([prompt], p)[0].outputs[0].token_ids
    assert_pool_free(small)
    assert small.engine.structured_output.num_active == 0
    small.shutdown()


def test_constraints_travel_to_the_engine_process_and_end_with_their_last_token(llm: LLM) -> None:
    """The constraint crosses the process boundary in SamplingParams; a completed grammar comes back as "stop" with
    its last token as text (flushed by the front end), token for token what the in-process core gives."""
    prompts = random_prompts(3, 5, 40, seed=17)
    params = [sampled(schema_spec(PERSON), seed=0, n=2, logprobs=1),
              sampled(StructuredOutputSpec("regex", "abc[0-9]def"), seed=1, stop=["c"]),
              sampled(None, seed=2, max_tokens=6, ignore_eos=True)]
    expected = llm.generate(prompts, params)
    remote = make_llm(max_num_batched_tokens=256, kv_cache_memory=8 << 20, engine_process=True)
    try:
        assert remote.engine is None
        results = remote.generate(prompts, params)
        with pytest.raises(InvalidParameterError, match="objectt") as error:  # the front end's own validator
            remote.generate([[1, 2, 3]], sampled(StructuredOutputSpec("json_schema", '{"type": "objectt"}'), seed=0))
        assert error.value.param == "response_format"
    finally:
        remote.shutdown()
    for got, want in zip(results, expected):
        assert [(c.token_ids, c.text, c.finish_reason) for c in got.outputs] == \
               [(c.token_ids, c.text, c.finish_reason) for c in want.outputs]
    for output in results[0].outputs:
        assert output.finish_reason == "stop"
        jsonschema.validate(json.loads(output.text), PERSON)  # the closing brace is the grammar's last token
    assert results[1].outputs[0].text == "ab" and results[1].outputs[0].stop_reason == "c"


def test_a_failing_mask_fails_only_the_constrained_requests(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(matchers: list, bitmask: torch.Tensor) -> None:
        raise RuntimeError("mask fill injected failure")

    monkeypatch.setattr(llm.engine.structured_output.compiler.backend, "fill_masks", broken)
    plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    constrained, neighbour = llm.generate([[1, 2, 3], [4, 5, 6]], [sampled(schema_spec(PERSON), seed=0), plain])
    assert constrained.outputs[0].finish_reason == "error" and "mask fill injected failure" in constrained.error
    assert neighbour.error is None and neighbour.outputs[0].finish_reason == "length"
    assert len(neighbour.outputs[0].token_ids) == 6
    assert llm.engine.structured_output.num_active == 0 and not llm.engine.has_unfinished()
