"""The in-memory store of Responses API responses that ``previous_response_id`` continues from."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from loom.errors import NotFoundError

Json = dict[str, Any]
STORE_SIZE = 1024  # stored responses kept for previous_response_id (least recently used dropped first)


class ResponseStore:
    """Stored responses, least recently used dropped past ``size``: each its object and the conversation
    items up to and including its output."""

    def __init__(self, size: int = STORE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[Json, list[Json]]] = OrderedDict()

    def put(self, response: Json, items: list[Json]) -> None:
        self._entries[response["id"]] = (response, items)
        self._entries.move_to_end(response["id"])
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> tuple[Json, list[Json]]:
        if response_id not in self._entries:
            raise NotFoundError(f"no stored response has the id {response_id!r}")
        self._entries.move_to_end(response_id)
        return self._entries[response_id]

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._entries[response_id]
