"""Running blocking work (file reads, YAML parsing) without blocking the event loop.

The daemon's event loop handles SIGTERM/SIGINT, the scheduler and every job; a blocking call
made on it freezes all of that. ``asyncio.to_thread`` moves the call to a worker thread, but
its pool threads are joined when the loop and the interpreter shut down, so a call that never
returns would still keep the process from exiting. :func:`off_loop` runs the call on a
*daemon* thread instead: if it ever hangs (it should not: every file read is bounded), a
cancelled job lets the daemon exit anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a daemon thread; awaiting it can be cancelled at any time."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def work() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting task, which re-raises it
            error = exc
            _post(loop, lambda: settle(lambda: future.set_exception(error)))
        else:
            _post(loop, lambda: settle(lambda: future.set_result(result)))

    threading.Thread(target=work, name=f"finops-io-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await future


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for this result
        loop.call_soon_threadsafe(callback)
