"""Progress events to K_SINK (a SinkBinding sets it): best effort, off the loop's thread."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import httpx

from functions import events, http

log = logging.getLogger("rlm.infer")

# Only these progress kinds go out: enough to follow a run without flooding the broker.
FORWARDED = ("turn", "code", "final")


class ProgressSink:
    def __init__(self, url: str, max_queue: int = 1000) -> None:
        self.url = url
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(max_queue)
        self._client = http.client(5.0)
        threading.Thread(target=self._send_forever, daemon=True, name="k-sink").start()

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        if kind not in FORWARDED:
            return
        try:
            self._queue.put_nowait((kind, data))
        except queue.Full:
            log.warning("progress sink queue full; event dropped")

    def _send_forever(self) -> None:
        while True:
            kind, data = self._queue.get()
            headers, body = events.reply(
                events.INFER_PROGRESS, events.SOURCE_INFER, {"kind": kind, **data},
                subject=str(data.get("run_id", "")),
            )  # fmt: skip
            try:
                self._client.post(self.url, headers=headers, content=body)
            except httpx.HTTPError as e:
                log.warning("progress event not delivered to K_SINK: %s", e)
