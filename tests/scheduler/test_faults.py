"""A request whose post-processing fails (token handling, detokenization) fails alone; a forward or a sampling step
that fails once fails its batch; the rest go on."""
import asyncio
import time
from collections.abc import Iterator

import pytest

from conftest import RecordingListener
from scheduler.async_engine import AsyncEngine
from scheduler.config import EngineConfig
from scheduler.output_processor import RequestState
from scheduler.outputs import RequestOutput
from scheduler.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncEngine]:
    running = AsyncEngine(EngineConfig(dtype="float32", kv_cache_memory=8 << 20), RecordingListener(),
                          engine_process=False)
    running.start()
    yield running
    running.shutdown()


def run_three(engine: AsyncEngine, bad: str) -> dict[str, list[RequestOutput]]:
    async def collect(request_id: str, prompt: list[int]) -> list[RequestOutput]:
        return [o async for o in engine.generate(request_id, prompt, PARAMS, time.monotonic())]

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(collect("first", [1, 2, 3]), collect(bad, [4, 5, 6]), collect("third", [7, 8]))

    return dict(zip(["first", bad, "third"], asyncio.run(main())))


def assert_only_failed(results: dict[str, list[RequestOutput]], bad: str, message: str) -> None:
    for request_id, outputs in results.items():
        last = outputs[-1]
        assert last.finished
        if request_id == bad:
            assert message in last.error and last.outputs[-1].finish_reason == "error"
        else:
            assert last.error is None and last.outputs[-1].finish_reason == "length"
            assert sum(len(d.token_ids) for o in outputs for d in o.outputs) == 6


def wait_idle(engine: AsyncEngine) -> None:
    deadline = time.monotonic() + 60
    core = engine.client.core
    while core.has_unfinished() or core.block_manager.num_free_blocks != core.block_manager.num_blocks:
        assert time.monotonic() < deadline, "the engine did not free every block"
        time.sleep(0.01)


def test_failing_token_handling_in_the_core_fails_that_request_alone(engine: AsyncEngine, monkeypatch) -> None:
    core = engine.client.core
    real = core._postprocess

    def postprocess(request, seq, token_id, logprob, now):
        if request.request_id == "bad-core" and seq.num_output_tokens >= 2:
            raise RuntimeError("injected post-processing bug")
        return real(request, seq, token_id, logprob, now)

    monkeypatch.setattr(core, "_postprocess", postprocess)
    assert_only_failed(run_three(engine, "bad-core"), "bad-core", "injected post-processing bug")
    assert engine.is_alive
    wait_idle(engine)


def test_a_failing_sampling_step_fails_its_batch_once(engine: AsyncEngine, monkeypatch) -> None:
    """No row-by-row retry: it would count penalties and draw from seeded generators a second time."""
    sampler = engine.client.core.sampler
    real = sampler.sample
    failed_batches: list[set[str]] = []

    def sample(logits, seqs):
        if any(seq.request_id == "bad-sample" and seq.num_output_tokens >= 1 for seq in seqs):
            failed_batches.append({seq.request_id for seq in seqs})
            raise RuntimeError("injected sampler bug")
        return real(logits, seqs)

    monkeypatch.setattr(sampler, "sample", sample)
    results = run_three(engine, "bad-sample")
    assert len(failed_batches) == 1 and "bad-sample" in failed_batches[0]
    for request_id, outputs in results.items():
        last = outputs[-1]
        assert last.finished
        if request_id in failed_batches[0]:
            assert "injected sampler bug" in last.error and last.outputs[-1].finish_reason == "error"
        else:
            assert last.error is None and sum(len(d.token_ids) for o in outputs for d in o.outputs) == 6
    assert engine.is_alive
    wait_idle(engine)
    assert sampler.batch.num_free_slots == sampler.batch.max_num_seqs  # the failed rows gave their slots back


def test_failing_detokenization_in_the_front_end_fails_that_request_alone(engine: AsyncEngine, monkeypatch) -> None:
    real = RequestState.apply

    def apply(self, choice):
        if self.request_id == "bad-text" and self.num_output_tokens[0] >= 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer bug")
        return real(self, choice)

    monkeypatch.setattr(RequestState, "apply", apply)
    assert_only_failed(run_three(engine, "bad-text"), "bad-text", "injected detokenizer bug")
    assert engine.is_alive
    wait_idle(engine)  # the core was told to drop the failed request
    finished = {r.request_id: r.finish_reason for r in engine.processor.stats_listener.requests}
    assert finished["bad-text"] == "abort" and finished["first"] == "length"


def test_a_one_off_step_failure_fails_its_batch_and_the_next_requests_succeed(engine: AsyncEngine,
                                                                               monkeypatch) -> None:
    core = engine.client.core
    monkeypatch.setenv("DOTS_SERVE_FAULT_STEP_AT", str(core._num_forwards + 1))  # the next forward raises
    results = run_three(engine, "second")
    errors = [outputs[-1].error for outputs in results.values() if outputs[-1].error is not None]
    assert errors and all("injected failure of forward" in error for error in errors)
    for outputs in results.values():
        assert outputs[-1].finished
        assert outputs[-1].outputs[-1].finish_reason == ("error" if outputs[-1].error else "length")
    assert engine.is_alive
    wait_idle(engine)
    for outputs in run_three(engine, "again").values():
        assert outputs[-1].error is None and outputs[-1].outputs[-1].finish_reason == "length"
