"""TaskFlow listeners that tests attach to a pool's flow runner.

``StoragePool(..., listeners=[factory])`` calls each factory with the
engine of every flow it runs and enters the context manager it returns
for the run. :func:`listener` builds such a factory from a callback
``on_change(event, details)`` called on every atom state change (``event``
is the state: RUNNING, SUCCESS, REVERTING...; ``details["task_name"]``
names the step). An exception raised by the callback is logged and
swallowed by TaskFlow's notifier, except BaseExceptions such as
KeyboardInterrupt, which stop the run as a crash would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

from taskflow.types import notifier

__all__ = ["listener", "at_step"]

OnChange = Callable[[str, dict[str, Any]], None]


def listener(on_change: OnChange) -> Callable[[Any], Any]:
    """A listener factory calling ``on_change`` on every atom change."""
    @contextlib.contextmanager
    def listen(engine: Any) -> Iterator[None]:
        engine.atom_notifier.register(notifier.Notifier.ANY, on_change)
        try:
            yield
        finally:
            engine.atom_notifier.deregister(notifier.Notifier.ANY,
                                            on_change)
    return listen


def at_step(step: str | None, action: Callable[[], None],
            event: str = "RUNNING") -> Callable[[Any], Any]:
    """A listener factory running ``action()`` when ``step`` (any step if
    None) reaches ``event``."""
    def on_change(state: str, details: dict[str, Any]) -> None:
        if state == event and step in (None, details.get("task_name")):
            action()
    return listener(on_change)
