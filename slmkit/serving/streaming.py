"""Handing a generator that runs in a thread of its own over to the event loop, chunk by chunk."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any


async def stream_in_thread(chunks: Iterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Chunks made in a thread of their own, handed over as they come. When the consumer stops
    (the client went away), the thread stops at the next chunk and closes the generator, which
    drops the request's row from the ONNX wrapper's decoding batch."""
    loop, queue, stopped, end = asyncio.get_running_loop(), asyncio.Queue(), threading.Event(), object()

    def hand_over(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening
            stopped.set()

    def produce() -> None:
        try:
            for chunk in chunks:
                if stopped.is_set():
                    break
                hand_over(chunk)
        except Exception as error:  # handed to the consumer, which answers or logs it
            hand_over(error)
        finally:
            getattr(chunks, "close", lambda: None)()
            hand_over(end)

    threading.Thread(target=produce, name="slmkit-stream", daemon=True).start()
    try:
        while (item := await queue.get()) is not end:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stopped.set()


async def prepend(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for item in rest:
        yield item
