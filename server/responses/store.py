"""Finished responses kept for ``previous_response_id`` and ``GET``/``DELETE /v1/responses/{id}``: in memory, at
most ``capacity`` of them, the least recently used dropped first."""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from server.errors import APIError
from server.protocol.chat import ChatMessage


@dataclass
class StoredResponse:
    response: dict[str, Any]
    conversation: list[ChatMessage]  # its input (without its instructions) and its output, as chat messages


def not_found(response_id: str, param: str | None = None) -> APIError:
    what = "Previous response" if param == "previous_response_id" else "Response"
    return APIError(404, f"{what} with id '{response_id}' not found.", param=param, code="not_found")


class ResponseStore:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[str, StoredResponse] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def put(self, entry: StoredResponse) -> None:
        if not self.enabled:
            return
        self.entries[entry.response["id"]] = entry
        self.entries.move_to_end(entry.response["id"])
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The entry, now the most recently used; 404 when unknown or evicted."""
        entry = self.entries.get(response_id)
        if entry is None:
            raise not_found(response_id, param)
        self.entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> dict[str, Any]:
        if self.entries.pop(response_id, None) is None:
            raise not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}
