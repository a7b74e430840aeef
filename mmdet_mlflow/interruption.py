"""Signals that stop a long-running command, never lost (``Interruption``)."""
from __future__ import annotations

import signal


class Interruption:
    """Ctrl-C (SIGINT) and SIGTERM end a long-running command (the demo, ``serve``) with a
    non-zero status and stopped servers.

    Python turns SIGINT into a KeyboardInterrupt wherever the main thread is; raised inside a
    finalizer (a socket or connection being garbage-collected) it is printed as "Exception
    ignored" and lost: the demo ran on to exit 0 (a test that failed now and then), and ``serve``
    kept serving after Ctrl-C (tests/test_readme.py, once). So the handler also remembers the
    signal, and ``check()`` at every step, inside every wait loop and at the very end raises
    again: an interruption can be delayed, never lost."""

    def __init__(self):
        self.signal: int | None = None

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
