"""Two clients of the engine core with one interface: in this process, or in a process of its own.

``add_request`` / ``finish_choices`` may be called from any thread; ``get_outputs`` from one thread only: it blocks
until the core has produced the next batch of outputs (the in-process client runs the step right there), and returns
None once the client is shut down. Both raise EngineDeadError when the core cannot serve any more.
"""
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading

import zmq

from scheduler.child_process import stop_signals_blocked
from scheduler.config import EngineConfig
from scheduler.core_messages import (
    ADD, DEAD, FINISH, OUTPUTS, READY, SHUTDOWN, EngineCoreOutputs, EngineCoreRequest, EngineInfo, FinishChoice,
    dead_decoder, encoder, info_decoder, outputs_decoder,
)
from scheduler.core_process import run_engine_core
from scheduler.engine_core import EngineCore
from scheduler.outputs import EngineDeadError

logger = logging.getLogger(__name__)

POLL_MS = 100  # how often a waiting get_outputs looks at the engine process
EXIT_DRAIN_MS = 200  # after the engine process exited, how long its last messages may take to arrive
SHUTDOWN_TIMEOUT_S = 30.0


class InprocClient:
    """The core in the caller's process: for the offline API, tests and debugging."""

    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self.info: EngineInfo = self.core.info
        self._condition = threading.Condition()
        self._inbox: list[EngineCoreRequest | list[FinishChoice]] = []
        self._step_lock = threading.Lock()
        self._final: EngineCoreOutputs | None = None
        self._closed = False

    @property
    def is_alive(self) -> bool:
        return not self._closed and self.core.executor.is_alive

    def add_request(self, request: EngineCoreRequest) -> None:
        self._put(request)

    def finish_choices(self, items: list[FinishChoice]) -> None:
        if items:
            self._put(list(items))

    def has_unfinished(self) -> bool:
        with self._condition:
            return bool(self._inbox) or self.core.has_unfinished()

    def get_outputs(self) -> EngineCoreOutputs | None:
        with self._condition:
            while not (self._inbox or self._closed or self.core.has_unfinished()):
                self._condition.wait()
        with self._step_lock:
            with self._condition:
                if self._closed:  # shut down meanwhile: its aborts are the last outputs
                    final, self._final = self._final, None
                    return final
                inbox, self._inbox = self._inbox, []
            for item in inbox:
                if isinstance(item, EngineCoreRequest):
                    self.core.add_request(item)
                else:
                    self.core.finish_choices(item)
            return self.core.step()

    def shutdown(self) -> None:
        """Aborts what is left (its outputs are the last ``get_outputs`` returns) and releases the model."""
        with self._step_lock:
            if self._closed:
                return
            final = None
            try:
                self.core.abort_all()
                final = self.core.step()
            except Exception:  # a broken core must still release the model
                logger.exception("aborting the requests left at shutdown failed")
            self.core.close()
            with self._condition:
                self._final = final
                self._closed = True
                self._condition.notify_all()

    def _put(self, item: EngineCoreRequest | list[FinishChoice]) -> None:
        with self._condition:
            if self._closed:
                raise EngineDeadError("the engine is shut down")
            self._inbox.append(item)
            self._condition.notify()


class StartCancelled(Exception):
    """The front end stopped while the engine process was still starting (loading the model)."""


class MultiprocessClient:
    """The core in a spawned process, over ZeroMQ (IPC sockets) with msgspec messages: the server's default.

    The process ignores SIGTERM and SIGINT; ``shutdown`` asks it to exit, waits, then kills it. Setting ``cancel``
    while it starts kills it at once and raises StartCancelled from the constructor."""

    def __init__(self, config: EngineConfig, cancel: threading.Event | None = None) -> None:
        self._directory = tempfile.mkdtemp(prefix="dots-serve-engine-")
        input_address = f"ipc://{self._directory}/input"
        output_address = f"ipc://{self._directory}/output"
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._input.bind(input_address)
        self._output = self._context.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.bind(output_address)
        self._send_lock = threading.Lock()
        self._in_flight: set[str] = set()  # requests sent that the core has not reported finished
        self._shutting_down = False
        self._failure: str | None = None
        spawn = multiprocessing.get_context("spawn")
        # Not a daemon: it starts the tensor-parallel workers itself. It exits on its own once this process is gone.
        self.process = spawn.Process(
            target=run_engine_core, name="dots-serve-engine",
            args=(config, input_address, output_address, logging.getLogger().getEffectiveLevel(), os.getpid()),
        )
        with stop_signals_blocked():
            self.process.start()
        logger.info("engine core: process pid %d", self.process.pid)
        try:
            self.info = self._wait_until_ready(cancel or threading.Event())
        except BaseException:
            self._stop_process(0.0)
            self._close()
            raise

    @property
    def is_alive(self) -> bool:
        return self._failure is None and not self._shutting_down and self.process.exitcode is None

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(ADD, request)
        self._in_flight.add(request.request_id)

    def finish_choices(self, items: list[FinishChoice]) -> None:
        if items:
            self._send(FINISH, list(items))

    def has_unfinished(self) -> bool:
        return bool(self._in_flight)

    def get_outputs(self) -> EngineCoreOutputs | None:
        exited = False
        while True:
            if self._output.poll(EXIT_DRAIN_MS if exited else POLL_MS):
                kind, payload = self._output.recv_multipart()
                if kind == OUTPUTS:
                    outputs = outputs_decoder.decode(payload)
                    for output in outputs.outputs:
                        if output.finished:
                            self._in_flight.discard(output.request_id)
                    return outputs
                if kind == DEAD:
                    raise EngineDeadError(self._record_failure(dead_decoder.decode(payload).reason))
            elif exited:
                if self._shutting_down and self.process.exitcode == 0:
                    return None
                raise EngineDeadError(self._record_failure(f"the engine process (pid {self.process.pid}) "
                                                           f"{_how_it_ended(self.process.exitcode)}"))
            elif self.process.exitcode is not None:
                exited = True

    def shutdown(self) -> None:
        """Asks the core to abort what is left and exit; waits for the process (killing it if it hangs)."""
        if self._shutting_down:
            return
        self._shutting_down = True
        if self.process.exitcode is None:
            try:
                with self._send_lock:
                    self._input.send_multipart([SHUTDOWN, b""], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._stop_process(SHUTDOWN_TIMEOUT_S)

    def close(self) -> None:
        """Closes the sockets; after shutdown, once nothing calls get_outputs any more."""
        self._close()

    def _wait_until_ready(self, cancel: threading.Event) -> EngineInfo:
        while True:
            if cancel.is_set():
                raise StartCancelled("the engine process was stopped while starting")
            if self._output.poll(POLL_MS):
                kind, payload = self._output.recv_multipart()
                if kind == READY:
                    return info_decoder.decode(payload)
                if kind == DEAD:
                    raise RuntimeError(f"the engine process could not start: {dead_decoder.decode(payload).reason}")
            elif self.process.exitcode is not None:
                raise RuntimeError(f"the engine process {_how_it_ended(self.process.exitcode)} while starting")

    def _send(self, kind: bytes, message: object) -> None:
        if not self.is_alive:
            raise EngineDeadError(self._failure or "the engine process is not running")
        payload = encoder.encode(message)
        try:
            with self._send_lock:
                self._input.send_multipart([kind, payload], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as error:  # no engine process at the other end any more
            raise EngineDeadError(f"the engine process is not reachable: {error}") from error

    def _record_failure(self, reason: str) -> str:
        if self._failure is None:
            self._failure = reason
            logger.error("%s", reason)
        return self._failure

    def _stop_process(self, timeout_s: float) -> None:
        self.process.join(timeout_s)
        if self.process.exitcode is None:
            if timeout_s > 0:
                logger.warning("the engine process did not exit in %.0fs; killing it", timeout_s)
            self.process.kill()  # it ignores SIGTERM
            self.process.join()

    def _close(self) -> None:
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._context.term()
        shutil.rmtree(self._directory, ignore_errors=True)


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"
