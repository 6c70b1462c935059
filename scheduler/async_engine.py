"""The engine loop in its own thread, and the asyncio face the server uses.

The server's event loop never runs torch: ``generate`` hands a request to the engine thread through a locked inbox
and receives its deltas through a per-request asyncio queue, fed with ``loop.call_soon_threadsafe``.
"""
import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine
from scheduler.outputs import EngineDeadError, RequestOutput, RequestRejected
from scheduler.sampling_params import SamplingParams
from scheduler.stats import StatsListener

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: "asyncio.Queue[RequestOutput | BaseException]"


@dataclass
class _AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


class AsyncEngine:
    def __init__(self, config: EngineConfig, stats_listener: StatsListener | None = None) -> None:
        self.engine = LLMEngine(config, stats_listener)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self.generation_defaults = self.engine.generation_defaults
        self.num_kv_blocks = self.engine.num_kv_blocks
        self.device = self.engine.device
        self.dtype = self.engine.executor.dtype
        self.grammar_compiler = self.engine.structured_output.compiler  # the front end compiles (and caches) here
        self._condition = threading.Condition()
        self._inbox: list[_AddRequest | str] = []  # new requests, and ids to abort
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._thread = threading.Thread(target=self._run, name="dots-serve-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return (self._dead is None and not self._stopping and self._thread is not None and self._thread.is_alive()
                and self.engine.executor.is_alive)

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    def kv_cache_usage(self) -> float:
        return self.engine.kv_cache_usage()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's deltas. Validation errors are raised before the first one; stopping early aborts it."""
        self._raise_if_dead()
        self.engine.check_request(prompt_token_ids, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._condition:
            self._raise_if_dead()
            if request_id in self._streams:
                raise RequestRejected(f"request id {request_id!r} is already in use", code="duplicate_request_id")
            self._streams[request_id] = stream
            self._inbox.append(_AddRequest(request_id, list(prompt_token_ids), params, arrival_time))
            self._condition.notify()
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._condition:
                self._streams.pop(request_id, None)
                if not finished and self._dead is None:
                    self._inbox.append(request_id)
                    self._condition.notify()

    def abort(self, request_id: str) -> None:
        with self._condition:
            self._inbox.append(request_id)
            self._condition.notify()

    def shutdown(self) -> None:
        """Stops the loop, ends every request with finish reason "abort", joins the thread, releases the model."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join()
        self.engine.executor.shutdown()

    def _raise_if_dead(self) -> None:
        if self._thread is None or self._dead is not None or self._stopping:
            raise EngineDeadError("the engine is not running (not started, shut down, or its loop died)")

    def _run(self) -> None:
        try:
            while True:
                with self._condition:
                    while not (self._inbox or self._stopping or self.engine.has_unfinished()):
                        self._condition.wait()
                    inbox, self._inbox = self._inbox, []
                    stopping = self._stopping
                for item in inbox:
                    self._apply(item)
                if stopping:
                    for request_id in self.engine.request_ids:
                        self._deliver(self.engine.abort(request_id))
                    return
                if self.engine.has_unfinished():
                    for output in self.engine.step():
                        self._deliver(output)
        except BaseException as error:
            logger.exception("the engine loop died")
            with self._condition:
                self._dead = error
                streams = list(self._streams.items())
            for request_id, _ in streams:
                self._send(request_id, EngineDeadError(f"the engine loop died: {error!r}"))

    def _apply(self, item: "_AddRequest | str") -> None:
        if isinstance(item, str):
            self._deliver(self.engine.abort(item))
            return
        try:
            self.engine.add_request(item.request_id, item.prompt_token_ids, item.params, item.arrival_time)
        except (RequestRejected, ValueError) as error:  # checked in generate(); only a race gets here
            self._send(item.request_id, error)

    def _deliver(self, output: RequestOutput | None) -> None:
        if output is not None:
            self._send(output.request_id, output)

    def _send(self, request_id: str, item: "RequestOutput | BaseException") -> None:
        with self._condition:
            stream = self._streams.get(request_id)
        if stream is None:
            return  # the consumer is gone
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed
            pass
