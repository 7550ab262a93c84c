"""The one bridge from the engine's thread to asyncio: a submitted request's events on the caller's event loop.

The engine calls `on_event` on its own thread; `AsyncStream` hands each event to the loop that submitted the
request (`call_soon_threadsafe`) and queues it there. `Engine.stream` and the HTTP gateway both use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from deltafleet.serve.engine.types import Request, TokenEvent

if TYPE_CHECKING:
    from deltafleet.serve.engine.engine import Engine


class AsyncStream:
    """Events of one request, submitted at construction (so the engine's refusals raise at once).

    Iterate it for its `TokenEvent`s; iteration ends after the event that carries a finish reason. `abort()`
    frees the request's batch slot and KV cache at the engine's next step (a no-op once it finished). Construct
    it inside a running event loop: that loop receives the events.
    """

    def __init__(self, engine: Engine, request: Request):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.request_id = request.request_id
        self._finished = False
        self._handle = engine.submit(request, on_event=self._on_event)

    def _on_event(self, ev: TokenEvent) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, ev)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self._engine.abort(self.request_id)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while not self._finished:
            ev = await self._queue.get()
            self._finished = ev.finish_reason is not None
            yield ev

    def abort(self) -> None:
        if not self._handle.done.is_set():
            self._engine.abort(self.request_id)

    @property
    def finished(self) -> bool:
        return self._finished or self._handle.done.is_set()
