"""Bench scripts print their results, and only their results, on stdout (so ``bench/x.py > x.txt``
keeps the figures); logs and progress go to stderr. mmengine's loggers write to stdout: its
default one announces every layer's weight initialisation (hundreds of lines before an ONNX
export's first figure), a Runner's one its config and every iteration. ``quiet_logs`` sends
every mmengine logger, those made later included, to stderr instead, and keeps mmengine's
default logger to warnings. A script calls it before it loads a model (its own folder is first
on ``sys.path``: ``from _quiet import quiet_logs``). Packaging prints its export checks on stdout
(the CLI's user reads them there): ``packaging_to_stderr`` moves them for a ``with`` block.
"""
from __future__ import annotations

import contextlib
import logging
import sys


def quiet_logs() -> None:
    from mmengine.logging import MMLogger

    if not getattr(MMLogger.__init__, "logs_to_stderr", False):
        made = MMLogger.__init__

        def init(self, *args, **kwargs):
            made(self, *args, **kwargs)
            _to_stderr(self)

        init.logs_to_stderr = True
        MMLogger.__init__ = init
    for logger in MMLogger._instance_dict.values():
        _to_stderr(logger)
    MMLogger.get_instance("mmengine").setLevel(logging.WARNING)


def _to_stderr(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def progress(*parts) -> None:
    """A line about what the script is doing now (not a result): on stderr."""
    print(*parts, file=sys.stderr, flush=True)


def packaging_to_stderr():
    """A ``with`` block whose prints (``save_model``'s and the ONNX exporter's checks) go to stderr."""
    return contextlib.redirect_stdout(sys.stderr)
