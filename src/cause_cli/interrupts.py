"""Ctrl-C that is never lost.

Python raises KeyboardInterrupt wherever the main thread is when the signal arrives. If that
is inside a finaliser, such as a data loader's iterator shutting its worker processes down at
the end of an epoch, Python prints "Exception ignored" and carries on: a training would go on
for hours as if the key had not been pressed. While a command runs under
:func:`remembered_interrupts`, a Ctrl-C is also remembered, and the loops over batches call
:func:`raise_if_interrupted`, which raises it again where it cannot be swallowed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_pressed = threading.Event()


def _remember(signum: int, frame: FrameType | None) -> None:
    _pressed.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def remembered_interrupts() -> Iterator[None]:
    """Remember Ctrl-C inside the block. Only the main thread can own the handler, and an
    embedding program that installed its own keeps it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _pressed.clear()
    signal.signal(signal.SIGINT, _remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _pressed.clear()


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed in the block, even where the first one
    was swallowed."""
    if _pressed.is_set():
        raise KeyboardInterrupt
