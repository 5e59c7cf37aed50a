"""The bus's background event loop: a thread running asyncio, modelled on anyio's BlockingPortal."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ._errors import Closed
from ._threads import Deadline, Started, block_signals, is_current, join

log = logging.getLogger("vbus.loop")
T = TypeVar("T")
_CANCEL_GRACE = 1.0


class BackgroundLoop:
    """Starts on construction, returns once the loop runs. ``stop()`` cancels every task."""

    def __init__(self, name: str) -> None:
        started: Started[asyncio.AbstractEventLoop] = Started()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, args=(started,), name=name)
        try:
            self.thread.start()
            self.loop = started.wait(10.0, "the background loop")
        except BaseException:
            # Interrupted while it starts: it must not outlive us unseen.
            self._stopping = True
            try:
                loop = started.wait(10.0, "the background loop")
                loop.call_soon_threadsafe(loop.stop)
            except Exception:
                pass
            self.thread.join(10.0)
            raise

    def _run(self, started: Started[asyncio.AbstractEventLoop]) -> None:
        block_signals()
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.call_soon(started.ok, loop)
        try:
            loop.run_forever()
        finally:
            try:
                _cancel_all(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    @property
    def in_loop_thread(self) -> bool:
        return is_current(self.thread)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._stopping or self.loop.is_closed():
            coro.close()
            raise Closed("the bus's background loop is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, deadline: Deadline) -> bool:
        """Stop the loop and join its thread; True if it ended (never joined from itself)."""
        first, self._stopping = not self._stopping, True
        if self.in_loop_thread:
            if first:
                self.loop.stop()  # run_forever returns when the current callback does
            return False
        if first:
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:
                pass  # already closed
        return join(self.thread, deadline)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=_CANCEL_GRACE))
    for task in pending:
        log.warning("task %r ignored cancellation for %g s; abandoning it", task, _CANCEL_GRACE)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.warning("task %r failed: %r", task, task.exception())
