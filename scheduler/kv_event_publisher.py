"""Publishes KV-cache event batches over ZeroMQ in vLLM's protocol, off the engine's step loop.

A step only queues its events (``publish`` never waits: a full queue drops the batch and counts it). A thread
encodes each batch and sends ``[topic, sequence (8-byte big-endian), payload]`` on a PUB socket, which never
blocks either: a subscriber that reads too slowly misses what exceeds its high-water mark. With a replay
endpoint the thread also keeps the last ``buffer_steps`` payloads and answers a ROUTER request
``[identity, b"", start sequence (8 bytes)]`` with ``[identity, b"", sequence, payload]`` for every kept batch from
that sequence on, then ``[identity, b"", -1 (8 bytes, signed), b""]``.
"""
import logging
import queue
import threading
import time
from collections import deque

import zmq

from scheduler.config import EngineConfig
from scheduler.kv_events import AllBlocksCleared, KVCacheEvent, encode_batch
from scheduler.kv_events_config import KVEventsConfig

logger = logging.getLogger(__name__)

POLL_S = 0.05  # how long the thread waits for a batch before looking at the replay socket again
CLOSE_TIMEOUT_S = 2.0  # how long closing waits for the thread to send what is queued
LINGER_MS = 500  # how long the sockets may keep delivering after the thread has finished
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


def binds(endpoint: str) -> bool:
    """vLLM's convention: bind a wildcard or local address, connect to a named host (a binding subscriber)."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KVEventPublisher:
    def __init__(self, config: KVEventsConfig, block_size: int) -> None:
        self.block_size = block_size
        self.topic = config.topic.encode()
        self.num_published = 0  # batches handed over by the step loop
        self.num_sent = 0  # batches written to the PUB socket
        self.num_dropped = 0  # batches the step loop could not queue: the thread had fallen that far behind
        self._queue: queue.Queue[tuple[float, list[KVCacheEvent]] | None] = queue.Queue(config.max_queue_size)
        self._replay_buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._closing = threading.Event()
        self._context = zmq.Context()  # its own, so that closing it frees the addresses before close() returns
        self._pub = self._context.socket(zmq.PUB)
        self._replay: zmq.Socket | None = None
        try:
            self._pub.set_hwm(config.hwm)
            if binds(config.endpoint):
                self._pub.bind(config.endpoint)
            else:
                self._pub.connect(config.endpoint)
            if config.replay_endpoint is not None:
                self._replay = self._context.socket(zmq.ROUTER)
                self._replay.bind(config.replay_endpoint)
        except zmq.ZMQError as error:
            self._close_sockets(linger_ms=0)
            raise ValueError(f"KV events: cannot open {config.endpoint} / {config.replay_endpoint}: {error}") from None
        # The sockets belong to this thread from now on (ZeroMQ sockets are not thread-safe).
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def publish(self, events: list[KVCacheEvent]) -> None:
        """Queues one step's events as a batch; returns at once."""
        if not events:
            return
        self.num_published += 1
        try:
            self._queue.put_nowait((time.time(), events))
        except queue.Full:
            self.num_dropped += 1
            if self.num_dropped == 1 or self.num_dropped % 1000 == 0:
                logger.warning("KV events: %d batches dropped so far (the publisher thread is behind)",
                               self.num_dropped)

    def close(self) -> None:
        """Sends what is queued (for a bounded time), then closes the sockets."""
        self._closing.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the thread drains the queue and then sees ``_closing``
        self._thread.join(timeout=CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            logger.warning("KV events: the publisher thread did not finish within %.1f s", CLOSE_TIMEOUT_S)

    def _run(self) -> None:
        sequence = 0
        try:
            while True:
                if self._replay is not None:
                    self._answer_replays()
                try:
                    item = self._queue.get(timeout=POLL_S)
                except queue.Empty:
                    if self._closing.is_set():
                        break
                    continue
                if item is None:
                    break
                timestamp, events = item
                payload = encode_batch(timestamp, events, self.block_size)
                self._pub.send_multipart([self.topic, sequence.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
                self._replay_buffer.append((sequence, payload))
                self.num_sent += 1
                sequence += 1
        except Exception:  # events are advisory: losing them must never stop the engine
            logger.exception("KV events: the publisher thread failed; no more events are sent")
        finally:
            self._close_sockets(LINGER_MS)

    def _answer_replays(self) -> None:
        while self._replay.poll(0):
            frames = self._replay.recv_multipart()
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                logger.warning("KV events: ignored a malformed replay request of %d frames", len(frames))
                continue
            identity, _, start = frames
            first = int.from_bytes(start, "big")
            for sequence, payload in self._replay_buffer:
                if sequence >= first:
                    self._replay.send_multipart([identity, b"", sequence.to_bytes(8, "big"), payload])
            self._replay.send_multipart([identity, b"", END_OF_REPLAY, b""])

    def _close_sockets(self, linger_ms: int) -> None:
        self._pub.close(linger=linger_ms)
        if self._replay is not None:
            self._replay.close(linger=linger_ms)
        self._context.term()


def start_kv_event_publisher(config: EngineConfig) -> KVEventPublisher:
    """The engine's publisher, after a first AllBlocksCleared: whatever an indexer kept of this replica is stale."""
    if not config.enable_prefix_caching:
        logger.warning("KV cache events are enabled without prefix caching: no block is ever stored")
    publisher = KVEventPublisher(config.kv_events_config, config.block_size)
    publisher.publish([AllBlocksCleared()])
    return publisher
