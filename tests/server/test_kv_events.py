"""KV-cache events of a real server, read as llm-d's indexer reads them: a SUB socket and msgpack.

The server's KV pool is 16 blocks of 16 tokens (1 MiB at 4 KiB per token), so a few prompts evict.
"""
import itertools
import json
import queue
import random
import threading
from collections.abc import Callable, Iterator

import msgpack
import openai
import pytest
import zmq
from api_server import ServerProcess, free_port

BLOCK_SIZE = 16
SMALL_KV_FLAGS = ["--kv-cache-memory", "1MiB", "--block-size", str(BLOCK_SIZE)]
TOPIC = "kv@test-pod@dots1-tiny"
RECEIVE_TIMEOUT_S = 60.0
POLL_MS = 100
TEXT_TOKEN_IDS = 4089  # ids below this are ordinary tokens of the embedded tokenizer


def prompt(seed: int, length: int = 40) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(TEXT_TOKEN_IDS) for _ in range(length)]


def events_flag(**fields: object) -> list[str]:
    return ["--kv-events-config", json.dumps({"enable_kv_cache_events": True, **fields})]


class Subscriber:
    """Binds a SUB socket (the server's PUB connects to it, llm-d's static mode) and, like an indexer, reads it all
    the time on a thread of its own: a bound SUB sends its subscription only once it reads."""

    def __init__(self, context: zmq.Context) -> None:
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVTIMEO, POLL_MS)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"kv@")
        self.endpoint = f"tcp://127.0.0.1:{self.socket.bind_to_random_port('tcp://127.0.0.1')}"
        self.received: queue.Queue[list[bytes]] = queue.Queue()
        self.messages: list[tuple[int, bytes]] = []  # (sequence, payload), as read by read_until
        self.events: list[list] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stopping.is_set():
            try:
                self.received.put(self.socket.recv_multipart())
            except zmq.Again:
                pass
        self.socket.close(linger=0)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()

    def read_until(self, found: Callable[[list], bool]) -> list:
        while True:
            topic, sequence, payload = self.received.get(timeout=RECEIVE_TIMEOUT_S)
            assert topic == TOPIC.encode() and len(sequence) == 8
            self.messages.append((int.from_bytes(sequence, "big"), payload))
            timestamp, events, rank = msgpack.unpackb(payload)
            assert isinstance(timestamp, float) and rank == 0 and events
            for event in events:
                self.events.append(event)
                if found(event):
                    return event


@pytest.fixture(scope="module")
def zmq_context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(scope="module")
def subscriber(zmq_context: zmq.Context) -> Iterator[Subscriber]:
    reader = Subscriber(zmq_context)
    yield reader
    reader.close()


@pytest.fixture(scope="module")
def replay_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def events_server(subscriber: Subscriber, replay_endpoint: str) -> Iterator[ServerProcess]:
    flags = events_flag(endpoint=subscriber.endpoint, replay_endpoint=replay_endpoint, topic=TOPIC)
    with ServerProcess(*SMALL_KV_FLAGS, *flags) as process:
        yield process


def complete(server: ServerProcess, prompt_ids: list[int], max_tokens: int = 1) -> openai.types.Completion:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    return client.completions.create(model="dots1-tiny", prompt=prompt_ids, max_tokens=max_tokens, temperature=0)


def stores_tokens(tokens: list[int]):
    return lambda event: event[0] == "BlockStored" and event[3] == tokens


def test_a_prompt_stores_its_full_blocks_and_a_continuation_chains_to_them(
    events_server: ServerProcess, subscriber: Subscriber
) -> None:
    first = prompt(1)  # 2 full blocks and 8 tokens
    complete(events_server, first)
    stored = subscriber.read_until(stores_tokens(first[:32]))
    tag, hashes, parent, tokens, block_size, *optional = stored
    assert parent is None and block_size == BLOCK_SIZE and optional == [None, "GPU", None]
    assert len(hashes) == 2 and all(isinstance(h, bytes) and len(h) == 8 for h in hashes) and hashes[0] != hashes[1]
    longer = first[:32] + prompt(2, 20)  # a prefix hit on both blocks, one more full block
    complete(events_server, longer)
    continued = subscriber.read_until(stores_tokens(longer[32:48]))
    assert continued[2] == hashes[1] and len(continued[1]) == 1
    sequences = [sequence for sequence, _ in subscriber.messages]
    assert sequences == sorted(set(sequences))


def test_eviction_sends_block_removed_for_hashes_it_stored(
    events_server: ServerProcess, subscriber: Subscriber
) -> None:
    for seed in range(100, 112):  # 12 prompts x 2 cached blocks: more than the pool's 16 blocks
        complete(events_server, prompt(seed))
    removed = subscriber.read_until(lambda event: event[0] == "BlockRemoved")
    assert removed[2] == "GPU" and removed[1]
    stored = {h for event in subscriber.events if event[0] == "BlockStored" for h in event[1]}
    assert set(removed[1]) <= stored


def test_replay_returns_the_buffered_batches_from_the_start(
    events_server: ServerProcess, subscriber: Subscriber, zmq_context: zmq.Context, replay_endpoint: str
) -> None:
    complete(events_server, prompt(7))
    subscriber.read_until(stores_tokens(prompt(7)[:32]))
    replay = zmq_context.socket(zmq.DEALER)
    replay.setsockopt(zmq.RCVTIMEO, int(RECEIVE_TIMEOUT_S * 1000))
    replay.connect(replay_endpoint)
    replay.send_multipart([b"", (0).to_bytes(8, "big")])
    replayed: dict[int, bytes] = {}
    while True:
        empty, sequence, payload = replay.recv_multipart()
        if int.from_bytes(sequence, "big", signed=True) == -1:
            break
        replayed[int.from_bytes(sequence, "big")] = payload
    replay.close(linger=0)
    assert msgpack.unpackb(replayed[0])[1] == [["AllBlocksCleared"]]  # start-up: forget this replica's old blocks
    assert list(replayed) == list(range(len(replayed)))
    live = dict(subscriber.messages)
    assert live and all(replayed[sequence] == payload for sequence, payload in live.items())


def run_workload(server: ServerProcess) -> list[str]:
    return [complete(server, prompt(seed, 40 + seed % 30), max_tokens=4).choices[0].text for seed in range(200, 216)]


def test_no_subscriber_and_a_stalled_subscriber_cost_the_engine_nothing(zmq_context: zmq.Context, tmp_path) -> None:
    """The same workload (with evictions) completes alike with nobody listening and with a subscriber that took
    one batch through a one-message buffer and then never reads again: the step loop waits for neither."""
    with ServerProcess(*SMALL_KV_FLAGS, *events_flag(endpoint=f"ipc://{tmp_path}/unheard")) as alone:
        unheard = run_workload(alone)
    endpoint = f"ipc://{tmp_path}/stalled"  # the server binds it; the subscriber connects, as llm-d's pod discovery
    with ServerProcess(*SMALL_KV_FLAGS, *events_flag(endpoint=endpoint, hwm=1)) as server:
        stalled = zmq_context.socket(zmq.SUB)
        stalled.setsockopt(zmq.RCVHWM, 1)
        stalled.setsockopt(zmq.RCVTIMEO, 1000)
        stalled.setsockopt(zmq.SUBSCRIBE, b"")
        stalled.connect(endpoint)
        try:
            for attempt in itertools.count():  # new blocks (so new events) until the subscription is in place
                complete(server, prompt(300 + attempt))
                try:
                    stalled.recv_multipart()
                    break
                except zmq.Again:
                    pass
            assert run_workload(server) == unheard
            assert server.is_ready()
        finally:
            stalled.close(linger=0)
