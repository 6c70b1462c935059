"""``--kv-events-config``: vLLM's ``KVEventsConfig`` fields, defaults and JSON, for prefix-aware routers."""
import json
from dataclasses import dataclass, fields
from typing import Any

PUBLISHERS = ("null", "zmq")
ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")


@dataclass
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str | None = None  # "zmq" or "null"; None: zmq when events are enabled, else null
    endpoint: str = "tcp://*:5557"  # bound when it holds a wildcard ("*", "::") or is ipc/inproc, else connected
    replay_endpoint: str | None = None  # a ROUTER socket (always bound) answering replay requests
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # ZeroMQ high-water mark of the PUB socket: beyond it a slow subscriber misses batches
    max_queue_size: int = 100_000  # batches waiting for the publisher thread; beyond it new batches are dropped
    topic: str = ""  # first frame of every message; llm-d's indexer expects "kv@<pod-id>@<model>"

    def __post_init__(self) -> None:
        if self.publisher is None:
            self.publisher = "zmq" if self.enable_kv_cache_events else "null"
        check_kv_events_config(self)

    @property
    def publishes(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"


def check_kv_events_config(config: KVEventsConfig) -> None:
    if not isinstance(config.enable_kv_cache_events, bool):
        raise ValueError("enable_kv_cache_events must be true or false")
    if config.publisher not in PUBLISHERS:
        raise ValueError(f"publisher must be one of {list(PUBLISHERS)}, got {config.publisher!r}")
    for name in ("endpoint", "replay_endpoint"):
        value = getattr(config, name)
        if value is None and name == "replay_endpoint":
            continue
        if not isinstance(value, str) or not value.startswith(ENDPOINT_SCHEMES):
            raise ValueError(f"{name} must be a ZeroMQ address starting with one of {list(ENDPOINT_SCHEMES)}, "
                             f"got {value!r}")
    for name, minimum in (("buffer_steps", 1), ("hwm", 0), ("max_queue_size", 1)):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    if not isinstance(config.topic, str):
        raise ValueError(f"topic must be a string, got {config.topic!r}")


def kv_events_config_from(value: str | dict[str, Any]) -> KVEventsConfig:
    """From the flag's JSON text (vLLM's ``--kv-events-config`` syntax) or a preset's mapping."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object of KVEventsConfig fields")
    known = {field.name for field in fields(KVEventsConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown fields {unknown}; known: {sorted(known)}")
    return KVEventsConfig(**value)
