"""The engine core's own process: load the model, then loop: take requests and aborts, step, send the step's outputs.

Socket I/O runs on two threads (zmq releases the GIL while it waits): one receives and decodes inputs into a
queue, one encodes and sends outputs, so the loop itself only steps. The process exits when its front end asks,
when the executor or one of those threads can no longer run (after telling the front end why, where it still can),
and when its parent process is gone. It ignores SIGTERM and SIGINT: only the front end decides when it stops.
"""
import logging
import os
import queue
import threading
import time

import zmq

from scheduler.child_process import become_engine_child
from scheduler.config import EngineConfig
from scheduler.core_messages import (
    ADD, DEAD, FINISH, OUTPUTS, READY, SHUTDOWN, EngineCoreOutputs, EngineDead, encoder, finish_decoder,
    request_decoder,
)
from scheduler.engine_core import EngineCore
from scheduler.faults import InjectedFault, fault_number, fires_at
from scheduler.outputs import EngineDeadError

logger = logging.getLogger(__name__)

ORPHAN_POLL_S = 0.5
HEALTH_POLL_S = 0.2  # while idle, how often the loop checks that the executor (its tensor-parallel ranks) still lives
IDLE_RETRY_S = 0.01  # work exists but none could be scheduled: wait this long for inputs before trying again
LINGER_MS = 5000  # how long closing the output socket may take to deliver what is still queued
EXIT_OK, EXIT_FAILED, EXIT_ORPHANED = 0, 1, 3


def run_engine_core(config: EngineConfig, input_address: str, output_address: str, log_level: int,
                    parent_pid: int) -> None:
    """Process entry point (spawned by MultiprocessClient)."""
    become_engine_child()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s",
                        force=True)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="orphan-watch", daemon=True).start()
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.connect(input_address)
    outputs = context.socket(zmq.PUSH)
    outputs.setsockopt(zmq.SNDHWM, 0)
    outputs.connect(output_address)
    try:
        time.sleep(fault_number("LOAD_DELAY_S") or 0.0)
        core = EngineCore(config)
    except BaseException as error:
        logger.exception("the engine core could not start")
        outputs.send_multipart([DEAD, encoder.encode(EngineDead(f"{type(error).__name__}: {error}"))])
        _exit(outputs, EXIT_FAILED)
    outputs.send_multipart([READY, encoder.encode(core.info)])
    code = EngineLoop(core, inputs, outputs).run()
    _exit(outputs, code)


class EngineLoop:
    def __init__(self, core: EngineCore, inputs: zmq.Socket, outputs: zmq.Socket) -> None:
        self.core = core
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = False
        self.outputs = outputs
        self.thread_failure: str | None = None  # set by the input or output thread when it dies
        threading.Thread(target=self._receive, args=(inputs,), name="engine-input", daemon=True).start()
        self.sender = threading.Thread(target=self._send, args=(outputs,), name="engine-output", daemon=True)
        self.sender.start()

    def run(self) -> int:
        """Steps while there is work; returns the process exit status."""
        try:
            self.outbox.put((OUTPUTS, self.core.step()))  # the start-up expert counts, before any traffic
            while not self.stopping:
                self._raise_if_thread_failed()
                if not self.core.has_unfinished():
                    self._apply(self._next_input())
                self._apply_pending()
                if self.stopping:
                    break
                outputs = self.core.step()
                if _carries_news(outputs):
                    self.outbox.put((OUTPUTS, outputs))
                elif outputs.step is None:
                    self._apply_within(IDLE_RETRY_S)
            self.core.abort_all()
            self.outbox.put((OUTPUTS, self.core.step()))
            self.core.close()
            return self._finish(EXIT_OK)
        except BaseException as error:
            reason = f"the engine core failed: {error}"
            logger.exception("%s; the engine process exits", reason)
            if self.sender.is_alive():
                self.outbox.put((DEAD, EngineDead(reason)))
            else:  # this thread is now the only one using the socket
                self.outputs.send_multipart([DEAD, encoder.encode(EngineDead(reason))])
            return self._finish(EXIT_FAILED)

    def _next_input(self) -> tuple[bytes, object]:
        while True:
            try:
                return self.inbox.get(timeout=HEALTH_POLL_S)
            except queue.Empty:
                self._raise_if_thread_failed()
                if not self.core.executor.is_alive:
                    raise EngineDeadError("the model executor stopped while idle (a tensor-parallel rank is gone)")

    def _apply_pending(self) -> None:
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            self._apply(item)

    def _apply_within(self, timeout_s: float) -> None:
        try:
            self._apply(self.inbox.get(timeout=timeout_s))
        except queue.Empty:
            pass

    def _apply(self, item: tuple[bytes, object]) -> None:
        kind, message = item
        if kind == ADD:
            self.core.add_request(message)
        elif kind == FINISH:
            self.core.finish_choices(message)
        elif kind == SHUTDOWN:
            self.stopping = True
        else:
            self._raise_if_thread_failed()

    def _finish(self, code: int) -> int:
        self.outbox.put(None)
        self.sender.join(timeout=LINGER_MS / 1000)
        return code

    def _raise_if_thread_failed(self) -> None:
        if self.thread_failure is not None:
            raise EngineDeadError(self.thread_failure)

    def _thread_failed(self, error: BaseException) -> None:
        logger.exception("the engine's %s thread failed", threading.current_thread().name)
        self.thread_failure = f"the {threading.current_thread().name} thread failed: {error!r}"

    def _receive(self, socket: zmq.Socket) -> None:
        try:
            self._receive_until_shutdown(socket)
        except BaseException as error:
            self._thread_failed(error)
            self.inbox.put((DEAD, None))  # wakes the loop, which then raises

    def _receive_until_shutdown(self, socket: zmq.Socket) -> None:
        received = 0
        while True:
            kind, payload = socket.recv_multipart()
            received += 1
            if fires_at("INPUT_THREAD_AT", received):
                raise InjectedFault(f"injected input thread failure at message {received}")
            if kind == ADD:
                self.inbox.put((ADD, request_decoder.decode(payload)))
            elif kind == FINISH:
                self.inbox.put((FINISH, finish_decoder.decode(payload)))
            else:
                self.inbox.put((SHUTDOWN, None))
                return

    def _send(self, socket: zmq.Socket) -> None:
        try:
            sent = 0
            while (item := self.outbox.get()) is not None:
                sent += 1
                if fires_at("OUTPUT_THREAD_AT", sent):
                    raise InjectedFault(f"injected output thread failure at message {sent}")
                kind, message = item
                socket.send_multipart([kind, encoder.encode(message)], copy=False)
        except BaseException as error:
            self._thread_failed(error)


def _carries_news(outputs: EngineCoreOutputs) -> bool:
    return bool(outputs.outputs or outputs.step is not None or outputs.finished_requests or outputs.expert_counts)


def _exit(outputs: zmq.Socket, code: int) -> None:
    outputs.close(linger=LINGER_MS)
    logging.shutdown()
    os._exit(code)  # skip interpreter teardown: worker processes and a broken communicator can hang it


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(ORPHAN_POLL_S)
    logger.error("the server process is gone; the engine process exits")
    os._exit(EXIT_ORPHANED)
