"""Responses stream events: ``event: <type>`` and ``data: <json>`` with an increasing ``sequence_number``."""
from typing import Any

from server.streaming import encode_json


class EventEncoder:
    def __init__(self) -> None:
        self.sequence_number = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, **fields, "sequence_number": self.sequence_number}
        self.sequence_number += 1
        return b"event: " + kind.encode() + b"\ndata: " + encode_json(payload) + b"\n\n"
