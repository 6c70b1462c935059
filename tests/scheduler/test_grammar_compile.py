"""Grammars compile off the engine step: a request waits (holding no KV blocks) while its grammar compiles on a
worker and the others keep decoding; one compilation per key; a failing compilation fails only its request; the front
end validates without compiling."""
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from conftest import assert_pool_free

from scheduler.core_messages import EngineCoreRequest, FinishChoice
from scheduler.engine_core import EngineCore
from scheduler.llm import LLM
from scheduler.request_check import check_request
from scheduler.sampling_params import InvalidParameterError, SamplingParams
from scheduler.structured_output.backend import CompiledGrammar
from scheduler.structured_output.spec import InvalidConstraintError, StructuredOutputSpec

MAX_STEPS = 2000  # a bound on a test's engine steps, so that a broken engine fails the test instead of hanging it
RELEASE_TIMEOUT_S = 60.0  # a gated compilation never waits longer (a safety net, not an expectation)
PLAIN = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


class GatedCompile:
    """Wraps the core backend's ``compile``: counts calls per key; ``spec``'s compilation waits for ``release`` and
    then fails if ``error`` is set."""

    def __init__(self, llm: LLM, monkeypatch: pytest.MonkeyPatch, spec: StructuredOutputSpec,
                 error: str | None = None) -> None:
        self.backend = llm.engine.structured_output.compiler.backend
        self.real = self.backend.compile
        self.spec = spec
        self.error = error
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls: Counter[tuple[str, str]] = Counter()
        monkeypatch.setattr(self.backend, "compile", self)

    def __call__(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        self.calls[spec.key] += 1
        if spec.key == self.spec.key:
            self.started.set()
            assert self.release.wait(RELEASE_TIMEOUT_S), "the test never released the compilation"
            if self.error is not None:
                raise InvalidConstraintError(self.error)
        return self.real(spec)


@dataclass
class Seen:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish_reasons: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)


def add(core: EngineCore, request_id: str, prompt: list[int], params: SamplingParams) -> None:
    """As a front end adds a request: checked and resolved first (the core trusts what it is handed)."""
    info = core.info
    resolved = check_request(prompt, params, info.vocab_size, info.max_model_len, info.sampling_defaults)
    core.add_request(EngineCoreRequest(request_id, prompt, resolved, time.monotonic()))


def step_until(core: EngineCore, seen: Seen, done) -> Seen:
    for _ in range(MAX_STEPS):
        if done(seen):
            return seen
        for output in core.step().outputs:
            rid = output.request_id
            for choice in output.choices:
                if choice.token_ids:
                    seen.tokens.setdefault(rid, []).extend(choice.token_ids)
                if choice.finish_reason is not None:
                    seen.finish_reasons.setdefault(rid, []).append(choice.finish_reason)
            if output.error is not None:
                seen.errors[rid] = output.error
            if output.finished:
                seen.finished.add(rid)
    raise AssertionError(f"not done after {MAX_STEPS} steps: {seen}")


def regex_params(pattern: str, seed: int = 0, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=40,
                          structured_output=StructuredOutputSpec("regex", pattern))


def test_a_slow_grammar_waits_off_the_step_while_other_requests_decode(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = llm.engine
    constrained = regex_params("(yes|no), slow [0-9]{3}")
    gate = GatedCompile(llm, monkeypatch, constrained.structured_output)
    add(core, "slow", [1, 2, 3], constrained)
    add(core, "plain", [4, 5, 6], PLAIN)
    seen = step_until(core, Seen(), lambda seen: "plain" in seen.finished)
    assert gate.started.is_set() and not gate.release.is_set()  # the compilation is still blocked in its worker
    assert len(seen.tokens["plain"]) == 8 and seen.finish_reasons["plain"] == ["length"]
    assert "slow" not in seen.tokens and "slow" not in seen.finished
    assert core.has_unfinished() and core.structured_output.num_compiling == 1
    assert not core.scheduler.running and len(core.scheduler.waiting) == 1  # waiting, not admitted
    assert all(block.ref_count == 0 for block in core.block_manager.blocks)  # and holding no KV blocks
    gate.release.set()
    seen = step_until(core, seen, lambda seen: "slow" in seen.finished)
    assert seen.finish_reasons["slow"] == ["stop"] and "slow" not in seen.errors
    assert re.fullmatch("(yes|no), slow [0-9]{3}", llm.tokenizer.decode(seen.tokens["slow"]))
    assert gate.calls[constrained.structured_output.key] == 1
    assert core.structured_output.num_active == 0 and core.structured_output.num_compiling == 0
    assert_pool_free(llm)


def test_requests_with_one_constraint_share_one_compilation(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    core = llm.engine
    pattern = "shared [a-c]{4}"
    gate = GatedCompile(llm, monkeypatch, StructuredOutputSpec("regex", pattern))
    add(core, "first", [7, 8, 9], regex_params(pattern, seed=1))
    add(core, "second", [10, 11], regex_params(pattern, seed=2, n=2))
    assert gate.started.wait(RELEASE_TIMEOUT_S)
    add(core, "third", [12], regex_params(pattern, seed=3))  # arrives while the compilation runs
    assert core.structured_output.num_compiling == 3
    gate.release.set()
    seen = step_until(core, Seen(), lambda seen: {"first", "second", "third"} <= seen.finished)
    assert gate.calls == Counter({("regex", pattern): 1})
    assert not seen.errors
    assert seen.finish_reasons == {"first": ["stop"], "second": ["stop", "stop"], "third": ["stop"]}
    assert re.fullmatch(pattern, llm.tokenizer.decode(seen.tokens["first"]))
    add(core, "cached", [13], regex_params(pattern, seed=4))  # compiled already: it runs without waiting
    assert core.structured_output.num_compiling == 0
    step_until(core, seen, lambda seen: "cached" in seen.finished)
    assert gate.calls == Counter({("regex", pattern): 1})
    assert_pool_free(llm)


def test_a_failing_compilation_fails_only_its_request(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    core = llm.engine
    pattern = "fails [0-9]+"
    gate = GatedCompile(llm, monkeypatch, StructuredOutputSpec("regex", pattern), error="injected compile failure")
    add(core, "doomed", [1, 2], regex_params(pattern, n=2))
    add(core, "plain", [3, 4], PLAIN)
    seen = step_until(core, Seen(), lambda seen: "plain" in seen.tokens)
    gate.release.set()
    seen = step_until(core, seen, lambda seen: {"doomed", "plain"} <= seen.finished)
    assert "injected compile failure" in seen.errors["doomed"]
    assert seen.finish_reasons["doomed"] == ["error", "error"] and "doomed" not in seen.tokens
    assert "plain" not in seen.errors and len(seen.tokens["plain"]) == 8
    add(core, "again", [5], regex_params(pattern))  # the failure is cached: it fails at once, nothing recompiles
    seen = step_until(core, seen, lambda seen: "again" in seen.finished)
    assert "injected compile failure" in seen.errors["again"] and gate.calls[("regex", pattern)] == 1
    assert core.structured_output.num_compiling == 0
    assert_pool_free(llm)


def test_a_request_aborted_while_its_grammar_compiles_leaves_nothing(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = llm.engine
    pattern = "aborted [0-9]"
    gate = GatedCompile(llm, monkeypatch, StructuredOutputSpec("regex", pattern))
    add(core, "gone", [1, 2], regex_params(pattern, n=2))
    compilation = core.structured_output.compiler.submit(gate.spec)
    assert gate.started.wait(RELEASE_TIMEOUT_S)
    core.finish_choices([FinishChoice("gone", None, "abort")])
    seen = step_until(core, Seen(), lambda seen: "gone" in seen.finished)
    assert seen.finish_reasons["gone"] == ["abort", "abort"]
    assert core.structured_output.num_compiling == 0 and not core.has_unfinished()
    gate.release.set()
    compilation.result(RELEASE_TIMEOUT_S)
    core.step()  # the finished compilation of a forgotten request readies nothing
    assert core.structured_output.num_active == 0 and not seen.errors
    assert_pool_free(llm)


def test_the_front_end_validates_without_compiling(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """``LLM.generate`` checks constraints before anything runs, with a validator that never builds a grammar: the
    core compiles each key once, and a constraint that cannot be enforced still raises before it is sent."""
    def never(spec: StructuredOutputSpec) -> CompiledGrammar:
        raise AssertionError("the front end compiled a grammar")

    monkeypatch.setattr(llm.grammar_validator.backend, "compile", never)
    pattern = "validated [xy]{2}"
    gate = GatedCompile(llm, monkeypatch, StructuredOutputSpec("regex", "unrelated"))
    [result] = llm.generate([[1, 2, 3]], regex_params(pattern))
    assert result.error is None and re.fullmatch(pattern, result.outputs[0].text)
    assert gate.calls == Counter({("regex", pattern): 1})
    invalid = StructuredOutputSpec("json_schema", '{"type": "objectt"}')
    with pytest.raises(InvalidParameterError, match="objectt"):
        llm.generate([[1]], SamplingParams(structured_output=invalid))
    assert gate.calls == Counter({("regex", pattern): 1})


def test_an_unexpected_compile_crash_fails_its_request_and_a_later_one_retries(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = llm.engine
    pattern = "crash once [0-9]"
    backend = core.structured_output.compiler.backend
    real = backend.compile
    calls = Counter()

    def crashes_first(spec: StructuredOutputSpec) -> CompiledGrammar:
        calls[spec.key] += 1
        if spec.key == ("regex", pattern) and calls[spec.key] == 1:
            raise RuntimeError("injected compiler crash")
        return real(spec)

    monkeypatch.setattr(backend, "compile", crashes_first)
    add(core, "crashed", [1, 2], regex_params(pattern))
    seen = step_until(core, Seen(), lambda seen: "crashed" in seen.finished)
    assert "injected compiler crash" in seen.errors["crashed"] and seen.finish_reasons["crashed"] == ["error"]
    add(core, "retried", [3, 4], regex_params(pattern))
    seen = step_until(core, seen, lambda seen: "retried" in seen.finished)
    assert "retried" not in seen.errors and re.fullmatch(pattern, llm.tokenizer.decode(seen.tokens["retried"]))
    assert calls[("regex", pattern)] == 2
    assert_pool_free(llm)
