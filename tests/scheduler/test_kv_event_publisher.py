"""The KV event publisher alone: vLLM's bytes, the three-frame messages a SUB socket reads, replay, closing."""
import socket

import msgpack
import pytest
import zmq

from conftest import assert_pool_free, make_llm, random_prompts  # at import: the scheduler tests' conftest
from scheduler.kv_event_publisher import KVEventPublisher
from scheduler.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, encode_batch
from scheduler.kv_events_config import KVEventsConfig, kv_events_config_from
from scheduler.sampling_params import SamplingParams

RECEIVE_TIMEOUT_MS = 10_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_batch_in_vllms_array_layout_byte_for_byte() -> None:
    """Written out by hand from vLLM's structs (``vllm/distributed/kv_events.py``):

    ``EventBatch(ts, events, data_parallel_rank)`` is ``array_like``: a 3-element array, rank filled in (0) by the
    publisher. ``BlockStored`` is ``array_like`` and ``tag=True``: its tag, the class name, comes first, then the
    fields in order; ``lora_id``, ``medium`` and ``lora_name`` have no default so they are always there, the later
    fields have defaults and ``omit_defaults`` drops them: 8 elements. ``BlockRemoved``: tag, hashes, medium
    (``group_idx`` defaulted away). ``AllBlocksCleared``: the tag alone. Hashes are ``bytes`` (``ExternalBlockHash``),
    8 bytes big-endian; floats are float64.
    """
    events = [AllBlocksCleared(), BlockStored([1, -1], None, [(5, 6), (7, 300)]), BlockRemoved([2])]
    expected = b"".join([
        b"\x93",  # fixarray(3): [ts, events, data_parallel_rank]
        b"\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00",  # float64 1.5
        b"\x93",  # fixarray(3): the events
        b"\x91\xb0AllBlocksCleared",  # fixarray(1) of fixstr(16)
        b"\x98\xabBlockStored",  # fixarray(8), fixstr(11)
        b"\x92\xc4\x08\x00\x00\x00\x00\x00\x00\x00\x01",  # block_hashes: fixarray(2) of bin8(8): 1 ...
        b"\xc4\x08\xff\xff\xff\xff\xff\xff\xff\xff",  # ... and -1 as an unsigned 64-bit value
        b"\xc0",  # parent_block_hash: nil (the first block of a sequence)
        b"\x94\x05\x06\x07\xcd\x01\x2c",  # token_ids: fixarray(4) 5, 6, 7, uint16 300
        b"\x02",  # block_size 2
        b"\xc0",  # lora_id: nil
        b"\xa3GPU",  # medium
        b"\xc0",  # lora_name: nil
        b"\x93\xacBlockRemoved",  # fixarray(3), fixstr(12)
        b"\x91\xc4\x08\x00\x00\x00\x00\x00\x00\x00\x02",  # block_hashes
        b"\xa3GPU",  # medium
        b"\x00",  # data_parallel_rank 0
    ])
    assert encode_batch(1.5, events, block_size=2) == expected


def test_config_takes_vllms_json_and_defaults_and_refuses_the_rest() -> None:
    config = kv_events_config_from('{"enable_kv_cache_events": true}')
    assert (config.publisher, config.endpoint, config.replay_endpoint) == ("zmq", "tcp://*:5557", None)
    assert config.topic == ""
    assert (config.buffer_steps, config.hwm, config.max_queue_size) == (10_000, 100_000, 100_000)
    assert config.publishes
    assert not kv_events_config_from("{}").publishes  # disabled by default, publisher "null"
    assert not kv_events_config_from({"enable_kv_cache_events": True, "publisher": "null"}).publishes
    for bad, message in [("[1]", "JSON object"), ("{", "not JSON"), ('{"port": 1}', "unknown fields ['port']"),
                         ('{"publisher": "kafka"}', "publisher"), ('{"endpoint": "localhost:5557"}', "endpoint"),
                         ('{"buffer_steps": 0}', "buffer_steps"), ('{"hwm": "many"}', "hwm"),
                         ('{"topic": 3}', "topic")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            kv_events_config_from(bad)


@pytest.fixture
def context() -> zmq.Context:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def subscriber(context: zmq.Context, topic: bytes = b"") -> tuple[zmq.Socket, str]:
    """A SUB that binds (so the publisher connects to it and nothing is lost while subscriptions propagate)."""
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVTIMEO, RECEIVE_TIMEOUT_MS)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    return sub, f"tcp://127.0.0.1:{port}"


def test_sub_socket_reads_topic_sequence_and_decodable_payloads(context: zmq.Context) -> None:
    sub, endpoint = subscriber(context, b"kv@")
    config = KVEventsConfig(enable_kv_cache_events=True, endpoint=endpoint, topic="kv@pod-1@dots1-tiny")
    publisher = KVEventPublisher(config, block_size=4)
    try:
        received = []
        publisher.publish([AllBlocksCleared()])
        while len(received) < 3:  # the first messages may go out before the connection is up: keep offering
            publisher.publish([BlockStored([len(received) + 10], None, [(1, 2, 3, 4)])])
            try:
                received.append(sub.recv_multipart())
            except zmq.Again:
                pass
    finally:
        publisher.close()
    sequences = [int.from_bytes(frames[1], "big") for frames in received]
    assert all(len(frames) == 3 and frames[0] == b"kv@pod-1@dots1-tiny" for frames in received)
    assert all(len(frames[1]) == 8 for frames in received)
    assert sequences == sorted(sequences) and len(set(sequences)) == 3
    timestamp, events, rank = msgpack.unpackb(received[-1][2])
    assert isinstance(timestamp, float) and rank == 0
    assert events[0][0] in ("AllBlocksCleared", "BlockStored")
    stored = msgpack.unpackb(received[-1][2])[1][0]
    assert stored[0] == "BlockStored" and stored[3:7] == [[1, 2, 3, 4], 4, None, "GPU"]


def test_replay_returns_the_buffered_batches_from_the_asked_sequence(context: zmq.Context, tmp_path) -> None:
    config = KVEventsConfig(enable_kv_cache_events=True, endpoint=f"ipc://{tmp_path}/kv-events",
                            replay_endpoint=f"ipc://{tmp_path}/kv-events-replay", buffer_steps=3)
    publisher = KVEventPublisher(config, block_size=4)
    try:
        for hash_value in range(5):
            publisher.publish([BlockRemoved([hash_value])])
        replay = context.socket(zmq.DEALER)
        replay.setsockopt(zmq.RCVTIMEO, RECEIVE_TIMEOUT_MS)
        replay.connect(config.replay_endpoint)

        def ask(start: int) -> list[tuple[int, list]]:
            replay.send_multipart([b"", start.to_bytes(8, "big")])
            answers = []
            while True:
                empty, sequence, payload = replay.recv_multipart()
                assert empty == b""
                if int.from_bytes(sequence, "big", signed=True) == -1:
                    assert payload == b""
                    return answers
                answers.append((int.from_bytes(sequence, "big"), msgpack.unpackb(payload)[1]))

        while publisher.num_sent < 5:  # the replay answers only what the thread has sent
            assert ask(99) == []
        assert ask(0) == [(2, [["BlockRemoved", [(2).to_bytes(8, "big")], "GPU"]]),
                          (3, [["BlockRemoved", [(3).to_bytes(8, "big")], "GPU"]]),
                          (4, [["BlockRemoved", [(4).to_bytes(8, "big")], "GPU"]])]  # the last buffer_steps only
        assert [sequence for sequence, _ in ask(4)] == [4]
        replay.close(linger=0)
    finally:
        publisher.close()


def test_close_sends_what_is_queued_and_frees_the_endpoints(tmp_path) -> None:
    replay_port = free_port()
    config = KVEventsConfig(enable_kv_cache_events=True, endpoint=f"ipc://{tmp_path}/kv-events",
                            replay_endpoint=f"tcp://127.0.0.1:{replay_port}")
    first = KVEventPublisher(config, block_size=4)
    first.publish([AllBlocksCleared()])
    first.close()
    assert (first.num_published, first.num_sent, first.num_dropped) == (1, 1, 0)
    second = KVEventPublisher(config, block_size=4)  # the addresses bind again
    try:
        with pytest.raises(ValueError, match=f"cannot open .*{replay_port}"):  # while taken: a clear error
            KVEventPublisher(config, block_size=4)
    finally:
        second.close()


def test_an_engine_with_a_stalled_subscriber_sends_every_batch_without_waiting(context: zmq.Context, tmp_path) -> None:
    """A subscriber with a one-message buffer that reads once and then never again: every step's batch is still
    handed to the socket (the PUB drops what that subscriber cannot take), none is dropped, and close returns."""

    endpoint = f"ipc://{tmp_path}/kv-events"
    config = KVEventsConfig(enable_kv_cache_events=True, endpoint=endpoint, hwm=1)
    llm = make_llm(kv_cache_memory=1 << 20, kv_events_config=config)  # 16 blocks of 16 tokens: evictions
    stalled = context.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.setsockopt(zmq.RCVTIMEO, 1000)
    stalled.connect(endpoint)
    try:
        publisher = llm.engine.kv_events
        for attempt in range(1000):  # until the subscription is in place
            llm.generate(random_prompts(1, 40, 40, seed=attempt), SamplingParams(max_tokens=1))
            try:
                stalled.recv_multipart()
                break
            except zmq.Again:
                pass
        results = llm.generate(random_prompts(24, 20, 120, seed=1000), SamplingParams(max_tokens=8, ignore_eos=True))
        assert all(result.error is None and len(result.outputs[0].token_ids) == 8 for result in results)
        assert_pool_free(llm)
    finally:
        llm.shutdown()
        stalled.close(linger=0)
    assert publisher.num_published > 2 and publisher.num_dropped == 0  # one batch per step that cached or evicted
    assert publisher.num_sent == publisher.num_published
