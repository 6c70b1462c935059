"""The engine behind asyncio (the core on the output thread, InprocClient): concurrent streams, cancellation,
failing steps and post-processing, a dead loop, shutdown."""
import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import RecordingListener, random_prompts
from scheduler.async_engine import AsyncEngine
from scheduler.config import EngineConfig
from scheduler.llm import LLM
from scheduler.outputs import EngineDeadError, RequestOutput, RequestRejected
from scheduler.sampling_params import SamplingParams


def start_engine(**options: object) -> AsyncEngine:
    engine = AsyncEngine(EngineConfig(dtype="float32", kv_cache_memory=8 << 20, **options), RecordingListener(),
                         engine_process=False)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncEngine]:
    running = start_engine(max_num_batched_tokens=128)
    yield running
    running.shutdown()


def pool_is_free(engine: AsyncEngine) -> bool:
    manager = engine.client.core.block_manager
    return engine.num_running == 0 and engine.num_waiting == 0 and manager.num_free_blocks == manager.num_blocks


async def wait_until_pool_free(engine: AsyncEngine) -> None:
    deadline = time.monotonic() + 60
    while not pool_is_free(engine):
        assert time.monotonic() < deadline, "blocks were not freed"
        await asyncio.sleep(0.01)


def finish_reason_of(engine: AsyncEngine, request_id: str) -> str:
    stats = [r for r in engine.processor.stats_listener.requests if r.request_id == request_id]
    assert len(stats) == 1 and stats[0].generation_tokens < 500
    return stats[0].finish_reason


async def collect(engine: AsyncEngine, request_id: str, prompt: list[int], params: SamplingParams) -> list[RequestOutput]:
    return [output async for output in engine.generate(request_id, prompt, params, time.monotonic())]


def test_concurrent_streams_match_the_offline_engine(engine: AsyncEngine, llm: LLM) -> None:
    prompts = random_prompts(8, 5, 80, seed=20)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(engine, f"c{i}", p, params) for i, p in enumerate(prompts)))

    streams = asyncio.run(main())
    expected = llm.generate(prompts, params)
    for outputs, offline in zip(streams, expected):
        assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
        tokens = [t for o in outputs for d in o.outputs for t in d.token_ids]
        text = "".join(d.text for o in outputs for d in o.outputs)
        assert tokens == offline.outputs[0].token_ids and text == offline.outputs[0].text
        assert outputs[-1].outputs[-1].finish_reason == "length"
    asyncio.run(wait_until_pool_free(engine))


def test_a_consumer_that_stops_aborts_its_request_and_frees_blocks(engine: AsyncEngine) -> None:
    async def main() -> None:
        stream = engine.generate("gone", random_prompts(1, 150, 150, seed=21)[0], SamplingParams(max_tokens=500, ignore_eos=True), time.monotonic())
        async for _ in stream:
            break
        await stream.aclose()
        await wait_until_pool_free(engine)

    asyncio.run(main())
    assert finish_reason_of(engine, "gone") == "abort"


def test_a_cancelled_consumer_task_aborts_its_request(engine: AsyncEngine) -> None:
    async def main() -> None:
        first_output = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate("cancelled", [1, 2, 3], SamplingParams(max_tokens=500, ignore_eos=True), time.monotonic()):
                first_output.set()

        task = asyncio.create_task(consume())
        await first_output.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until_pool_free(engine)

    asyncio.run(main())
    assert finish_reason_of(engine, "cancelled") == "abort"


def test_rejections_are_raised_before_the_first_output(engine: AsyncEngine) -> None:
    async def main() -> None:
        with pytest.raises(RequestRejected):
            await collect(engine, "long", [1] * engine.max_model_len, SamplingParams(max_tokens=5))

    asyncio.run(main())
    assert engine.is_alive


def test_a_failing_forward_fails_only_its_batch_and_the_engine_keeps_serving() -> None:
    engine = start_engine(max_num_seqs=1)  # the second request waits, outside the failing batch
    real_execute = engine.client.core.executor.execute
    failures = []

    def execute_failing_once(batch):
        if not failures and batch.num_tokens == 1:  # a decode step of the first request
            failures.append(batch)
            raise RuntimeError("injected device error")
        return real_execute(batch)

    engine.client.core.executor.execute = execute_failing_once
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    async def main() -> tuple[list[RequestOutput], list[RequestOutput]]:
        return await asyncio.gather(collect(engine, "first", [1, 2, 3], params), collect(engine, "second", [4, 5, 6], params))

    failed, served = asyncio.run(main())
    assert failures
    assert failed[-1].finished and "injected device error" in failed[-1].error
    assert failed[-1].outputs[-1].finish_reason == "error"
    assert served[-1].error is None and served[-1].outputs[-1].finish_reason == "length"
    assert sum(len(d.token_ids) for o in served for d in o.outputs) == 6
    assert engine.is_alive
    asyncio.run(wait_until_pool_free(engine))
    engine.shutdown()


def test_a_dead_loop_reports_itself_and_fails_pending_and_new_requests() -> None:
    engine = start_engine()

    def broken_step():
        raise RuntimeError("scheduler bug")

    engine.client.core.step = broken_step

    async def main() -> None:
        with pytest.raises(EngineDeadError):
            await collect(engine, "pending", [1, 2, 3], SamplingParams(max_tokens=5))
        assert not engine.is_alive
        with pytest.raises(EngineDeadError):
            await collect(engine, "new", [1, 2, 3], SamplingParams(max_tokens=5))

    asyncio.run(main())
    engine.shutdown()


def test_an_engine_that_was_never_started_refuses_requests() -> None:
    engine = AsyncEngine(EngineConfig(dtype="float32", kv_cache_memory=1 << 20), engine_process=False)
    assert not engine.is_alive

    async def main() -> None:
        with pytest.raises(EngineDeadError):
            await collect(engine, "early", [1, 2, 3], SamplingParams(max_tokens=2))

    asyncio.run(main())
    engine.shutdown()


def test_shutdown_aborts_requests_in_flight() -> None:
    engine = start_engine()

    async def main() -> list[RequestOutput]:
        outputs = []
        async for output in engine.generate("long", [1, 2, 3], SamplingParams(max_tokens=1000, ignore_eos=True), time.monotonic()):
            outputs.append(output)
            if len(outputs) == 2:
                await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].outputs[-1].finish_reason == "abort"
    assert not engine.is_alive


def test_a_new_request_does_not_wait_for_a_batch_being_detokenized(engine: AsyncEngine, monkeypatch) -> None:
    """The output thread holds the engine's lock around its table of streams only, not around detokenization."""
    converting, release = threading.Event(), threading.Event()
    gave_up: list[bool] = []
    convert = engine.processor.convert

    def slow_convert(*args):
        converting.set()
        gave_up.append(not release.wait(10))  # a deadlock guard: a lock held here would block add_request until then
        return convert(*args)

    monkeypatch.setattr(engine.processor, "convert", slow_convert)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)

    async def main() -> list[RequestOutput]:
        first = asyncio.create_task(collect(engine, "held", [5, 6, 7], params))
        assert await asyncio.to_thread(converting.wait, 60)  # the output thread is inside convert()
        added = engine.add_request("meanwhile", [8, 9], params, time.monotonic())
        release.set()
        monkeypatch.setattr(engine.processor, "convert", convert)
        outputs = [output async for output in added]
        await first
        return outputs

    try:
        outputs = asyncio.run(main())
    finally:
        release.set()
    assert gave_up[0] is False
    assert outputs[-1].finished and sum(len(d.token_ids) for o in outputs for d in o.outputs) == 3


def test_a_request_the_front_end_checked_is_not_checked_again(engine: AsyncEngine, monkeypatch) -> None:
    """The server resolves a request's parameters once (engine.check_request); neither add_request nor the core
    checks them again."""
    import scheduler.async_engine as async_engine_module

    calls: list[list[int]] = []
    real = async_engine_module.check_request
    monkeypatch.setattr(async_engine_module, "check_request", lambda prompt, *args: calls.append(prompt) or
                        real(prompt, *args))
    prompt = [3, 4, 5]
    resolved = engine.check_request(prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))

    async def main() -> list[RequestOutput]:
        return [output async for output in engine.add_request("checked-once", prompt, resolved, time.monotonic(),
                                                              checked=True)]

    outputs = asyncio.run(main())
    assert calls == [prompt]
    assert outputs[-1].finished and sum(len(d.token_ids) for o in outputs for d in o.outputs) == 3
