"""The asyncio face of the engine core for the server: requests in, per-request streams of text deltas out.

One output thread per front end takes each batch the core sends (one per engine step), detokenizes it and checks
stop strings (``OutputProcessor``) outside the lock that guards the table of streams, then hands every request's
output to its stream with one event-loop wake-up per batch. By default the core runs in its own process
(``MultiprocessClient``), so nothing here competes with the model for the GIL; ``engine_process=False`` runs it on
the output thread instead (``InprocClient``).
"""
import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from scheduler.config import EngineConfig
from scheduler.core_client import InprocClient, MultiprocessClient
from scheduler.core_messages import EngineCoreRequest, FinishChoice
from scheduler.output_processor import OutputProcessor
from scheduler.outputs import EngineDeadError, RequestOutput, RequestRejected
from scheduler.request_check import check_request
from scheduler.sampling_params import SamplingParams
from scheduler.stats import StatsListener
from scheduler.structured_output.factory import create_constraint_validator
from scheduler.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: "asyncio.Queue[RequestOutput | BaseException]"


class RequestStream:
    """One request's outputs, in order; ``close()`` before the last one aborts the request."""

    def __init__(self, engine: "AsyncEngine", request_id: str, stream: _Stream) -> None:
        self.engine = engine
        self.request_id = request_id
        self._stream = stream
        self.finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._stream.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
            self.engine._forget(self.request_id)
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine._abandon(self.request_id)


class AsyncEngine:
    def __init__(
        self, config: EngineConfig, stats_listener: StatsListener | None = None, engine_process: bool = True,
        on_dead: Callable[[EngineDeadError], None] | None = None, cancel_start: threading.Event | None = None,
    ) -> None:
        """``cancel_start``: set from another thread, it stops an engine process that is still loading (the
        constructor then raises StartCancelled)."""
        self.tokenizer = load_tokenizer(config.model)  # the caller's (tokenizing prompts, chat templates)
        # Its own tokenizer: only the output thread decodes with it.
        self.processor = OutputProcessor(load_tokenizer(config.model), stats_listener)
        self.client = MultiprocessClient(config, cancel_start) if engine_process else InprocClient(config)
        self.info = self.client.info
        self.vocab_size = self.info.vocab_size
        self.max_model_len = self.info.max_model_len
        self.num_kv_blocks = self.info.num_kv_blocks
        self.device = self.info.device
        self.dtype = self.info.dtype
        # The server validates each constraint (without compiling it: the core does, once per key, off its step) to
        # answer one that cannot be enforced with a 400 before the request is sent.
        self.grammar_validator = create_constraint_validator(self.tokenizer, self.vocab_size, self.info.eos_token_ids)
        self.on_dead = on_dead
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._dead: EngineDeadError | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._thread = threading.Thread(target=self._run, name="engine-outputs", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._dead is None and not self._stopping and self.client.is_alive

    @property
    def num_running(self) -> int:
        return self.processor.num_running

    @property
    def num_waiting(self) -> int:
        return self.processor.num_waiting

    def kv_cache_usage(self) -> float:
        return self.processor.kv_cache_usage

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """The engine core's own check (see request_check.py); returns the resolved parameters."""
        return check_request(prompt_token_ids, params, self.vocab_size, self.max_model_len,
                             self.info.sampling_defaults)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float,
        priority: int = 0, checked: bool = False,
    ) -> RequestStream:
        """Sends the request to the core; raises its validation errors here, before any output. ``checked``:
        ``params`` came from ``check_request`` already (the server checks each request once, and the core trusts
        what a front end sends)."""
        self._raise_if_dead()
        resolved = params if checked else self.check_request(prompt_token_ids, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._raise_if_dead()
            if request_id in self._streams:
                raise RequestRejected(f"request id {request_id!r} is already in use", code="duplicate_request_id")
            self._streams[request_id] = stream
            self.processor.add(request_id, list(prompt_token_ids), resolved)
            try:
                self.client.add_request(
                    EngineCoreRequest(request_id, list(prompt_token_ids), resolved, arrival_time, priority)
                )
            except EngineDeadError:
                self._streams.pop(request_id, None)
                self.processor.remove(request_id)
                raise
        return RequestStream(self, request_id, stream)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's deltas. Validation errors are raised before the first one; stopping early aborts it."""
        stream = self.add_request(request_id, prompt_token_ids, params, arrival_time, priority)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Ends the request in the core; its stream then gets a last output with finish reason "abort"."""
        self._finish([FinishChoice(request_id, None, "abort")])

    def shutdown(self) -> None:
        """Aborts every request (each stream gets its last output), stops the core and joins the output thread."""
        with self._lock:
            self._stopping = True
        self.client.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if isinstance(self.client, MultiprocessClient) and (self._thread is None or not self._thread.is_alive()):
            self.client.close()

    def _raise_if_dead(self) -> None:
        if self._thread is None or self._dead is not None or self._stopping or not self.client.is_alive:
            raise EngineDeadError(str(self._dead) if self._dead else "the engine is not running (not started, shut "
                                  "down, or its process died)")

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def _abandon(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            known = request_id in self.processor.requests
            self.processor.remove(request_id)
        if known:
            self._finish([FinishChoice(request_id, None, "abort")])

    def _finish(self, items: list[FinishChoice]) -> None:
        try:
            self.client.finish_choices(items)
        except EngineDeadError:
            pass  # every stream is failed by the output thread anyway

    def _run(self) -> None:
        try:
            while (outputs := self.client.get_outputs()) is not None:
                batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
                with self._lock:
                    claimed = self.processor.claim(outputs)
                # Detokenization, stop strings and metrics run unlocked: add_request on the event loop never waits
                # for a batch's text. Only this thread touches a claimed request's state.
                results, to_finish = self.processor.convert(outputs, claimed)
                with self._lock:
                    self.processor.release(claimed, results)
                    for result in results:
                        stream = self._streams.get(result.request_id)
                        if stream is not None:
                            batches[stream.loop].append((stream.queue, result))
                self._finish(to_finish)
                for loop, items in batches.items():
                    _deliver(loop, items)
            self._fail_streams(EngineDeadError("the engine is shut down"))
        except BaseException as error:
            dead = error if isinstance(error, EngineDeadError) else EngineDeadError(f"the engine loop died: {error!r}")
            if not isinstance(error, EngineDeadError):
                logger.exception("the engine output loop died")
            self._dead = dead
            self._fail_streams(dead)
            if self.on_dead is not None:
                self.on_dead(dead)

    def _fail_streams(self, error: EngineDeadError) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        with self._lock:
            streams, self._streams = self._streams, {}
            self.processor.requests.clear()
        for stream in streams.values():
            batches[stream.loop].append((stream.queue, error))
        for loop, items in batches.items():
            _deliver(loop, items)


def _deliver(loop: asyncio.AbstractEventLoop, items: list) -> None:
    """One wake-up of ``loop`` fills every listed queue."""
    def put_all() -> None:
        for queue, item in items:
            queue.put_nowait(item)
    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # that event loop is closed: its consumers are gone
        pass
